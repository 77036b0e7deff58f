"""The ``ConstraintSet`` interface: a learned set of constraints ``v(h) <= 0`` on hidden states.

A constraint set maps hidden states ``H`` [N, d] to violations ``V`` [N, K]; a row is **unsafe
(label 1) iff any** ``V[i, k] > 0`` and safe (label 0) otherwise. Every implementation is a
``torch.nn.Module`` whose violations are differentiable in ``H``, so any steerer works with any
constraint set. Saved files are one safetensors file with a JSON header — never pickle.
"""

from __future__ import annotations

import json
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, CorruptFileError, DataError
from ..features import FeatureDataset
from ..io import FLOAT_DTYPES, TensorSpec, load_tensors, read_header, save_tensors, short_repr
from ..registry import Registered

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
#: Older formats that still load: version 2 lacks ``safe_depth`` (loaded as :data:`UNKNOWN_DEPTH`).
READABLE_VERSIONS = (2, 3)
#: ``safe_depth`` of a constraint set that has not measured it (unfitted, or saved in format 2).
UNKNOWN_DEPTH = -1.0

#: Facet weights [N, K] for a vector-Jacobian product, or a function of the violations V [N, K].
Weights = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


#: Largest magnitude accepted in hidden states: squares (standardisation, covariance) stay finite
#: in float32 below it. Real residual streams stay below about 1e5.
MAX_ABS = 1e15


def as_features(H: Any, input_dim: int | None = None, name: str = "H") -> torch.Tensor:
    """Validate hidden states: a finite, non-empty real tensor [N, input_dim] with |H| <= 1e15,
    detached from any autograd graph."""
    try:
        H = torch.as_tensor(H).detach()
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"{name} must be a numeric array or tensor [N, d], got {type(H).__name__}") from None
    if H.ndim != 2:
        raise DataError(f"{name} must be 2-D [N, d], got shape {tuple(H.shape)}; stack one row per prompt")
    if H.shape[0] == 0:
        raise DataError(f"{name} is empty; pass at least one row")
    if input_dim is not None and H.shape[1] != input_dim:
        raise DataError(
            f"{name} has hidden size {H.shape[1]} but this constraint set expects {input_dim}; "
            "extract features from the same model (and layer) the constraint set was trained on"
        )
    if H.is_complex():
        raise DataError(f"{name} is complex; pass real hidden states")
    if not H.is_floating_point():
        H = H.float()
    finite = torch.isfinite(H).all(1)
    if not finite.all():
        raise DataError(f"{name} has NaN/inf values in {int((~finite).sum())} row(s) "
                        f"(first: {_first_rows(~finite)}); drop or re-extract those rows")
    big = H.abs().amax(1) > MAX_ABS
    if big.any():
        raise DataError(f"{name} has values beyond ±{MAX_ABS:g} in {int(big.sum())} row(s) "
                        f"(first: {_first_rows(big)}, "
                        f"largest {float(H.abs().max()):.3g}); such states overflow float32 arithmetic: rescale them "
                        "or check the extraction")
    return H


def _first_rows(mask: torch.Tensor, n: int = 5) -> list[int]:
    return mask.nonzero().flatten()[:n].tolist()


def as_labels(y: Any, n: int) -> torch.Tensor:
    """Validate labels: 1-D, length n, values in {0, 1} (1 = unsafe), both classes present."""
    arr = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"labels must be numbers 0 (safe) or 1 (unsafe), got {arr.dtype} values such as "
                        f"{arr.ravel()[:3].tolist()}; map them to 1 = unsafe, 0 = safe (load_prompt_file maps "
                        "'unsafe'/'safe')")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(f"labels must be 1-D with one entry per row ({n}), got shape {tuple(arr.shape)}")
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        raise DataError("labels must be 0 (safe) or 1 (unsafe), got fractional or NaN values")
    y = torch.as_tensor(arr.astype(np.int64))
    bad = sorted(set(y.unique().tolist()) - {0, 1})
    if bad:
        raise DataError(f"labels must be 0 (safe) or 1 (unsafe); found {bad}. Map your labels to 1 = unsafe, 0 = safe")
    if len(y.unique()) < 2:
        raise DataError(f"labels contain only class {int(y[0])}; training needs both safe (0) and unsafe (1) rows")
    return y


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool), else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


class ConstraintSet(Registered, nn.Module, ABC, kind="constraint set"):
    """Learned constraints on hidden states. Labels: 1 = unsafe, 0 = safe.

    Subclasses implement ``violations``, ``fit`` and ``config``; everything else is shared.
    ``fit`` also records, saved with the parameters:

    * ``input_covariance`` [d, d], the covariance of the training rows, which
      ``SafeFlowSteerer(precondition="covariance")`` and the projection steerer's covariance
      metric use;
    * ``safe_depth`` [], the typical depth of the safe training rows inside the set — the median
      of ``max(0, −max_k v_k(h))`` over them — the unit in which steering depths are given, so the same
      setting means the same thing on any model, layer or constraint set (see
      :meth:`calibrate_depth`);
    * ``train_history``: the mean training loss of each epoch (a list of floats; not saved);
    * ``provenance["training"]``: the fit's settings, epochs, rows and final loss (saved).

    ``provenance`` (a JSON-serialisable dict, saved in the file header) also records where the
    training states came from — model, layer, pooling, chat template — when the caller sets it:
    ``poly.provenance.update(sf.describe_source(extractor))`` (see :mod:`safeflow.provenance`).
    """

    input_dim: int
    num_constraints: int
    fitted: torch.Tensor
    input_covariance: torch.Tensor
    safe_depth: torch.Tensor

    def __init__(self, input_dim: int) -> None:
        nn.Module.__init__(self)
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("input_covariance", torch.zeros(input_dim, input_dim))
        self.register_buffer("safe_depth", torch.tensor(UNKNOWN_DEPTH))
        self.provenance: dict[str, Any] = {}

    # --- what an implementation provides -------------------------------------------------
    @abstractmethod
    def violations(self, H: torch.Tensor) -> torch.Tensor:
        """Violations V [N, K] of hidden states H [N, d]; unsafe iff any V > 0. Differentiable."""

    @abstractmethod
    def fit(self, *args: Any, **options: Any) -> ConstraintSet:
        """Learn the constraints from hidden states H [N, d] and labels y [N] (1 = unsafe), or from
        a :class:`~safeflow.features.FeatureDataset` passed as ``H`` (streamed; ``y`` None)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this object's shape (saved in the JSON header)."""

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

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write parameters and config to ``path`` (one safetensors file, JSON header), atomically."""
        try:
            provenance = json.loads(json.dumps(self.provenance, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"provenance must hold JSON values (str, numbers, lists, dicts) only: {exc}") from None
        header = {"type": self.registered_name, "format_version": FORMAT_VERSION, "config": self.config(),
                  "provenance": provenance}
        save_tensors(path, self.state_dict(), header)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ConstraintSet:
        """Read a file written by :meth:`save`. Never executes code from the file.

        The config is checked against the file's own tensor names, shapes and dtypes before
        anything is built, and every parameter must be finite: a hostile or damaged file raises
        :class:`CorruptFileError` and costs no more memory than its own size. Format 2 files
        (without ``safe_depth``) load with ``safe_depth`` = :data:`UNKNOWN_DEPTH`; files without
        a ``provenance`` header entry (written before it existed) load with ``provenance == {}``
        (unknown: nothing is checked, steering needs an explicit layer).
        """
        specs, header = read_header(path)
        impl, config = _constructor(path, header, cls)
        provenance = header.get("provenance", {})
        layer = provenance.get("layer") if isinstance(provenance, dict) else None
        if not isinstance(provenance, dict) or not (layer is None or type(layer) is int):
            raise CorruptFileError(f"{path} has a malformed provenance header entry ({short_repr(provenance)}); "
                                   "re-create it with .save()")
        old_format = header["format_version"] == 2 and "safe_depth" not in specs
        if old_format:
            specs["safe_depth"] = TensorSpec("F32", ())
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
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CorruptFileError(f"{path}: tensor {name!r} has NaN/inf values; a constraint set with them "
                                       "calls everything safe. Re-train it and save again")
            if t.dtype == torch.bool and bool((t.view(torch.uint8) > 1).any()):
                raise CorruptFileError(f"{path}: tensor {name!r} holds bytes that are not booleans; re-create it "
                                       "with .save()")
        obj = impl(**config)
        obj.load_state_dict(tensors)
        obj.provenance = provenance
        return obj

    def _record_fit(self, data: FeatureDataset, covariance: torch.Tensor, options: dict[str, Any] | None = None) -> None:
        """Mark fitted; store the covariance [d, d] of the training rows, the depth of the safe
        rows of ``data`` (one more pass over it) and ``provenance["training"]``: the fit
        ``options``, epochs, rows and final loss (from ``self.train_history``).

        Raises :class:`ConfigError` if training left any parameter NaN/inf (the set is not marked fitted).
        """
        self.input_covariance.copy_(covariance.to(self.input_covariance))
        bad = [n for n, t in self.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise ConfigError(f"training produced NaN/inf in {bad}; lower lr or the margin, or rescale the hidden "
                              "states")
        self.fitted.fill_(True)
        history = getattr(self, "train_history", [])
        unsafe = int((data.labels == 1).sum())
        self.provenance["training"] = {
            "constraint": self.registered_name, "config": self.config(), "options": options or {},
            "epochs": len(history), "rows": len(data), "unsafe_rows": unsafe, "safe_rows": len(data) - unsafe,
            "final_loss": history[-1] if history and math.isfinite(history[-1]) else None}
        depth = self.calibrate_depth(data)
        if depth == 0:
            log.warning("most safe training rows are not inside the fitted %s (median depth 0), so relative steering "
                        "depths steer only to its boundary; train longer or check the labels", type(self).__name__)

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
        """Raise :class:`DataError` unless the constraint set has been fitted or loaded."""
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
    device (no memory). A config list longer than the file's tensor count cannot match it."""
    if any(isinstance(v, (list, dict)) and len(v) > num_tensors for v in config.values()):
        raise CorruptFileError(f"{path} has a config with more entries than the file has tensors; re-create it "
                               "with .save()")
    try:
        with torch.device("meta"):
            state = impl(**config).state_dict()
    except Exception as exc:  # any failure to build from untrusted arguments means a bad file
        raise CorruptFileError(f"{path} has a config that does not build a {impl.__name__} "
                               f"({short_repr(str(exc), 200)}); re-create it with .save()") from None
    return {k: (v.dtype, v.shape) for k, v in state.items()}
