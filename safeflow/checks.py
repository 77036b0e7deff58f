"""The validation vocabulary: the checks every public entry runs on its inputs.

Each check returns the (possibly converted) value or raises a :mod:`safeflow.errors` class whose
one message names the argument, what it is, what was expected and the fix. Nothing here imports
another safeflow module except :mod:`safeflow.errors`, so every layer (features, constraint sets,
kernels, steerers) can use it without an import cycle.

Shapes in messages are written as Python tuples for what was received, ``[B, d]``-style with the
sizes filled in for what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DataError

#: Largest magnitude accepted in hidden states: squares (standardisation, covariance) stay finite
#: in float32 below it. Real residual streams stay below about 1e5.
MAX_ABS = 1e15

#: Dtypes a hidden state or a parameter may have (real floating point).
REAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _first_rows(mask: torch.Tensor, n: int = 5) -> list[int]:
    """The indices of the first ``n`` True entries of a 1-D bool tensor."""
    return mask.nonzero().flatten()[:n].tolist()


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool), else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def check_tensor(name: str, t: Any) -> torch.Tensor:
    """``t`` if it is a tensor with data: :class:`DataError` for other types and for tensors on the
    ``meta`` device (shapes without values, e.g. a model built under ``torch.device("meta")``)."""
    if not isinstance(t, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor, got {type(t).__name__}; convert it with torch.as_tensor(...)")
    if t.device.type == "meta":
        raise DataError(f"{name} is on the meta device (it has a shape but no values); materialise it on a real device "
                        "(e.g. load the model or states with device='cpu') before computing with it")
    return t


def check_float(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` if its dtype is real floating point (:data:`REAL_DTYPES`), else :class:`DataError`."""
    if t.dtype not in REAL_DTYPES:
        raise DataError(f"{name} is {t.dtype}; pass real floating-point values (convert with .float())")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None], layout: str, fix: str) -> None:
    """Raise :class:`DataError` unless ``t.shape`` matches ``expected`` (None: any size).

    ``layout`` names the dimensions (``"[B, d]"``); ``fix`` says what to do."""
    if t.ndim == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected)):
        return
    sizes = ", ".join("any" if e is None else str(e) for e in expected)
    raise DataError(f"{name} has shape {tuple(t.shape)} but {layout} = [{sizes}] is expected; {fix}")


def check_device(name: str, t: torch.Tensor, device: torch.device, other: str) -> None:
    """Raise :class:`DataError` unless ``t`` is on ``device`` (where ``other`` lives)."""
    if t.device != device:
        raise DataError(f"{name} is on {t.device} but {other} is on {device}; move every tensor to one device "
                        f"(.to({str(device)!r}))")


def check_states(H: Any, input_dim: int, name: str = "H") -> torch.Tensor:
    """Hidden states for a fitted model's forward computations (``violations``, ``steer``): a real
    floating-point tensor [N, input_dim] with values. NaN/inf rows are allowed (the callers document
    what they do with them); use :func:`as_features` where rows must be finite."""
    H = check_float(name, check_tensor(name, H))
    check_shape(name, H, (None, input_dim), "[N, d]",
                f"pass one row of {input_dim} values per state, from the model and layer the constraint set was "
                "trained on")
    return H


def as_features(H: Any, input_dim: int | None = None, name: str = "H") -> torch.Tensor:
    """Validate hidden states: a finite, non-empty real tensor [N, input_dim] with ``|H| <= 1e15``,
    detached from any autograd graph."""
    if isinstance(H, torch.Tensor):
        check_tensor(name, H)
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


def as_labels(y: Any, n: int) -> torch.Tensor:
    """Validate labels: 1-D, length n, values in {0, 1} (1 = unsafe), both classes present."""
    if isinstance(y, torch.Tensor):
        check_tensor("labels", y)
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


def kernel_operands(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor, *,
                    C: torch.Tensor | None = None, P: torch.Tensor | None = None,
                    states: str = "H") -> tuple[int, int, int, int]:
    """Check the operands of a :mod:`safeflow.kernels` operation and return (B, d, F, K).

    H [B, d] (called ``states`` in messages), W [F, d], b [F], Φ [K, F], ξ [K] and, when given,
    weights C [B, K] and a preconditioner P [d, d]: tensors with values (not ``meta``), all on H's
    device, real floating point, with 2-D/1-D shapes whose sizes agree; d, F and K are at least 1
    (B may be 0). Dtype agreement between the operands is the backend's rule
    (:class:`~safeflow.kernels.compiled.Compiled` and :func:`safeflow.kernels.violations`)."""
    named = [(states, H), ("W", W), ("b", b), ("Phi", Phi), ("xi", xi)] + [(n, t) for n, t in (("weights", C), ("P", P))
                                                                          if t is not None]
    for name, t in named:
        check_float(name, check_tensor(name, t))
    for name, t in named[1:]:
        check_device(name, t, H.device, states)
    fix = "H [B, d], W [F, d], b [F], Phi [K, F], xi [K] must agree in d, F and K"
    check_shape(states, H, (None, None), "[B, d]", f"pass one state per row; {fix}")
    B, d = H.shape
    check_shape("W", W, (None, d), "[F, d]", f"W needs one column per hidden dimension of {states}; {fix}")
    F = W.shape[0]
    check_shape("b", b, (F,), "[F]", f"b needs one bias per feature (row of W); {fix}")
    check_shape("Phi", Phi, (None, F), "[K, F]", f"Phi needs one column per feature (row of W); {fix}")
    K = Phi.shape[0]
    check_shape("xi", xi, (K,), "[K]", f"xi needs one threshold per facet (row of Phi); {fix}")
    if C is not None:
        check_shape("weights", C, (B, K), "[B, K]", f"give one weight per row of {states} and facet")
    if P is not None:
        check_shape("P", P, (d, d), "[d, d]", "the preconditioner is a square matrix over the hidden dimensions")
    for size, what in ((d, "d (hidden size)"), (F, "F (features)"), (K, "K (facets)")):
        if size == 0:
            raise DataError(f"{what} is 0; a kernel operation needs at least one of each")
    return B, d, F, K
