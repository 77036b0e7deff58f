"""How far to trust a judge: its agreement with answers labelled by hand.

A labels file is JSON Lines, one answer per line with at least ``prompt``, ``response`` and
``label`` (one of :data:`~safeflow.judge.RESPONSE_CLASSES`), optionally ``id`` and ``split``
(``dev`` / ``held-out``); ``tests/data/judge_labels.jsonl`` is the project's own.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CorruptFileError, DataError
from .judge import RESPONSE_CLASSES, SAFE_REFUSALS, RefusalJudge


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
