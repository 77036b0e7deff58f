"""The end-to-end run behind ``safeflow demo``: assets → extract → train → detect → steer → report.

:func:`run_demo` splits the prompts (:mod:`safeflow.splits`), trains the detectors and the
refusal polytope and builds the steerers with the recipes of :mod:`safeflow.recipes`, evaluates
steering and capability retention, and writes the run folder (:data:`RUN_FILES`) and its report
(:func:`safeflow.report.write_report`). :func:`clear_previous_run` guards a folder that holds a
previous run; :func:`environment` records versions and machine.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy
import torch

from . import __version__, kernels
from . import models as _models  # a module reference: load_model is looked up at call time
from .analysis import analyze_facets
from .capability import capability_retention, load_capability_task
from .constraints.base import ConstraintSet
from .data import PromptSet
from .errors import ConfigError
from .evaluation import evaluate_steering
from .extractors import HFExtractor
from .io import json_text, write_text_atomic
from .layers import find_decoder_layers
from .presets import preset as get_preset
from .presets import resolve_layer
from .provenance import describe_source
from .recipes import (DEMO_DETECTORS, DEMO_STEERERS, build_steerers, choose_gate, detection_scores, detection_table,
                      parse_steerer, train_constraints, train_refusal_polytope)
from .report import write_report
from .results import CapabilityEval, RunMetrics, SteeringEval
from .splits import prompt_splits
from .steerers.base import Steerer, SteeringData
from .steerers.fitted import FittedSteerer

log = logging.getLogger(__name__)


def run_demo(out_dir: str | Path, model_name: str = "smollm2-135m-instruct", preset_name: str | None = None,
             layer: int | None = None, limit: int | None = 50, max_new_tokens: int = 48,
             num_features: int | None = None, refusal_prompts: int = 240, refusal_features: int = 4096,
             refusal_rounds: int = 1, steerers: Sequence[str] = DEMO_STEERERS,
             first_n_tokens: int | None = None, capability_tasks: Sequence[str] = ("rho-gsm8k", "rho-factual"),
             capability_limit: int | None = 30, capability_max_new_tokens: int = 64, progress: bool = True,
             cache_dir: str | Path | None = None, data: str | PromptSet | None = None,
             trust_remote_code: bool = False, overwrite: bool = False,
             steerer_options: dict[str, dict[str, Any]] | None = None,
             detectors: Sequence[str] = DEMO_DETECTORS) -> RunMetrics:
    """Run the whole pipeline; write to ``out_dir``: ``metrics.json`` (every table, the facet
    analysis, capability retention, configuration, versions and machine), ``scores.json``
    (per-prompt detection scores), the steering and capability records of each steerer
    (``steering_records_<steerer>.jsonl``, ``capability_records_<steerer>.jsonl``), both polytopes,
    and the report (:func:`safeflow.report.write_report`: ``report.html``, ``report.md``, ``figures/``).

    Detection: each of ``detectors`` (constraint families by registry name, each fitted with the
    preset's settings by :func:`~safeflow.recipes.train_constraints`) on prompt states of the train split, saved as
    ``<family>.safetensors``. Steering: a refusal
    polytope (``refusal_features`` wide, ``refusal_rounds`` rounds) on response states of
    ``refusal_prompts`` harmful train prompts, gated by the detector with the best OOD-validation
    F1 (:func:`~safeflow.recipes.choose_gate`), steered by each of ``steerers`` (registry names, each with its gate:
    :func:`~safeflow.recipes.parse_steerer`; every one built for the run by
    :meth:`~safeflow.steerers.Steerer.build` — a fitted peer from the train split's prompt states
    or the refusal polytope's response states — and saved as ``steerer_<entry>.safetensors``) for
    the first ``first_n_tokens`` generated tokens (None: all); ``limit`` caps the prompts per group in the
    (slow, generation-based) steering evaluation. ``layer`` defaults to the preset's. ``data``:
    the default prompts (None) or a user's prompt file / :class:`~safeflow.PromptSet`, split in
    distribution (:func:`~safeflow.splits.prompt_splits`). ``steerer_options``: constructor options of each steerer
    (by registry name), passed to its :meth:`~safeflow.steerers.Steerer.build`.

    Facets: :func:`~safeflow.analysis.analyze_facets` of the first of ``detectors`` whose family
    offers it (:attr:`~safeflow.constraints.ConstraintSet.facet_analysis`) on the unsafe
    in-distribution test prompts (their harm categories); ``metrics.json`` names it
    (``facets.model``); without such a family there is no facet analysis. Capability retention:
    :func:`~safeflow.capability.capability_retention` of each steerer on each of
    ``capability_tasks`` (prompts outside the training split, at most ``capability_limit``; an empty
    tuple or limit 0 skips it).

    An ``out_dir`` holding a previous run's files (:func:`run_files`) is refused before anything
    loads, unless ``overwrite``: then exactly those files are deleted first (logged, by name), so
    no record of the old run stays beside the new ones. Files of other commands (``safeflow
    attack``'s ``attack_report.json``, a benchmark's ``latency.json``) are kept and named.
    """
    config = {k: v for k, v in locals().items() if k not in ("out_dir", "progress", "cache_dir", "overwrite",
                                                              "steerer_options")}
    if steerer_options:
        config["steerer_options"] = steerer_options
    config["steerers"], config["capability_tasks"] = list(steerers), list(capability_tasks)
    config["detectors"] = list(detectors)
    families = {kind: ConstraintSet.implementation(kind) for kind in detectors}  # unknown names fail now
    if not families:
        raise ConfigError("no detector families; pass at least one registered constraint family as detectors")
    entries = {entry: parse_steerer(entry) for entry in steerers}
    for name, _ in entries.values():  # an unknown option fails now, not after the model has loaded
        Steerer.implementation(name).check_options((steerer_options or {}).get(name, {}))
    config["data"] = "default" if data is None else data if isinstance(data, str) else "PromptSet"
    out = Path(out_dir)
    clear_previous_run(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, tok = _models.load_model(model_name, progress=progress, trust_remote_code=trust_remote_code)
    p = get_preset(preset_name, model)
    layer = resolve_layer(p, len(find_decoder_layers(model))) if layer is None else layer
    splits = prompt_splits(data)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    ext = HFExtractor(model, tok, layer=layer, batch_size=16, progress=progress, cache_dir=cache_dir)
    feats = {name: (ext.extract(s.texts), s.y) for name, s in splits.parts().items()}
    timings["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    H, y = feats.pop("train")
    models = {kind: train_constraints(kind, H, y, preset_name, num_features, progress) for kind in families}
    source = describe_source(ext, model_name)
    for kind, detector in models.items():
        detector.provenance.update(source)
        detector.save(out / f"{kind}.safetensors")
    timings["train"] = time.perf_counter() - t
    detection = detection_table(models, feats)
    gate = choose_gate(detection)
    write_text_atomic(out / "scores.json", json_text(detection_scores(models, feats, splits)))
    faceted = next((kind for kind, cls in families.items() if cls.facet_analysis), None)
    facets = None if faceted is None else {
        "model": faceted, **analyze_facets(models[faceted], feats["test_id"][0], splits.test_id).to_dict()}

    t = time.perf_counter()
    harmful = splits.train.where(label=1).texts
    harmful = random.Random(0).sample(harmful, min(refusal_prompts, len(harmful)))
    refusal, states = train_refusal_polytope(ext, harmful, preset_name, refusal_features, rounds=refusal_rounds,
                                             progress=progress)
    refusal.provenance.update(source, rows="responses")
    refusal.save(out / "refusal_polytope.safetensors")
    timings["train_refusal"] = time.perf_counter() - t

    data_for_steerers = SteeringData(harmful=H[y == 1], harmless=H[y == 0], responses=states.H,
                                     response_labels=states.y, provenance=dict(source), preset=preset_name)
    built = build_steerers(list(entries), data_for_steerers, models[gate], steerer_options)
    for entry, (steerer, _) in built.items():
        if isinstance(steerer, FittedSteerer):
            steerer.save(out / f"steerer_{entry}.safetensors")

    groups = {k: v[:limit] if limit else v for k, v in splits.steering_groups().items()}
    steering: dict[str, SteeringEval] = {}
    unsteered, unsteered_cpu = None, None
    for name, (steerer, steer_gate) in built.items():
        t = time.perf_counter()
        result = evaluate_steering(model, tok, refusal, steerer, layer,
                                   harmful=groups["harmful"], benign=groups["benign"], edgy=groups["edgy"],
                                   gate=steer_gate, first_n_tokens=first_n_tokens, max_new_tokens=max_new_tokens,
                                   unsteered=unsteered, unsteered_cpu_seconds=unsteered_cpu, progress=progress)
        unsteered, unsteered_cpu = result.unsteered, result.cpu_seconds["unsteered"]
        timings[f"steer_{name}"] = time.perf_counter() - t
        write_text_atomic(out / f"steering_records_{name}.jsonl", "\n".join(json_text(r) for r in result.records) + "\n")
        examples = [r for r in result.records if r["group"] == "harmful" and r["steered_tokens"]][:5]
        steering[name] = dataclasses.replace(result, unsteered=None, records=[], gate=entries[name][1],
                                             examples=examples)

    t = time.perf_counter()
    capability: dict[str, dict[str, CapabilityEval]] = {}
    tasks = [load_capability_task(n).without(splits.train.texts).head(capability_limit)
             for n in (capability_tasks if capability_limit != 0 else ())]
    plain: dict[str, Any] = {}
    for name, (steerer, steer_gate) in built.items():
        records = []
        for task in tasks:
            r = capability_retention(model, tok, refusal, steerer, layer, task.prompts,
                                     targets=task.targets, checker=task.checker, gate=steer_gate,
                                     first_n_tokens=first_n_tokens, max_new_tokens=capability_max_new_tokens,
                                     unsteered=plain.get(task.name), progress=progress)
            plain[task.name] = r.unsteered
            records += [{"task": task.name, **rec} for rec in r.records]
            capability.setdefault(name, {})[task.name] = dataclasses.replace(r, unsteered=None, records=[])
        if tasks:
            write_text_atomic(out / f"capability_records_{name}.jsonl", "\n".join(json_text(r) for r in records) + "\n")
    timings["capability"] = time.perf_counter() - t
    summary = RunMetrics(model=model_name, layer=layer, preset=p.to_dict(), config=config, environment=environment(),
                         splits=splits.describe(), data={k: v.summary() for k, v in splits.parts().items()},
                         detection=detection, gate=gate, refusal_states=states.counts(),
                         first_n_tokens=first_n_tokens, steering=steering, facets=facets, capability=capability,
                         timings_s=timings)
    write_text_atomic(out / "metrics.json", json_text(summary.to_json(), indent=2))
    write_report(out)
    return summary


#: The files :func:`run_demo` writes into its folder (glob patterns), besides each detector's
#: ``<family>.safetensors`` (:func:`run_files` lists those of every registered family).
RUN_FILES = ("metrics.json", "scores.json", "refusal_polytope.safetensors",
             "steering_records_*.jsonl", "capability_records_*.jsonl", "steerer_*.safetensors", "report.html", "report.md",
             "figures/*.png")
#: Files other commands put into a run folder for the report.
FOREIGN_FILES = ("attack_report.json", "attack_report.md", "attack_records.jsonl", "latency.json")


def run_files(out_dir: str | Path) -> list[Path]:
    """The files of a previous :func:`run_demo` in ``out_dir`` (:data:`RUN_FILES` and the
    ``<family>.safetensors`` of every registered constraint family), sorted."""
    out = Path(out_dir)
    patterns = RUN_FILES + tuple(f"{kind}.safetensors" for kind in ConstraintSet.available())
    return sorted({f for pattern in patterns for f in out.glob(pattern) if f.is_file()})


def clear_previous_run(out_dir: str | Path, overwrite: bool) -> list[Path]:
    """Delete the files of a previous run in ``out_dir`` if ``overwrite``, else refuse
    (:class:`ConfigError` naming ``--overwrite``) if there are any; return the deleted files."""
    out = Path(out_dir)
    old = run_files(out)
    if not old:
        return []
    names = ", ".join(str(f.relative_to(out)) for f in old[:6]) + (f" and {len(old) - 6} more" if len(old) > 6 else "")
    if not overwrite:
        raise ConfigError(f"{out} holds a previous run ({names}); pass --overwrite (overwrite=True) to delete those "
                          "files first, or choose another --out folder")
    for f in old:
        f.unlink()
    kept = [name for name in FOREIGN_FILES if (out / name).is_file()]
    log.warning("deleted the previous run's %d file(s) in %s: %s%s", len(old), out,
                ", ".join(str(f.relative_to(out)) for f in old),
                f"; kept {', '.join(kept)} (written by other commands: delete them if they belong to the old run)"
                if kept else "")
    return old


def environment() -> dict[str, Any]:
    """Versions and machine, for the report."""
    import transformers  # local: transformers is a heavy import, needed here only for its version

    cuda = torch.cuda.is_available()
    return {"safeflow": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "kernels": kernels.available()}
