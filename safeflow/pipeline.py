"""The end-to-end job behind ``safeflow demo``: assets → extract → train → detect → steer → report.

Splits of the default prompts (labels: 1 = unsafe):

* **train sources**: AdvBench, StrongREJECT, GSM8K and the two project-written benign sets,
  split 70/30 (stratified by source and label) into *train* and an *in-distribution test*;
* **OOD validation**: ``rho-refusal-50`` — used only to choose settings (layer, margin);
* **OOD test**: ``rho-refusal-100`` (paired harmful/benign questions) and ``rho-overrefusal``
  (benign but edgy) — sources never seen in training and never used for choices.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .constraints.base import ConstraintSet
from .data import PromptSet, load_prompts, source_split, stratified_split
from .evaluation import detection_metrics, evaluate_steering
from .extractors import HFExtractor
from .io import json_text, write_text_atomic
from .layers import find_decoder_layers
from .presets import preset as get_preset
from .presets import resolve_layer
from .responses import ResponseStates, response_states
from .steerers.safeflow import SafeFlowSteerer

log = logging.getLogger(__name__)

OOD_VALIDATION_SOURCES = ("rho-refusal-50",)
OOD_TEST_SOURCES = ("rho-refusal-100", "rho-overrefusal")
CONSTRAINT_KINDS = ("polytope", "mlp", "linear")


@dataclass
class Splits:
    train: PromptSet
    test_id: PromptSet
    val_ood: PromptSet
    test_ood: PromptSet


def default_splits(data: PromptSet, seed: int = 0) -> Splits:
    rest, test_ood = source_split(data, OOD_TEST_SOURCES)
    rest, val_ood = source_split(rest, OOD_VALIDATION_SOURCES)
    train, test_id = stratified_split(rest, 0.3, seed)
    return Splits(train, test_id, val_ood, test_ood)


def train_constraints(kind: str, H: torch.Tensor, y: torch.Tensor, preset_name: str | None = None,
                      num_features: int = 16384, progress: bool = True) -> ConstraintSet:
    """Fit constraint set ``kind`` with the preset's settings (polytope: its facets and training options)."""
    p = get_preset(preset_name)
    if kind == "polytope":
        model = ConstraintSet.create("polytope", input_dim=H.shape[1], num_facets=p.num_facets, num_features=num_features)
        return model.fit(H, y, **p.fit_options(), progress=progress)
    return ConstraintSet.create(kind, input_dim=H.shape[1]).fit(H, y, progress=progress)


def train_refusal_polytope(extractor: HFExtractor, harmful: Sequence[str], preset_name: str | None = None,
                           num_features: int = 4096, max_tokens: int = 12,
                           progress: bool = True) -> tuple[ConstraintSet, ResponseStates]:
    """The steering constraint set: a polytope on :func:`~safeflow.responses.response_states` of
    ``harmful`` prompts — complying is unsafe, refusing is safe — with the preset's settings."""
    states = response_states(extractor, harmful, max_tokens=max_tokens, progress=progress)
    return train_constraints("polytope", states.H, states.y, preset_name, num_features, progress), states


def choose_gate(detection: list[dict[str, Any]]) -> str:
    """The detector to gate steering with: best F1 (then AUROC) on the OOD validation split."""
    rows = [r for r in detection if r["split"] == "val_ood"]
    return max(rows, key=lambda r: (r["f1"], r["auroc"]))["model"]


def detection_table(models: dict[str, ConstraintSet], sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, Any]]:
    """One row per (model, evaluation set) with :func:`detection_metrics`."""
    return [{"model": name, "split": split, **detection_metrics(y, m.score(H))}
            for name, m in models.items() for split, (H, y) in sets.items()]


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns`` (floats to 3 decimals)."""
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def layer_sweep(extractor: HFExtractor, splits: Splits, layers: list[int], kind: str = "linear",
                progress: bool = True) -> list[dict[str, Any]]:
    """Choose a layer by out-of-distribution validation: for each layer, fit ``kind`` on the train
    split and report F1 / FPR / AUROC on the OOD validation split (and, for reference only, the
    in-distribution test split). All layers come from one forward pass per batch."""
    names = ("train", "test_id", "val_ood")
    feats = {n: extractor.extract_layers(getattr(splits, n).texts, layers) for n in names}
    rows = []
    for j, layer in enumerate(layers):
        model = ConstraintSet.create(kind, input_dim=feats["train"].shape[2]).fit(
            feats["train"][:, j], splits.train.y, progress=False)
        row: dict[str, Any] = {"layer": layer}
        for n in names[1:]:
            m = detection_metrics(getattr(splits, n).y, model.score(feats[n][:, j]))
            row.update({f"{n}_f1": m["f1"], f"{n}_fpr": m["fpr"], f"{n}_auroc": m["auroc"]})
        rows.append(row)
    return rows


def run_demo(out_dir: str | Path, model_name: str = "smollm2-135m-instruct", preset_name: str | None = None,
             limit: int | None = 50, max_new_tokens: int = 48, num_features: int = 16384,
             refusal_prompts: int = 240, refusal_features: int = 4096, progress: bool = True,
             cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the whole pipeline, write ``report.md``, ``metrics.json`` and both polytopes to ``out_dir``.

    Detection: polytope / mlp / linear on prompt states of the train split. Steering: a refusal
    polytope (``refusal_features`` wide) on response states of ``refusal_prompts`` harmful train
    prompts, gated by the detector with the best OOD-validation F1 (:func:`choose_gate`);
    ``limit`` caps the prompts per group in the (slow, generation-based) steering evaluation.
    """
    from .models import load_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, tok = load_model(model_name, progress=progress)
    p = get_preset(preset_name, model)
    layer = resolve_layer(p, len(find_decoder_layers(model)))
    data = load_prompts("default")
    splits = default_splits(data)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    ext = HFExtractor(model, tok, layer=layer, batch_size=16, progress=progress, cache_dir=cache_dir)
    feats = {name: (ext.extract(s.texts), s.y) for name, s in vars(splits).items()}
    timings["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    H, y = feats.pop("train")
    models = {kind: train_constraints(kind, H, y, preset_name, num_features, progress) for kind in CONSTRAINT_KINDS}
    models["polytope"].save(out / "polytope.safetensors")
    timings["train"] = time.perf_counter() - t
    detection = detection_table(models, feats)
    gate = choose_gate(detection)

    t = time.perf_counter()
    harmful = splits.train.where(label=1).texts
    harmful = random.Random(0).sample(harmful, min(refusal_prompts, len(harmful)))
    refusal, states = train_refusal_polytope(ext, harmful, preset_name, refusal_features, progress=progress)
    refusal.save(out / "refusal_polytope.safetensors")
    timings["train_refusal"] = time.perf_counter() - t

    t = time.perf_counter()
    test = splits.test_ood
    cap = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
    steering = evaluate_steering(
        model, tok, refusal, SafeFlowSteerer(preset=preset_name or "default"), layer,
        harmful=cap(test.where(sources=["rho-refusal-100"], label=1).texts),
        benign=cap(test.where(sources=["rho-refusal-100"], label=0).texts),
        edgy=cap(test.where(sources=["rho-overrefusal"]).texts),
        gate=models[gate], max_new_tokens=max_new_tokens, progress=progress,
    )
    timings["steer"] = time.perf_counter() - t
    result = {"model": model_name, "layer": layer, "preset": p.to_dict(), "data": {k: v.summary() for k, v in vars(splits).items()},
              "detection": detection, "gate": gate, "refusal_states": states.counts(),
              "steering": {k: v for k, v in steering.items() if k != "records"}, "timings_s": timings}
    write_text_atomic(out / "metrics.json", json_text(result, indent=2))
    write_text_atomic(out / "steering_records.jsonl", "\n".join(json_text(r) for r in steering["records"]) + "\n")
    write_text_atomic(out / "report.md", render_report(result, steering["records"]))
    return result


def render_report(result: dict[str, Any], records: list[dict[str, Any]]) -> str:
    s = result["steering"]
    steer_rows = [
        {"metric": "harmful refusal rate, unsteered", "value": s["harmful_refusal_unsteered"]},
        {"metric": "harmful refusal rate, steered", "value": s["harmful_refusal_steered"]},
        {"metric": "harmful prompts steered (flagged by the detector)", "value": s["harmful_rows_steered"]},
        {"metric": "benign outputs token-for-token unchanged", "value": s["benign_unchanged"]},
        {"metric": "edgy (over-refusal) false refusals, unsteered", "value": s["edgy_false_refusal_unsteered"]},
        {"metric": "edgy (over-refusal) false refusals, steered", "value": s["edgy_false_refusal_steered"]},
    ]
    examples = [r for r in records if r["group"] == "harmful" and r["steered_tokens"]][:5]
    lines = [
        f"# safeflow report — {result['model']}, layer {result['layer']}", "",
        "Labels: 1 = unsafe (positive class), 0 = safe. OOD sets come from sources never seen in training.", "",
        "## Detection", "",
        format_table(result["detection"], ["model", "split", "n", "accuracy", "precision", "recall", "f1", "fpr", "auroc"]),
        "", "## Steering (SafeFlow, greedy decoding)", "",
        "Steered into a refusal polytope (response states of harmful training prompts: "
        f"{result['refusal_states']}), gated by the `{result['gate']}` detector (best F1 on the OOD "
        "validation split).", "",
        f"Prompts: {s['counts']}", "", format_table(steer_rows, ["metric", "value"]), "",
        "Steering log: " + json.dumps({k: v for k, v in s["steering"].items() if k != "steered_tokens_per_row"}), "",
        "### Examples (harmful prompts that were steered)", "",
    ]
    for r in examples:
        lines += [f"**Prompt:** {r['prompt']}", "", f"- unsteered: {r['unsteered'][:300]!r}", f"- steered: {r['steered'][:300]!r}", ""]
    lines += ["Timings (s): " + json.dumps({k: round(v, 1) for k, v in result["timings_s"].items()}), ""]
    return "\n".join(lines)
