"""Training recipes: the steps from hidden states (or a model and prompts) to fitted constraint
sets and built steerers, with a model preset's settings — what ``safeflow train``, ``sweep``,
``generate``, ``demo`` and ``attack`` run.

* constraint sets: :func:`fit_from_preset` (one family, the preset's shape and training options),
  :func:`train_constraints`, the steering polytope on response states
  (:func:`train_refusal_polytope`) and the per-layer probe of :func:`layer_sweep`;
* detection: :func:`detection_table`, :func:`detection_scores` and the gate they choose
  (:func:`choose_gate`);
* steerers: entries ``name[@gate]`` (:func:`parse_steerer`, :func:`build_steerers`) and one
  steerer from a name or a saved file (:func:`build_steerer`, :func:`load_or_build_steerer`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .constraints.base import ConstraintSet
from .errors import ConfigError
from .evaluation import detection_metrics
from .extractors import HFExtractor
from .features import FeatureDataset
from .presets import ModelPreset
from .presets import preset as get_preset
from .provenance import describe_source
from .responses import ResponseStates, response_states, steered_states
from .results import DetectionRow
from .splits import Splits
from .steerers.base import Steerer, SteeringData
from .steerers.fitted import FittedSteerer
from .steerers.safeflow import SafeFlowSteerer
from .steering import SteeringSpec

#: The detector families ``safeflow demo`` trains and compares by default (registry names).
DEMO_DETECTORS = ("polytope", "mlp", "linear")
#: Deprecated alias of :data:`DEMO_DETECTORS`.
CONSTRAINT_KINDS = DEMO_DETECTORS


def fit_from_preset(kind: str, H: torch.Tensor | FeatureDataset, y: torch.Tensor | None = None,
                    preset: ModelPreset | str | None = None, *, config: Mapping[str, Any] | None = None,
                    fit_options: Mapping[str, Any] | None = None, progress: bool = True) -> ConstraintSet:
    """Fit the constraint set registered as ``kind`` on hidden states ``H`` [N, d] with labels ``y``
    [N] (1 = unsafe), or on a streamed :class:`~safeflow.features.FeatureDataset` (``y`` None),
    with a model preset's settings (a :class:`~safeflow.presets.ModelPreset` or its name; None:
    the relative default).

    Its shape comes from :meth:`~safeflow.constraints.ConstraintSet.from_preset`, ``config``
    (constructor arguments such as ``num_facets``) taking precedence — one the family's
    constructor does not take raises :class:`ConfigError` naming the valid ones; its training
    options from :meth:`~safeflow.constraints.ConstraintSet.fit_options_from_preset`, updated by
    ``fit_options`` (an unknown one raises :class:`ConfigError` before anything is trained;
    ``progress`` there overrides the argument). This is what ``safeflow train`` runs."""
    cls = ConstraintSet.implementation(kind)
    p = preset if isinstance(preset, ModelPreset) else get_preset(preset)
    dim = H.dim if isinstance(H, FeatureDataset) else H.shape[1]
    model = cls.from_preset(p, dim, **(config or {}))
    return model.fit(H, y, **{**cls.fit_options_from_preset(p), "progress": progress, **(fit_options or {})})


def train_constraints(kind: str, H: torch.Tensor, y: torch.Tensor, preset_name: str | None = None,
                      num_features: int | None = None, progress: bool = True, *,
                      fit_options: dict[str, Any] | None = None, **overrides: Any) -> ConstraintSet:
    """Fit the constraint set registered as ``kind`` with the preset's settings
    (:func:`fit_from_preset`): ``overrides`` are constructor arguments that take precedence over
    the preset's, ``num_features`` the feature-map width of a family that has one (ignored by the
    others), ``fit_options`` training options that update the preset's."""
    if num_features is not None and "num_features" in ConstraintSet.implementation(kind).constructor_options():
        overrides.setdefault("num_features", num_features)
    return fit_from_preset(kind, H, y, preset_name, config=overrides, fit_options=fit_options, progress=progress)


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
        steer = SteeringSpec(constraints=polytope, steerer=steerer or SafeFlowSteerer(preset=preset_name or "default"),
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
    """One :class:`~safeflow.results.DetectionRow` per (model, evaluation set) with
    :func:`~safeflow.detection_metrics`."""
    return [DetectionRow(model=name, split=split, **detection_metrics(y, m.score(H)))
            for name, m in models.items() for split, (H, y) in sets.items()]


def detection_scores(models: dict[str, ConstraintSet], sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     splits: Splits) -> dict[str, Any]:
    """Per-prompt scores (the largest violation, > 0 = unsafe) of every model on every evaluation
    set, with the labels and sources: what the report's ROC curves and histograms are drawn from."""
    return {"labels": {name: y.tolist() for name, (_, y) in sets.items()},
            "sources": {name: getattr(splits, name).sources for name in sets},
            "scores": {m: {name: [round(float(v), 6) for v in model.score(H)] for name, (H, _) in sets.items()}
                       for m, model in models.items()}}


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


def build_steerer(name: str, preset_name: str | None = None, options: Mapping[str, Any] | None = None) -> Steerer:
    """Registered steerer ``name`` without learned tensors: its constructor's ``options`` (an
    unknown one raises :class:`ConfigError` naming the valid ones) over its settings in the preset
    ``preset_name`` (:meth:`~safeflow.steerers.Steerer.from_preset`; None: the constructor's
    defaults). A fitted steerer (a
    :class:`~safeflow.steerers.FittedSteerer`, which learns tensors from hidden states) raises
    :class:`ConfigError`: build it with :meth:`~safeflow.steerers.Steerer.build`, or load a saved one."""
    cls = Steerer.implementation(name)
    if issubclass(cls, FittedSteerer):
        raise ConfigError(f"the {name!r} steerer learns tensors from hidden states: pass a saved one with --steerer "
                          f"FILE (`safeflow demo` writes steerer_{name}.safetensors into its run folder)")
    options = dict(options or {})
    if preset_name is not None:
        return cls.from_preset(preset_name, **options)
    cls.check_options(options)
    return cls(**options)


def steerer_name(source: str | os.PathLike[str] | None, preset_name: str | None = None) -> str | None:
    """The registered steerer that ``source`` names: ``source`` itself, or the preset's steerer for
    None; None where ``source`` is a saved steerer file (:func:`load_or_build_steerer`)."""
    if source is not None and Path(source).is_file():
        return None
    return str(source) if source is not None else get_preset(preset_name).steerer


def load_or_build_steerer(source: str | os.PathLike[str] | None, preset_name: str | None = None,
                          options: Mapping[str, Any] | None = None) -> Steerer:
    """The steerer of ``safeflow generate``: a saved fitted steerer file
    (:meth:`~safeflow.steerers.Steerer.load`; it carries its own options, so ``options`` must be
    empty), else the registered steerer :func:`steerer_name` names (None: the preset's own
    steerer) built with the preset's settings and ``options`` by :func:`build_steerer`. Raises
    :class:`ConfigError`."""
    name = steerer_name(source, preset_name)
    if name is not None:
        return build_steerer(name, preset_name, options)
    if options:
        raise ConfigError("--steerer-opt sets a registered steerer's options; a saved steerer file carries its own")
    assert source is not None  # steerer_name is None only for an existing file
    return Steerer.load(source)
