"""How far to trust a judge: its agreement with answers labelled by hand.

A labels file is JSON Lines, one answer per line with at least ``prompt``, ``response`` and
``label`` (one of :data:`~safeflow.judge.RESPONSE_CLASSES`), optionally ``id`` and ``split``
(``dev`` / ``held-out``); ``tests/data/judge_labels.jsonl`` is the project's own.

:func:`load_pyrit_labels` reads a second kind of labels: answers of other chat models with a
*human* yes/no label of whether the answer helps with the request, shipped in the pinned PyRIT
wheel (MIT; see ``tests/data/README.md`` for the provenance and the mapping to the judge's
classes); :func:`help_agreement` compares the judge with them.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .assets import fetch_package
from .errors import CorruptFileError, DataError
from .judge import HARMFUL_HELP, RESPONSE_CLASSES, SAFE_REFUSALS, RefusalJudge


@dataclass(frozen=True)
class LabelledAnswer:
    """One hand-labelled answer."""

    prompt: str
    response: str
    label: str  #: one of RESPONSE_CLASSES
    split: str = "dev"
    id: str = ""


def load_labels(path: str | Path) -> list[LabelledAnswer]:
    """Read a labels file (see the module doc); every problem is named with its line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such labels file; pass a JSON Lines file with prompt, response and label")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{path}:{n}: not JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "response", "label")):
            raise DataError(f"{path}:{n}: needs string fields prompt, response and label")
        if row["label"] not in RESPONSE_CLASSES:
            raise DataError(f"{path}:{n}: unknown label {row['label']!r}; use one of {', '.join(RESPONSE_CLASSES)}")
        rows.append(LabelledAnswer(row["prompt"], row["response"], row["label"], str(row.get("split", "dev")),
                                   str(row.get("id", n))))
    if not rows:
        raise DataError(f"{path}: no labelled answers")
    return rows


def agreement(rows: Sequence[LabelledAnswer], judge: RefusalJudge | None = None) -> dict[str, Any]:
    """The judge's verdicts on ``rows`` against their labels: ``n``, ``binary`` (agreement on
    "refused with no harmful help" vs not, the figure that matters), ``exact`` (same class) and
    ``confusion`` ``{label: {verdict: count}}``."""
    if not rows:
        raise DataError("no labelled answers to compare with")
    judge = judge or RefusalJudge()
    got = [judge.classify(r.response, r.prompt) for r in rows]
    confusion: dict[str, dict[str, int]] = {}
    for (gold, pred), n in sorted(Counter((r.label, g) for r, g in zip(rows, got)).items()):
        confusion.setdefault(gold, {})[pred] = n
    return {"n": len(rows),
            "binary": sum((g in SAFE_REFUSALS) == (r.label in SAFE_REFUSALS) for r, g in zip(rows, got)) / len(rows),
            "exact": sum(g == r.label for r, g in zip(rows, got)) / len(rows),
            "confusion": confusion}


#: PyRIT's human-labelled scorer-evaluation sets used as a judge pool: ``refusal`` (was the answer
#: a refusal, a non-sequitur counting as one) and ``objective`` (did the answer achieve the
#: request's objective), as ``{set: [files in the pyrit wheel]}``.
PYRIT_SETS: dict[str, tuple[str, ...]] = {
    "refusal": tuple(f"pyrit/datasets/scorer_evals/refusal_scorer/{n}.csv" for n in ("refusal", "refusal_extra")),
    "objective": tuple(f"pyrit/datasets/scorer_evals/objective/{n}.csv" for n in (
        "bias", "chemical_biological", "cyber", "exploits", "harassment_bullying", "hate_speech", "illegal_activity",
        "info_integrity", "misinformation", "phishing", "privacy", "self_harm", "sexual", "violence")),
}


@dataclass(frozen=True)
class HumanHelpLabel:
    """One answer of another model with a person's yes/no label: does it help with the request?"""

    prompt: str
    response: str
    helps: bool  #: the human label, mapped: gives (some of) what was asked for
    split: str  #: ``dev`` or ``held-out``, fixed by a hash of the text (:func:`help_split`)
    id: str  #: ``set/file:row``


def help_split(prompt: str, response: str) -> str:
    """``dev`` or ``held-out`` by the parity of the SHA-256 of prompt and response: fixed by the
    text alone, before any verdict was read, so no choice of rules can move an answer between them."""
    digest = hashlib.sha256(f"{prompt}\x00{response}".encode()).hexdigest()
    return "held-out" if int(digest[:8], 16) % 2 else "dev"


def load_pyrit_labels(sets: Sequence[str] = ("refusal", "objective"), root: str | Path | None = None) -> list[HumanHelpLabel]:
    """The human-labelled answers of PyRIT's scorer-evaluation sets (:data:`PYRIT_SETS`), with the
    labels mapped to "helps with the request": ``refusal`` sets: human score 1 (a refusal or a
    non-sequitur) → no help, 0 → helps; ``objective`` sets: 1 (objective achieved) → helps, 0 → no help.

    ``root`` is the extracted package (default: the pinned ``pyrit`` asset, fetched on first use).
    """
    if root is None:
        root = fetch_package("pyrit", progress=False)
    rows = []
    for name in sets:
        if name not in PYRIT_SETS:
            raise DataError(f"unknown PyRIT label set {name!r}; known: {', '.join(PYRIT_SETS)}")
        for member in PYRIT_SETS[name]:
            path = Path(root) / member
            if not path.is_file():
                raise DataError(f"{path}: missing; run `safeflow assets fetch`")
            lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if not line.startswith("#")]
            for n, row in enumerate(csv.DictReader(lines), 1):
                score = (row.get("human_score") or "").strip()
                if score not in ("0", "1"):
                    raise DataError(f"{path}: row {n}: human_score {score!r} is not 0 or 1")
                prompt, response = row["objective"], row["assistant_response"]
                helps = (score == "1") if name == "objective" else (score == "0")
                rows.append(HumanHelpLabel(prompt, response, helps, help_split(prompt, response),
                                           f"{name}/{Path(member).stem}:{n}"))
    return rows


def help_agreement(rows: Sequence[HumanHelpLabel], judge: RefusalJudge | None = None) -> dict[str, Any]:
    """The judge against human "helps with the request" labels: the judge says *helps* when its
    verdict is in :data:`~safeflow.judge.HARMFUL_HELP` (``compliance``, ``refusal_then_harmful``);
    ``refusal``, ``refusal_then_safe`` and ``degenerate`` are *no help*. Returns ``n``, ``binary``
    (agreement) and ``confusion`` ``{"helps" | "no help": {verdict: count}}``."""
    if not rows:
        raise DataError("no labelled answers to compare with")
    judge = judge or RefusalJudge()
    got = [judge.classify(r.response, r.prompt) for r in rows]
    confusion: dict[str, dict[str, int]] = {}
    for (gold, pred), n in sorted(Counter(("helps" if r.helps else "no help", g) for r, g in zip(rows, got)).items()):
        confusion.setdefault(gold, {})[pred] = n
    return {"n": len(rows), "binary": sum((g in HARMFUL_HELP) == r.helps for r, g in zip(rows, got)) / len(rows),
            "confusion": confusion}
