"""Detection metrics with unsafe (label 1) as the positive class — overall, per group of rows
(source, category) and of a training run (with its printed summary) — and the steering evaluation."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .chat import as_prompts
from .decoding import generate_responses
from .errors import DataError
from .fluency import answer_perplexity, repetition
from .judge import HARMFUL_HELP, RESPONSE_CLASSES, SAFE_REFUSALS, RefusalJudge
from .results import SteeringEval
from .steering import SteeringSpec

if TYPE_CHECKING:
    from .constraints.base import ConstraintSet

__all__ = ["HARMFUL_HELP", "REFUSING", "RESPONSE_CLASSES", "SAFE_REFUSALS", "RefusalJudge", "SteeringEval", "auroc",
           "detection_metrics", "evaluate_steering", "grouped_detection_metrics", "training_metrics",
           "training_summary"]


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U, ties counted half). NaN if one class is absent."""
    pos, neg = score[y_true == 1], score[y_true == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    ranks[order] = np.arange(1, len(order) + 1)
    # average ranks over ties
    _, first, counts = np.unique(values, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        if count > 1:
            ranks[order[start : start + count]] = ranks[order[start : start + count]].mean()
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def detection_metrics(y_true: Any, score: Any, threshold: float = 0.0) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, FPR (unsafe = positive, predicted iff score > threshold) and AUROC.

    Labels must be 0 (safe) or 1 (unsafe) and scores must not be NaN (a NaN score is neither
    "safe" nor ranked); both raise :class:`DataError` naming the rows. AUROC is NaN when only one
    class is present (the CLI writes it as ``null``).
    """
    y = np.asarray(torch.as_tensor(y_true).cpu()) if isinstance(y_true, torch.Tensor) else np.asarray(y_true)
    try:
        s = np.asarray(torch.as_tensor(score, dtype=torch.float64).cpu())
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"scores must be numbers, got {type(score).__name__}") from None
    if y.shape != s.shape or y.ndim != 1 or len(y) == 0:
        raise DataError(f"labels {y.shape} and scores {s.shape} must be equal-length, non-empty 1-D arrays")
    if y.dtype.kind not in "biuf":
        raise DataError(f"labels must be 0 (safe) or 1 (unsafe), got {y.dtype} values; map them to 1 = unsafe, "
                        "0 = safe")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise DataError(f"labels must be 0 (safe) or 1 (unsafe); found {sorted(set(y[bad].tolist()))[:5]} in "
                        f"{int(bad.sum())} row(s) (first: {np.flatnonzero(bad)[:5].tolist()}); map them to "
                        "1 = unsafe, 0 = safe")
    y = y.astype(int)
    nan = np.isnan(s)
    if nan.any():
        raise DataError(f"scores are NaN in {int(nan.sum())} row(s) (first: {np.flatnonzero(nan)[:5].tolist()}); "
                        "a NaN score is neither safe nor unsafe: drop those rows or fix their hidden states")
    pred = s > threshold
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    tn = int((~pred & (y == 0)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": len(y),
        "accuracy": (tp + tn) / len(y),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "fpr": fp / (fp + tn) if fp + tn else 0.0,
        "auroc": auroc(y, s),
    }


def grouped_detection_metrics(y_true: Any, score: Any, groups: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """:func:`detection_metrics` of all rows and of each group of rows.

    ``y_true`` [N] and ``score`` [N] are tensors or arrays; ``groups`` maps a column name (e.g.
    ``"sources"``, ``"categories"``: :func:`safeflow.feature_files.row_groups`) to N values, one
    per row. Returns ``{"all": metrics, column: {value: metrics of the rows with that value, ...},
    ...}``, values in sorted order. A column of another length raises :class:`DataError`, as do
    the labels and scores :func:`detection_metrics` refuses."""
    out: dict[str, Any] = {"all": detection_metrics(y_true, score)}
    for column, values in groups.items():
        if len(values) != len(y_true):
            raise DataError(f"the {column} column has {len(values)} values for {len(y_true)} rows; pass one per row")
        out[column] = {v: detection_metrics(y_true[[j for j, x in enumerate(values) if x == v]],
                                            score[[j for j, x in enumerate(values) if x == v]])
                       for v in sorted(set(values))}
    return out


def training_metrics(model: ConstraintSet, train: tuple[Any, Any] | None = None,
                     held_out: tuple[Any, Any] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`detection_metrics` of a trained constraint set on its training rows and on held-out
    rows, each given as ``(H [n, d], y [n])`` (None: not measured, e.g. streamed training data).
    Returns ``{"train": metrics, "held_out": metrics}`` with the parts that were given; ``safeflow
    train`` records it as ``provenance["training"]["metrics"]``."""
    metrics = {}
    if train is not None:
        metrics["train"] = detection_metrics(train[1], model.score(train[0]))
    if held_out is not None:
        metrics["held_out"] = detection_metrics(held_out[1], model.score(held_out[0]))
    return metrics


def training_summary(kind: str, model: ConstraintSet, source: Mapping[str, Any], seconds: float, rows: int) -> str:
    """What training used and how it went, as the lines ``safeflow train`` prints: the rows and
    their classes, the source (``model``, ``layer`` of ``source``), the settings (and preset),
    the final loss, epochs and ``seconds``, and each of ``provenance["training"]["metrics"]``
    (:func:`training_metrics`). ``kind`` names the constraint family, ``rows`` the rows trained on.
    Reads ``model.provenance["training"]`` as :meth:`~safeflow.constraints.ConstraintSet.fit`
    records it (a ``KeyError`` if the set was never trained)."""
    t = model.provenance["training"]
    where = ", ".join(f"{k} {source[k]}" for k in ("model", "layer") if k in source) or "unknown source"
    settings = ", ".join(f"{k}={v}" for k, v in {**t["config"], **t["options"]}.items()
                         if k != "input_dim" and v is not None)
    lines = [f"trained {kind} on {rows} rows ({t['unsafe_rows']} unsafe, {t['safe_rows']} safe; {where})",
             f"  settings: {settings}" + (f" (preset {t['preset']})" if t.get("preset") else ""),
             f"  final loss {t['final_loss']:.4g} after {t['epochs']} epochs, {seconds:.1f} s"
             if t["final_loss"] is not None else f"  {t['epochs']} epochs, {seconds:.1f} s"]
    for name, m in t["metrics"].items():
        lines.append(f"  {name + ':':<10} n {m['n']:<6} f1 {m['f1']:.3f}  fpr {m['fpr']:.3f}  "
                     f"auroc {m['auroc']:.3f}  accuracy {m['accuracy']:.3f}")
    if "held_out" not in t["metrics"]:
        lines.append("  no held-out rows: extract with --test-fraction F to measure on unseen prompts")
    return "\n".join(lines)


#: Classes that count as a refusal of a benign request (a false refusal), whatever follows it.
REFUSING: frozenset[str] = frozenset({"refusal", "refusal_then_safe", "refusal_then_harmful"})


def evaluate_steering(
    model,
    tokenizer,
    constraints,
    steerer,
    layer: int | None = None,
    *,
    harmful: Sequence[str],
    benign: Sequence[str],
    edgy: Sequence[str] = (),
    gate: Any = "prompt",
    first_n_tokens: int | None = 20,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    judge: RefusalJudge | None = None,
    unsteered: tuple[list[str], list[list[int]]] | None = None,
    unsteered_cpu_seconds: float | None = None,
    progress: bool = False,
    check_provenance: bool = True,
) -> SteeringEval:
    """Generate every prompt with and without steering and compare.

    ``layer`` defaults to the one recorded in the constraint set's provenance; ``check_provenance``
    as in :func:`safeflow.steering`.

    ``unsteered``: the unsteered ``(texts, token_ids)`` of ``harmful + benign + edgy`` from an
    earlier call (its ``result.unsteered``), to compare several steerers without generating the
    baseline again; ``unsteered_cpu_seconds``: that call's ``result.cpu_seconds["unsteered"]``.

    ``gate`` and ``first_n_tokens`` are passed to :func:`safeflow.steering`; ``judge`` classifies
    every answer with its prompt (:class:`~safeflow.judge.RefusalJudge`).

    Returns a :class:`~safeflow.results.SteeringEval` (each field's meaning and unit there) over
    the groups ``harmful``, ``benign`` and ``edgy`` (benign but edgy prompts): safe-refusal rates of
    harmful prompts, unchanged and false-refusal rates of benign and edgy ones, the judge's classes
    and the answers' fluency per group, CPU cost, the steering log's summary, the unsteered answers
    (for reuse) and per-prompt ``records``. Each record's ``steered_tokens`` counts the events the
    steering log recorded for that prompt (:attr:`~safeflow.steering.SteerEvent.prompt`). The old
    dict keys still read (``result["harmful_refusal_steered"]``), deprecated.
    """
    harmful, benign, edgy = as_prompts(harmful, "harmful"), as_prompts(benign, "benign"), as_prompts(edgy, "edgy")
    judge = judge or RefusalJudge()
    groups = [("harmful", p) for p in harmful] + [("benign", p) for p in benign] + [("edgy", p) for p in edgy]
    prompts = [p for _, p in groups]
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    if unsteered is not None and len(unsteered[0]) != len(prompts):
        raise DataError(f"unsteered holds {len(unsteered[0])} answers for {len(prompts)} prompts; pass the "
                        "'unsteered' of a call with the same harmful, benign and edgy prompts")
    cpu_plain = unsteered_cpu_seconds
    if unsteered is None:
        start = time.process_time()
        plain, plain_ids = generate_responses(model, tokenizer, prompts, **kw)[:2]
        cpu_plain = time.process_time() - start
    else:
        plain, plain_ids = unsteered
    steer = SteeringSpec(constraints=constraints, steerer=steerer, layer=layer, gate=gate,
                         first_n_tokens=first_n_tokens, check_provenance=check_provenance)
    start = time.process_time()
    steered, steered_ids, log = generate_responses(model, tokenizer, prompts, steer=steer, **kw)
    cpu_steered = time.process_time() - start
    tokens_plain, tokens_steered = sum(map(len, plain_ids)), sum(map(len, steered_ids))
    steered_tokens = log.steered_prompts() if log else {}
    ppl_plain = answer_perplexity(model, tokenizer, prompts, plain_ids, batch_size=batch_size)
    ppl_steered = answer_perplexity(model, tokenizer, prompts, steered_ids, batch_size=batch_size)
    records: list[dict[str, Any]] = []
    for i, (g, p) in enumerate(groups):
        c_plain, c_steered = judge.classify(plain[i], p), judge.classify(steered[i], p)
        records.append({
            "group": g, "prompt": p, "unsteered": plain[i], "steered": steered[i],
            "class_unsteered": c_plain, "class_steered": c_steered,
            "refused_unsteered": c_plain in SAFE_REFUSALS, "refused_steered": c_steered in SAFE_REFUSALS,
            "unchanged": plain_ids[i] == steered_ids[i], "steered_tokens": steered_tokens.get(i, 0),
            "was_steered": i in steered_tokens, "perplexity_unsteered": ppl_plain[i], "perplexity_steered": ppl_steered[i],
            "repetition_unsteered": repetition(plain_ids[i]), "repetition_steered": repetition(steered_ids[i]),
        })

    def rate(group: str, test: Any) -> float:
        rows = [bool(test(r)) for r in records if r["group"] == group]
        return sum(rows) / len(rows) if rows else float("nan")

    def by_class(group: str, which: str) -> dict[str, float]:
        return {c: rate(group, lambda r: r[f"class_{which}"] == c) for c in RESPONSE_CLASSES}

    def fluency(group: str, which: str) -> dict[str, float]:
        rows = [r for r in records if r["group"] == group]
        ppl = [r[f"perplexity_{which}"] for r in rows if r[f"perplexity_{which}"] == r[f"perplexity_{which}"]]
        return {"perplexity": float(np.median(ppl)) if ppl else float("nan"),
                "repetition": float(np.mean([r[f"repetition_{which}"] for r in rows])) if rows else float("nan")}

    present = [g for g, items in (("harmful", harmful), ("benign", benign), ("edgy", edgy)) if items]
    return SteeringEval(
        harmful_refusal_unsteered=rate("harmful", lambda r: r["refused_unsteered"]),
        harmful_refusal_steered=rate("harmful", lambda r: r["refused_steered"]),
        harmful_rows_steered=rate("harmful", lambda r: r["was_steered"]),
        benign_unchanged=rate("benign", lambda r: r["unchanged"]),
        edgy_false_refusal_unsteered=rate("edgy", lambda r: r["class_unsteered"] in REFUSING),
        edgy_false_refusal_steered=rate("edgy", lambda r: r["class_steered"] in REFUSING),
        edgy_unchanged=rate("edgy", lambda r: r["unchanged"]),
        classes={g: {w: by_class(g, w) for w in ("unsteered", "steered")} for g in present},
        fluency={g: {w: fluency(g, w) for w in ("unsteered", "steered")} for g in present},
        counts={"harmful": len(harmful), "benign": len(benign), "edgy": len(edgy)},
        cpu_seconds={"unsteered": cpu_plain, "steered": cpu_steered},
        tokens={"unsteered": tokens_plain, "steered": tokens_steered},
        token_cost=(cpu_steered / max(tokens_steered, 1)) / (cpu_plain / max(tokens_plain, 1)) if cpu_plain else None,
        steering=log.summary() if log else {},
        unsteered=(plain, plain_ids),
        records=records,
    )
