"""Fused facet-violation kernels, selectable by backend name.

Every operation of the safety polytope (H [B, d], W [F, d], b [F], Φ [K, F], ξ [K]) needs
``V = ReLU(H Wᵀ + b) Φᵀ − ξ`` [B, K], its gradients, or the Jacobian ``A = Φ D W`` with
``D = diag(H Wᵀ + b > 0)``. The compiled backends tile over the F features, so the [B, F]
feature matrix is never stored; they keep a bitmask of active features and touch only those rows
of W in every backward pass.

Backends: ``"torch"`` (the eager reference, :mod:`safeflow.kernels.reference`), ``"cpu"``
(C++, ``csrc/cpu``), ``"cuda"`` (``csrc/cuda``), ``"auto"`` (the compiled kernel of the tensors'
device if it loaded, else ``"torch"``). :func:`available` lists what loaded here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from . import reference
from .backends import available, check_name, resolve
from .compiled import IMPLS, ViolationsFunction, clear_cache, derived

Weights = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def violations(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
               backend: str = "auto") -> torch.Tensor:
    """V = ReLU(H Wᵀ + b) Φᵀ − ξ [B, K], differentiable in every argument (``torch.autograd``)."""
    name = resolve(backend, H.device)
    if name == "torch":
        return reference.violations(H, W, b, Phi, xi)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (H, W, b, Phi, xi)):
        return ViolationsFunction.apply(IMPLS[name], H, W, b, Phi, xi)
    return IMPLS[name].forward(H, W, b, Phi, xi, mask=False)[0]  # nothing to differentiate: no bitmask


def violations_vjp(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
                   weights: Weights, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """V [B, K] and ``∂(Σ_k C_k V_k)/∂H = ((C Φ) ⊙ D) W`` [B, d]; ``weights`` is C [B, K] or a
    function ``V -> C``. Compiled backends read only the rows of W whose feature is active."""
    name = resolve(backend, H.device)
    if name == "torch":
        return reference.violations_vjp(H, W, b, Phi, xi, weights)
    impl = IMPLS[name]
    with torch.no_grad():
        V, mask = impl.forward(H, W, b, Phi, xi)
        assert mask is not None  # requested (mask=True)
        C = weights(V) if callable(weights) else weights
        return V, impl.vjp_input(W, Phi, mask, C.to(V.dtype), V)


def local_affine(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A = Φ D W [B, K, d] and c = ξ − Φ D b [B, K]: ``V = A h − c`` within each row's pattern."""
    name = resolve(backend, H.device)
    if name == "torch":
        return reference.local_affine(H, W, b, Phi, xi)
    impl = IMPLS[name]
    with torch.no_grad():
        _, mask = impl.forward(H, W, b, Phi, xi)
        assert mask is not None  # requested (mask=True)
        return impl.jacobian(W, b, Phi, xi, mask)


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
    name = resolve(backend, h.device)
    if name == "torch":
        raise ConfigError("safeflow_loop needs a compiled kernel backend ('cpu' or 'cuda'); the eager loop is "
                          "SafeFlowSteerer(backend='torch')")
    with torch.no_grad():
        return IMPLS[name].safeflow_loop(h, W, b, Phi, xi, P, lr=lr, lambda_safe=lambda_safe,
                                         lambda_unsafe=lambda_unsafe, margin=margin, max_steps=max_steps)


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
        return IMPLS[name].project(h0, A, c, margin, M)


def projection_steer(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor, *,
                     M: torch.Tensor | None, margin: float, max_rounds: int, ramp_rounds: int,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The projection steerer's rounds (native solver) in one compiled call (see
    :mod:`safeflow.steerers.projection`): from rows h [n, d] outside the polytope, the steered rows
    [n, d] (NaN where the first round failed), the rounds used [n] and the status of each row's
    last projection [n]. M [d, d] (float64) is the metric, None for the identity; ``margin`` the
    target depth m in violation units. CPU only; the eager rounds are
    ``ProjectionSteerer(solver="native", backend="torch")``.
    """
    name = resolve(backend, h.device)
    if name != "cpu":
        raise ConfigError(f"the compiled projection steer runs on the 'cpu' kernel backend, not {name!r}; the eager "
                          "rounds are ProjectionSteerer(solver='native', backend='torch')")
    with torch.no_grad():
        return IMPLS[name].projection_steer(h, W, b, Phi, xi, M, margin=margin, max_rounds=max_rounds,
                                            ramp_rounds=ramp_rounds)


__all__ = ["Weights", "available", "check_name", "clear_cache", "derived", "local_affine", "reference", "resolve",
           "safeflow_loop", "violations", "violations_vjp"]
