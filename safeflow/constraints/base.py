"""The ``ConstraintSet`` interface: a learned set of constraints ``v(h) <= 0`` on hidden states.

A constraint set maps hidden states ``H`` [N, d] to violations ``V`` [N, K]; a row is **unsafe
(label 1) iff any** ``V[i, k] > 0`` and safe (label 0) otherwise. Every implementation is a
``torch.nn.Module`` whose violations are differentiable in ``H``, so any steerer works with any
constraint set. Saved files are one safetensors file with a JSON header — never pickle.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..checks import as_features, as_labels, check_device, check_positive_int, check_states
from ..errors import ConfigError, CorruptFileError, DataError
from ..features import FeatureDataset, Moments
from ..io import FLOAT_DTYPES, TensorSpec, load_tensors, read_header, save_tensors, short_repr
from ..presets import ModelPreset, PresetConfigured
from .training import COMMON_FIT_OPTION_RULES, Rule, training_data, validate_fit_options

log = logging.getLogger(__name__)

FORMAT_VERSION = 4
#: Older formats that still load: version 2 lacks ``safe_depth`` (loaded as :data:`UNKNOWN_DEPTH`),
#: versions 2 and 3 lack ``class_means`` (loaded as zeros: unknown).
READABLE_VERSIONS = (2, 3, 4)
#: ``safe_depth`` of a constraint set that has not measured it (unfitted, or saved in format 2).
UNKNOWN_DEPTH = -1.0

#: Facet weights [N, K] for a vector-Jacobian product, or a function of the violations V [N, K].
Weights = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

#: Largest magnitude a constraint set's parameter may hold (checked at the end of ``fit`` and by
#: ``load``). With states of the size real residual streams have (|h| up to about 1e5) and widths
#: d, F up to about 1e4, violations ``Φ·ReLU(W h + b) − ξ`` then stay below 1e37, inside float32
#: (3.4e38); larger weights make every violation inf, so everything is flagged and nothing steers.
MAX_PARAM = 1e12


def provenance_problem(provenance: Any) -> str | None:
    """What is wrong with a ``provenance`` value (None if nothing): it must be a dict of JSON
    values whose ``layer``, if present, is an int (not a bool). :meth:`ConstraintSet.save` and
    :meth:`ConstraintSet.load` apply the same rules, so a saved file always loads."""
    if not isinstance(provenance, dict):
        return f"provenance must be a dict, got {type(provenance).__name__}"
    try:
        json.dumps(provenance, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"provenance must hold JSON values (str, numbers, lists, dicts) only: {exc}"
    layer = provenance.get("layer")
    if not (layer is None or type(layer) is int):
        return f"provenance['layer'] must be an int (the decoder block read), got {short_repr(layer)}"
    return None


class ConstraintSet(PresetConfigured, nn.Module, ABC, kind="constraint set"):
    """Learned constraints on hidden states. Labels: 1 = unsafe, 0 = safe.

    Subclasses implement ``violations``, ``config`` and the training hook ``_train``; everything
    else is shared. :meth:`fit` is one template for every family: it checks the options (names
    against ``_train``'s keyword-only parameters, values against :meth:`option_rules`) and the
    data, trains a copy, records what training learnt and swaps it in. A family declares rules for
    its own options in its class body (``fit_option_rules = {"init": one_of(INITS)}``; merged along
    the MRO). A family with per-model settings declares their dataclass (``settings_type``, whose
    fields are constructor arguments and fit options) and its values per preset
    (``preset_settings``, see :class:`~safeflow.presets.PresetConfigured`); :meth:`from_preset`
    builds it with them (:meth:`config_from_preset`, :meth:`fit_options_from_preset`). ``fit`` also
    records, saved with the parameters:

    * ``input_covariance`` [d, d], the covariance of the training rows, which
      ``SafeFlowSteerer(precondition="covariance")`` and the projection steerer's covariance
      metric use;
    * ``safe_depth`` [], the typical depth of the safe training rows inside the set — the median
      of ``max(0, −max_k v_k(h))`` over them — the unit in which steering depths are given, so the same
      setting means the same thing on any model, layer or constraint set (see
      :meth:`calibrate_depth`);
    * ``class_means`` [2, d], the mean of the safe (row 0) and of the unsafe (row 1) training rows
      (zeros: unknown), whose difference is the direction line steering moves along
      (:class:`~safeflow.steerers.LineSteerer`; see :meth:`record_class_means`);
    * ``train_history``: the mean training loss of each epoch (a list of floats; not saved);
    * ``provenance["training"]``: the fit's settings, epochs, rows and final loss (saved).

    ``provenance`` (a JSON-serialisable dict, saved in the file header) also records where the
    training states came from — model, layer, pooling, chat template — when the caller sets it:
    ``poly.provenance.update(sf.describe_source(extractor))`` (see :mod:`safeflow.provenance`).
    """

    #: Rules for ``fit`` options (name -> rule returning None or what the value must be), declared
    #: per class and merged along the MRO by :meth:`option_rules`; the base holds the common ones
    #: (:data:`~safeflow.constraints.training.COMMON_FIT_OPTION_RULES`).
    fit_option_rules: ClassVar[Mapping[str, Rule]] = COMMON_FIT_OPTION_RULES

    #: Whether each column of :meth:`violations` is a facet worth interpreting one by one — which
    #: facets fire for which harm category (:func:`~safeflow.analysis.analyze_facets`; the demo runs
    #: it on the first detector family that sets this). False for single-score families.
    facet_analysis: ClassVar[bool] = False

    input_dim: int
    num_constraints: int
    fitted: torch.Tensor
    input_covariance: torch.Tensor
    safe_depth: torch.Tensor
    class_means: torch.Tensor

    def __init__(self, input_dim: int) -> None:
        nn.Module.__init__(self)
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("input_covariance", torch.zeros(input_dim, input_dim))
        self.register_buffer("safe_depth", torch.tensor(UNKNOWN_DEPTH))
        self.register_buffer("class_means", torch.zeros(2, input_dim))
        self.provenance: dict[str, Any] = {}

    # --- what an implementation provides -------------------------------------------------
    @abstractmethod
    def violations(self, H: torch.Tensor) -> torch.Tensor:
        """Violations V [N, K] of hidden states H [N, d]; unsafe iff any V > 0. Differentiable."""

    def _train(self, data: FeatureDataset, stats: Moments, *, progress: bool) -> list[float]:
        """Train this set's parameters in place on ``data`` (``stats``: its float64 moments, on the
        parameters' device) and return the mean training loss of each epoch (may be empty).

        A family adds its training options as keyword-only parameters with defaults: their names
        are the options ``fit`` accepts, their defaults the family's (:meth:`fit_defaults`).
        Called by :meth:`fit` on a fresh copy (never on the caller's set), with every option filled
        in and checked (:meth:`option_rules`), after ``torch.manual_seed(seed)``
        when the family has a ``seed`` option. The parameters it leaves must act on raw hidden states."""
        raise NotImplementedError(f"{type(self).__name__} cannot be trained: implement its _train hook (or, as before "
                                  "the template, override fit)")

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this object's shape (saved in the JSON header): the
        positional-or-keyword ones only; keyword-only arguments are runtime options (``backend``),
        never saved, and ``load`` refuses a header that holds them."""

    # --- the training template and presets ------------------------------------------------
    def fit(self, H: Any, y: Any = None, **options: Any) -> ConstraintSet:
        """Learn the constraints from hidden states H [N, d] and labels y [N] (1 = unsafe, 0 = safe),
        or from a :class:`~safeflow.features.FeatureDataset` passed as ``H`` (streamed; ``y`` None).

        ``options`` are the family's training settings (:meth:`fit_defaults` lists them with their
        defaults; ``progress=False`` hides the progress bar); an unknown name or a bad value raises
        :class:`ConfigError` before anything is trained. Returns self, fitted (its parameters act on
        raw, unstandardised hidden states), with ``input_covariance``, ``safe_depth``,
        ``class_means``, ``train_history`` and ``provenance["training"]`` recorded.

        Transactional: training runs on a copy whose values are swapped in only on success, so a
        fit that raises (bad input, bad option, a diverging loss, an interrupt) leaves this set
        exactly as it was — a fitted set stays fitted, bit for bit.
        """
        progress = options.pop("progress", True)
        defaults = self.fit_defaults()
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ConfigError(f"unknown fit option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                              f"for the {self.registered_name or type(self).__name__!r} constraint set; valid: "
                              f"{', '.join(defaults) or '(none)'}, progress")
        options = {**defaults, **options}
        validate_fit_options(self, **options)
        data = training_data(H, y, self.input_dim)
        work = self._fit_copy()
        if "seed" in options:
            torch.manual_seed(options["seed"])
        stats = data.moments(next(work.parameters()).device)
        work.train_history = work._train(data, stats, progress=progress, **options)
        work._record_fit(data, stats.covariance(), options)
        self._adopt(work)
        return self

    @classmethod
    def fit_defaults(cls) -> dict[str, Any]:
        """The options :meth:`fit` accepts (besides ``progress``) and their defaults: the keyword-only
        parameters of the family's ``_train``, in order."""
        return {name: p.default for name, p in inspect.signature(cls._train).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "progress"}

    @classmethod
    def option_rules(cls) -> dict[str, Rule]:
        """The rules ``fit`` checks its options with: every class's ``fit_option_rules`` along the MRO,
        a subclass's rule replacing its base's for the same name."""
        rules: dict[str, Rule] = {}
        for klass in reversed(cls.__mro__):
            rules.update(vars(klass).get("fit_option_rules", {}))
        return rules

    @classmethod
    def from_preset(cls, preset: ModelPreset | str | None, input_dim: int, **overrides: Any) -> ConstraintSet:
        """A new, unfitted set of this family shaped by a model preset (a :class:`~safeflow.presets.ModelPreset`
        or its name, see :func:`safeflow.presets.preset`): ``cls(input_dim, **config)`` with the
        constructor arguments of :meth:`config_from_preset`, ``overrides`` taking precedence. An
        override the constructor does not take raises :class:`ConfigError` naming the valid ones."""
        cls.check_options(overrides)
        return cls(input_dim=input_dim, **{**cls.config_from_preset(preset), **overrides})

    @classmethod
    def config_from_preset(cls, preset: ModelPreset | str | None) -> dict[str, Any]:
        """Constructor arguments (besides ``input_dim``) taken from a model preset (or its name): the
        fields of the family's settings in it (:meth:`~safeflow.presets.PresetConfigured.settings_from_preset`)
        that its constructor takes — the polytope's facets and feature-map width; {} where the preset
        holds no settings for the family (its constructor's defaults apply)."""
        options = cls.constructor_options()
        return {k: v for k, v in cls.preset_fields(preset).items() if k in options}

    @classmethod
    def fit_options_from_preset(cls, preset: ModelPreset | str | None) -> dict[str, Any]:
        """Keyword arguments of :meth:`fit` taken from a model preset (or its name): the fields of the
        family's settings in it that are fit options (:meth:`fit_defaults`) — the polytope's margin,
        L1 weights, ...; {} where the preset holds no settings for the family (its ``_train``
        defaults apply)."""
        options = cls.fit_defaults()
        return {k: v for k, v in cls.preset_fields(preset).items() if k in options}

    @classmethod
    def reads_preset(cls) -> bool:
        """Whether this family takes anything from a model preset (declares a ``settings_type``, or
        overrides :meth:`from_preset`, :meth:`config_from_preset` or :meth:`fit_options_from_preset`):
        whether a run records the preset it trained with."""
        return cls.settings_type is not None or any(
            name in vars(klass) for klass in cls.__mro__[:cls.__mro__.index(ConstraintSet)]
            for name in ("from_preset", "config_from_preset", "fit_options_from_preset"))

    @classmethod
    def settings_targets(cls) -> list[str]:
        """The names a field of the family's ``settings_type`` may have: its constructor arguments
        (besides ``input_dim``) and its fit options."""
        return [name for name in cls.constructor_options() if name != "input_dim"] + list(cls.fit_defaults())

    # --- shared behaviour ----------------------------------------------------------------
    def violations_vjp(self, H: torch.Tensor, weights: Weights) -> tuple[torch.Tensor, torch.Tensor]:
        """Violations V [N, K] and the vector-Jacobian product ``∂(Σ_k weights[:, k]·V[:, k])/∂H`` [N, d].

        ``weights`` may be a function of V: pass a callable ``V -> [N, K]``. Implementations
        with structure (the polytope) override this with a closed form.
        """
        with torch.enable_grad():
            H = H.detach().requires_grad_(True)
            V = self.violations(H)
            w = weights(V.detach()) if callable(weights) else weights
            (grad,) = torch.autograd.grad((V * w).sum(), H)
        return V.detach(), grad

    def local_affine(self, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first-order model of the violations at each row: ``v(h) ≈ A_i h − c_i``.

        Returns ``A`` [N, K, d] (the Jacobian ∂V/∂H of row i) and ``c`` [N, K] with
        ``A_i h_i − c_i = v(h_i)``. Exact within a row's ReLU activation pattern for piecewise-linear
        constraint sets (polytope, linear, ReLU MLP). This generic version uses autograd;
        structured implementations override it with a closed form.
        """
        with torch.enable_grad():
            H = H.detach()
            J = torch.func.vmap(torch.func.jacrev(lambda h: self.violations(h[None])[0]))(H)
            V = self.violations(H).detach()
        A = J.detach()
        return A, torch.einsum("nkd,nd->nk", A, H) - V

    @torch.no_grad()
    def score(self, H: Any) -> torch.Tensor:
        """Continuous unsafety score [N]: the largest violation (> 0 means unsafe). Use for ROC."""
        return self.violations(self._check(H)).max(dim=1).values

    @torch.no_grad()
    def predict(self, H: Any) -> torch.Tensor:
        """Labels [N]: 1 (unsafe) iff any violation > 0, else 0 (safe)."""
        return (self.score(H) > 0).long()

    def _check(self, H: Any) -> torch.Tensor:
        self.require_fitted()
        H = as_features(H, self.input_dim)
        param = next(self.parameters())
        return H.to(device=param.device, dtype=param.dtype)

    def _inputs(self, H: Any) -> torch.Tensor:
        """States H [N, d] for ``violations`` and its closed forms: the set is fitted, and H is a real
        floating-point tensor with values, ``input_dim`` wide, on the parameters' device and in their
        dtype. NaN/inf rows pass (their violations are NaN/inf); :meth:`score` also refuses those."""
        self.require_fitted()
        H = check_states(H, self.input_dim)
        param = next(self.parameters())
        check_device("H", H, param.device, "the constraint set")
        if H.dtype != param.dtype:
            raise DataError(f"H is {H.dtype} but the constraint set computes in {param.dtype}; convert the states "
                            f"with H.to({param.dtype}) (score() and predict() convert for you)")
        return H

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write parameters and config to ``path`` (one safetensors file, JSON header), atomically."""
        problem = provenance_problem(self.provenance)
        if problem:
            raise ConfigError(f"{problem}; fix .provenance before saving (a file with it could not be loaded)")
        provenance = json.loads(json.dumps(self.provenance))
        header = {"type": self.registered_name, "format_version": FORMAT_VERSION, "config": self.config(),
                  "provenance": provenance}
        save_tensors(path, self.state_dict(), header)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ConstraintSet:
        """Read a file written by :meth:`save`. Never executes code from the file.

        The config is checked against the file's own tensor names, shapes and dtypes before
        anything is built, and every parameter must be finite: a hostile or damaged file raises
        :class:`CorruptFileError` and costs no more memory than its own size. Format 2 files
        (without ``safe_depth``) load with ``safe_depth`` = :data:`UNKNOWN_DEPTH`, formats 2 and 3
        (without ``class_means``) with zero class means (unknown); files without
        a ``provenance`` header entry (written before it existed) load with ``provenance == {}``
        (unknown: nothing is checked, steering needs an explicit layer).
        """
        specs, header = read_header(path)
        impl, config = _constructor(path, header, cls)
        provenance = header.get("provenance", {})
        if provenance_problem(provenance):
            raise CorruptFileError(f"{path} has a malformed provenance header entry ({short_repr(provenance)}: "
                                   f"{provenance_problem(provenance)}); re-create it with .save()")
        old_format = header["format_version"] == 2 and "safe_depth" not in specs
        if old_format:
            specs["safe_depth"] = TensorSpec("F32", ())
        no_means = header["format_version"] in (2, 3) and "class_means" not in specs
        if no_means:
            d = config.get("input_dim")
            specs["class_means"] = TensorSpec("F32", (2, d if isinstance(d, int) else 0))
        expected = _expected_specs(path, impl, config, len(specs))
        if set(expected) != set(specs):
            raise CorruptFileError(f"{path} holds tensors {sorted(specs)[:8]} but its config {short_repr(config)} "
                                   "needs "
                                   f"{sorted(expected)[:8]}; re-create it with .save()")
        for name, (dtype, shape) in expected.items():
            spec = specs[name]
            if spec.shape != shape or (spec.dtype in FLOAT_DTYPES) != dtype.is_floating_point or (
                    dtype == torch.bool) != (spec.dtype == "BOOL"):
                raise CorruptFileError(f"{path}: tensor {name!r} is {spec.dtype} {list(spec.shape)} but its config "
                                       f"{short_repr(config)} needs {dtype} {list(shape)}; re-create it with .save()")
        tensors, _ = load_tensors(path)
        if old_format:
            tensors["safe_depth"] = torch.tensor(UNKNOWN_DEPTH)
        if no_means:
            tensors["class_means"] = torch.zeros(specs["class_means"].shape)
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CorruptFileError(f"{path}: tensor {name!r} has NaN/inf values; a constraint set with them "
                                       "calls everything safe. Re-train it and save again")
            if t.dtype == torch.bool and bool((t.view(torch.uint8) > 1).any()):
                raise CorruptFileError(f"{path}: tensor {name!r} holds bytes that are not booleans; re-create it "
                                       "with .save()")
        obj = impl(**config)
        obj.load_state_dict(tensors)
        huge = obj._beyond_max_param()
        if huge:
            raise CorruptFileError(f"{path}: parameters {huge} hold values beyond ±{MAX_PARAM:g}, the largest a "
                                   "constraint set's parameter may hold (its violations overflow to inf, so everything "
                                   "is flagged and nothing is steered); re-train it and save again")
        obj.provenance = provenance
        return obj

    def _beyond_max_param(self) -> list[str]:
        """Names of parameters holding values beyond ±:data:`MAX_PARAM`."""
        return [n for n, p in self.named_parameters() if p.numel() and float(p.detach().abs().max()) > MAX_PARAM]

    def _fit_copy(self) -> ConstraintSet:
        """A copy of this set for ``fit`` to train (unfitted): training never touches ``self``, so a
        failed fit leaves it exactly as it was. :meth:`_adopt` swaps the trained values in."""
        work = copy.deepcopy(self)
        work.fitted.fill_(False)
        return work

    @torch.no_grad()
    def _adopt(self, work: ConstraintSet) -> None:
        """Take the parameters, buffers, provenance and training history of the trained copy ``work``
        (copied into this set's own tensors, so references to them stay valid)."""
        self.load_state_dict(work.state_dict())
        self.provenance = work.provenance
        self.train_history = getattr(work, "train_history", [])

    def _record_fit(self, data: FeatureDataset, covariance: torch.Tensor, options: dict[str, Any] | None = None) -> None:
        """Mark fitted; store the covariance [d, d] of the training rows, the depth of the safe
        rows of ``data`` (one more pass over it) and ``provenance["training"]``: the fit
        ``options``, epochs, rows and final loss (from ``self.train_history``).

        Raises :class:`ConfigError` if training left any parameter NaN/inf or beyond ±:data:`MAX_PARAM`
        (the set is not marked fitted).
        """
        self.input_covariance.copy_(covariance.to(self.input_covariance))
        bad = [n for n, t in self.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise ConfigError(f"training produced NaN/inf in {bad}; lower lr or the margin, or rescale the hidden "
                              "states")
        huge = self._beyond_max_param()
        if huge:
            raise ConfigError(f"training produced values beyond ±{MAX_PARAM:g} (the largest a parameter may hold: "
                              f"beyond it violations overflow) in {huge}; lower lr or the margin, or rescale the "
                              "hidden states")
        self.fitted.fill_(True)
        history = getattr(self, "train_history", [])
        unsafe = int((data.labels == 1).sum())
        self.provenance["training"] = {
            "constraint": self.registered_name, "config": self.config(), "options": options or {},
            "epochs": len(history), "rows": len(data), "unsafe_rows": unsafe, "safe_rows": len(data) - unsafe,
            "final_loss": history[-1] if history and math.isfinite(history[-1]) else None}
        self.record_class_means(data)
        depth = self.calibrate_depth(data)
        if depth == 0:
            log.warning("most safe training rows are not inside the fitted %s (median depth 0), so relative steering "
                        "depths steer only to its boundary; train longer or check the labels", type(self).__name__)

    @torch.no_grad()
    def record_class_means(self, H: Any, y: Any = None) -> torch.Tensor:
        """Record and return ``class_means`` [2, d]: the mean of the safe (label 0) and of the unsafe
        (label 1) rows of states H [N, d] with labels y [N], or of a
        :class:`~safeflow.features.FeatureDataset` ``H`` (``y`` None), read chunk by chunk in float64.
        ``fit`` calls it with the training data; call it yourself for a file saved before format 4."""
        if isinstance(H, FeatureDataset):
            chunks = list(H.labelled_chunks())
        else:
            X = as_features(H, self.input_dim)
            chunks = [(X, as_labels(y, X.shape[0]).to(X.device))]
        sums = torch.zeros(2, self.input_dim, dtype=torch.float64)
        counts = torch.zeros(2, dtype=torch.float64)
        for X, labels in chunks:
            for label in (0, 1):
                rows = X[labels == label].double().cpu()
                sums[label] += rows.sum(0)
                counts[label] += len(rows)
        self.class_means.copy_((sums / counts.clamp_min(1)[:, None]).to(self.class_means))
        return self.class_means

    @torch.no_grad()
    def calibrate_depth(self, H_safe: Any) -> float:
        """Record and return ``safe_depth``: the median of ``max(0, −max_k v_k(h))`` over safe
        states ``H_safe`` [N, d] — or over the safe (label 0) rows of a
        :class:`~safeflow.features.FeatureDataset`, read chunk by chunk. ``fit`` calls it with the
        training data; call it yourself to use relative steering depths with a file saved before
        format 3."""
        if isinstance(H_safe, FeatureDataset):
            depths = torch.cat([(-self.score(X[y == 0])).clamp_min(0) for X, y in H_safe.labelled_chunks()
                                if (y == 0).any()])
        else:
            depths = (-self.score(H_safe)).clamp_min(0)
        self.safe_depth.fill_(float(depths.median()))
        return float(self.safe_depth)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters (what ``violations`` computes in)."""
        return next(self.parameters()).dtype

    def require_fitted(self) -> None:
        """Raise :class:`DataError` unless the constraint set has been fitted or loaded (and has values:
        not on the ``meta`` device)."""
        if self.fitted.device.type == "meta":
            raise DataError(f"this {type(self).__name__} is on the meta device (shapes without values); build it on "
                            "a real device, or load a saved one with ConstraintSet.load(path)")
        if not bool(self.fitted):
            raise DataError(f"this {type(self).__name__} has not been fitted; call .fit(H, y) or load a saved one")


def _constructor(path: Any, header: dict[str, Any], cls: type) -> tuple[type[ConstraintSet], dict[str, Any]]:
    """The implementation class and config named by a saved header, checked."""
    kind, config = header.get("type"), header.get("config")
    component = header.get("component", "constraint set")
    if component != "constraint set":
        raise CorruptFileError(f"{path} holds a saved {short_repr(component)} ({short_repr(kind)}), not a constraint set; "
                               "load it with Steerer.load(path)" if component == "steerer" else "pass a constraint set")
    if kind is None or "format_version" not in header:
        raise CorruptFileError(f"{path} is not a saved constraint set (its safeflow header has keys "
                               f"{short_repr(sorted(header))}); pass a file written by ConstraintSet.save() or "
                               "`safeflow train`")
    if header["format_version"] not in READABLE_VERSIONS or not isinstance(config, dict):
        raise CorruptFileError(f"{path} has an unsupported constraint-set header (format_version "
                               f"{short_repr(header['format_version'])}, this safeflow reads {READABLE_VERSIONS}); "
                               "re-create it with .save()")
    if not isinstance(kind, str) or kind not in ConstraintSet.registry.names():
        raise CorruptFileError(f"{path} holds an unknown constraint-set type {short_repr(kind)} (known: "
                               f"{', '.join(ConstraintSet.available())}); it was written by another program or "
                               "safeflow version: re-create it with .save()")
    impl = ConstraintSet.registry.get(kind)
    if cls is not ConstraintSet and not issubclass(impl, cls):
        raise CorruptFileError(f"{path} holds a {kind!r} constraint set, not a {cls.__name__}")
    return impl, config


def _expected_specs(path: Any, impl: type[ConstraintSet], config: dict[str, Any],
                    num_tensors: int) -> dict[str, tuple[torch.dtype, torch.Size]]:
    """Names, dtypes and shapes of the state ``impl(**config)`` would have, built on the meta
    device (no memory). A config list longer than the file's tensor count cannot match it, and a
    config may hold only the constructor's positional-or-keyword arguments (what ``config()`` saves)."""
    if any(isinstance(v, (list, dict)) and len(v) > num_tensors for v in config.values()):
        raise CorruptFileError(f"{path} has a config with more entries than the file has tensors; re-create it "
                               "with .save()")
    saved = [k for k, p in inspect.signature(impl).parameters.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    unknown = sorted(set(config) - set(saved))
    if unknown:
        raise CorruptFileError(f"{path} has unknown constructor arguments {unknown} in its header's config (a saved "
                               f"{impl.__name__} holds only {saved}; runtime options such as backend= are set after "
                               "loading, not saved); re-create it with .save()")
    try:
        with torch.device("meta"):
            state = impl(**config).state_dict()
    except Exception as exc:  # any failure to build from untrusted arguments means a bad file
        raise CorruptFileError(f"{path} has a config that does not build a {impl.__name__} "
                               f"({short_repr(str(exc), 200)}); re-create it with .save()") from None
    return {k: (v.dtype, v.shape) for k, v in state.items()}
