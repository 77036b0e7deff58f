"""Fused facet-violation kernels, selectable by backend name.

Every operation of the safety polytope (H [B, d], W [F, d], b [F], Φ [K, F], ξ [K]) needs
``V = ReLU(H Wᵀ + b) Φᵀ − ξ`` [B, K], its gradients, or the Jacobian ``A = Φ D W`` with
``D = diag(H Wᵀ + b > 0)``. The compiled backends tile over the F features, so the [B, F]
feature matrix is never stored; they keep a bitmask of active features and touch only those rows
of W in every backward pass.

Backends: ``"torch"`` (the eager reference, :mod:`safeflow.kernels.reference`), ``"cpu"``
(C++, ``csrc/cpu``), ``"cuda"`` (``csrc/cuda``), ``"auto"`` (the compiled kernel of the tensors'
device if it loaded, else ``"torch"``). :func:`available` lists what loaded here. A compiled
backend runs through the ``torch.library`` custom operators of :mod:`safeflow.kernels.ops`
(``safeflow::violations_forward`` and the others: fake implementations and a registered
backward, so ``torch.compile`` traces them and ``torch.library.opcheck`` checks them).

Every function checks its operands before anything is computed (:func:`safeflow.checks.kernel_operands`:
tensors with values on one device, real floating point, 2-D/1-D shapes whose sizes agree) and
raises :class:`~safeflow.errors.DataError` naming the argument, its shape and the expected one; a
shape mistake never reaches a compiled kernel. Rows whose violations hold a NaN (a NaN in the
state, or ``inf − inf``) come back NaN from every operation on every backend: V, the input
gradient of :func:`violations_vjp`, and A and c of :func:`local_affine`. Values are specified
for finite parameters W, b, Φ, ξ (constraint sets guarantee them: ``fit`` and ``load`` refuse
others); with non-finite parameters results keep their shapes, but where NaN/inf appear may differ
between backends (checking every parameter on every call would cost as much as the kernel).
"""

from __future__ import annotations

from collections.abc import Callable

import math

import torch

from .. import checks
from ..errors import ConfigError, DataError
from . import ops, reference
from .backends import available, check_name, resolve
from .compiled import clear_cache, derived

Weights = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def _one_dtype(H: torch.Tensor, *others: tuple[str, torch.Tensor]) -> None:
    """The eager backend computes in H's dtype: every other operand must have it."""
    for name, t in others:
        if t.dtype != H.dtype:
            raise DataError(f"{name} is {t.dtype} but the states are {H.dtype}; convert every operand to one dtype "
                            f"(e.g. {name}.to({H.dtype}))")


def _operands(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor, backend: str,
              *, P: torch.Tensor | None = None, states: str = "H") -> str:
    """Check the operands (:func:`safeflow.checks.kernel_operands`) and return the backend that runs."""
    checks.kernel_operands(H, W, b, Phi, xi, P=P, states=states)
    name = resolve(backend, H.device)
    if name == "torch":
        _one_dtype(H, ("W", W), ("b", b), ("Phi", Phi), ("xi", xi))
    return name


def _checked_weights(C: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Weights C [B, K] for violations V [B, K]: a real tensor of V's shape on V's device, in V's dtype."""
    checks.check_float("weights", checks.check_tensor("weights", C))
    checks.check_device("weights", C, V.device, "H")
    checks.check_shape("weights", C, tuple(V.shape), "[B, K]", "give one weight per row of H and facet "
                       "(or a function V -> weights returning that shape)")
    return C.to(V.dtype)


def _nan_rows(V: torch.Tensor) -> torch.Tensor:
    """[B] bool: rows whose violations hold a NaN."""
    return V.isnan().any(1)


def violations(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
               backend: str = "auto") -> torch.Tensor:
    """V = ReLU(H Wᵀ + b) Φᵀ − ξ [B, K], differentiable in every argument (``torch.autograd``)."""
    name = _operands(H, W, b, Phi, xi, backend)
    if name == "torch":
        return reference.violations(H, W, b, Phi, xi)
    return ops.violations(H, W, b, Phi, xi)


def violations_vjp(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
                   weights: Weights, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """V [B, K] and ``∂(Σ_k C_k V_k)/∂H = ((C Φ) ⊙ D) W`` [B, d]; ``weights`` is C [B, K] or a
    function ``V -> C``. Compiled backends read only the rows of W whose feature is active.
    Rows whose V holds a NaN get a NaN gradient on every backend."""
    name = _operands(H, W, b, Phi, xi, backend)
    if not callable(weights):
        checks.check_tensor("weights", weights)
        checks.check_shape("weights", weights, (H.shape[0], Phi.shape[0]), "[B, K]",
                           "give one weight per row of H and facet")

    def weigh(V: torch.Tensor) -> torch.Tensor:
        return _checked_weights(weights(V) if callable(weights) else weights, V)

    if name == "torch":
        return reference.violations_vjp(H, W, b, Phi, xi, weigh)
    with torch.no_grad():
        V, mask, _ = ops.violations_forward(H, W, b, Phi, xi, False)
        return V, ops.violations_vjp_input(W, Phi, mask, weigh(V), V)


def local_affine(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A = Φ D W [B, K, d] and c = ξ − Φ D b [B, K]: ``V = A h − c`` within each row's pattern.
    Rows whose V holds a NaN get NaN in A and c on every backend (they have no activation pattern)."""
    name = _operands(H, W, b, Phi, xi, backend)
    if name == "torch":
        return reference.local_affine(H, W, b, Phi, xi)
    with torch.no_grad():
        V, mask, _ = ops.violations_forward(H, W, b, Phi, xi, False)
        A, c = ops.jacobian(W, b, Phi, xi, mask)
        nan = _nan_rows(V)
        return A.masked_fill(nan[:, None, None], math.nan), c.masked_fill(nan[:, None], math.nan)


def safeflow_loop(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor, *,
                  P: torch.Tensor | None, lr: float, lambda_safe: float, lambda_unsafe: float, margin: float,
                  max_steps: int, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The whole SafeFlow loop in one compiled call (see :mod:`safeflow.steerers.safeflow`).

    From rows h [M, d], repeat up to ``max_steps`` times per row, stopping a row as soon as all
    ``v_k <= −margin`` or V is not finite: ``C = λ_safe + λ_unsafe·[V > −margin]``,
    ``g = ((C Φ) ⊙ D) W + sign(x − h)/d``, ``x ← x − lr · g P`` (P [d, d] optional).
    Returns the new rows [M, d] and the steps taken per row [M]. Needs a compiled backend; the
    eager loop is ``SafeFlowSteerer(backend="torch")``.
    """
    for setting, value in (("lr", lr), ("lambda_safe", lambda_safe), ("lambda_unsafe", lambda_unsafe),
                           ("margin", margin)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"safeflow_loop: {setting} must be a finite number, got {value!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ConfigError(f"safeflow_loop: max_steps must be an int >= 0, got {max_steps!r}")
    name = _operands(h, W, b, Phi, xi, backend, P=P, states="h")
    if name == "torch":
        raise ConfigError("safeflow_loop needs a compiled kernel backend ('cpu' or 'cuda'); the eager loop is "
                          "SafeFlowSteerer(backend='torch')")
    with torch.no_grad():
        return ops.safeflow_loop(h, W, b, Phi, xi, P, float(lr), float(lambda_safe), float(lambda_unsafe),
                                 float(margin), max_steps)


def project(h0: torch.Tensor, A: torch.Tensor, c: torch.Tensor, margin: torch.Tensor, M: torch.Tensor | None,
            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of :func:`safeflow.steerers.projection.project` (native solver) in one compiled call.

    For each row, in float64, ``λ* = argmin_{λ >= 0} ½ λᵀ (A M Aᵀ + εI) λ − λᵀ (A h₀ − c + m)`` and
    ``h* = h₀ − M Aᵀ λ*`` (h0 [B, d], A [B, K, d], c and margin m [B, K], M [d, d] or None for the
    identity). Returns h* [B, d] float64 (h₀ where the status is not OK), λ* [B, K] and the
    :class:`~safeflow.steerers.dual_qp.Status` codes [B]. Not differentiable; CPU only.
    """
    name = resolve(backend, h0.device)
    if name != "cpu":
        raise ConfigError(f"the compiled projection runs on the 'cpu' kernel backend, not {name!r}; use "
                          "safeflow.project (eager, differentiable) elsewhere")
    with torch.no_grad():
        return ops.project(h0, A, c, margin, M)


def metric_rows(W: torch.Tensor, M: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows of W M [F, d] in ``dtype`` (products in float64; M [d, d] symmetric), for
    :func:`projection_steer`. Cached while W and M are the same tensors at the same versions; a
    change made through ``.data`` goes unseen, so pass tensors that change in place or not at all."""
    return derived((W, M), f"W times metric {dtype}",
                   lambda wm: (wm[0].detach().double() @ wm[1].detach().double()).to(dtype), always=True)


def projection_steer(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor, *,
                     M: torch.Tensor | None, margin: float, max_rounds: int, ramp_rounds: int,
                     WM: torch.Tensor | None = None,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The projection steerer's rounds (native solver) in one compiled call (see
    :mod:`safeflow.steerers.projection`): from rows h [n, d] outside the polytope, the steered rows
    [n, d] (NaN where the first round failed), the rounds used [n] and the status of each row's
    last projection [n]. M [d, d] (float64) is the metric, None for the identity; ``margin`` the
    target depth m in violation units. ``WM`` [F, d], optional with a metric: the rows of W M in
    h's dtype (:func:`metric_rows`, cached), so that each round forms A M = Φ D (W M) over the
    active features only instead of multiplying A [K, d] by M [d, d]. CPU only; the eager rounds
    are ``ProjectionSteerer(solver="native", backend="torch")``.
    """
    name = resolve(backend, h.device)
    if name != "cpu":
        raise ConfigError(f"the compiled projection steer runs on the 'cpu' kernel backend, not {name!r}; the eager "
                          "rounds are ProjectionSteerer(solver='native', backend='torch')")
    with torch.no_grad():
        return ops.projection_steer(h, W, b, Phi, xi, M, WM, float(margin), max_rounds, ramp_rounds)


__all__ = ["Weights", "available", "check_name", "clear_cache", "derived", "local_affine", "metric_rows", "project",
           "projection_steer", "reference", "resolve", "safeflow_loop", "violations", "violations_vjp"]
