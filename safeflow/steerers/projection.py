"""Projection steering: the nearest point inside the constraint set, with a certificate.

Within the ReLU activation pattern of h₀ the violations are affine, ``v(h) = A h − c``
(:meth:`~safeflow.constraints.ConstraintSet.local_affine`; for the polytope ``A = Φ D W``,
``c = ξ − Φ D b``). The projection of h₀ onto ``{h : A h <= c − m}`` in the metric M is

    h* = argmin_h ½ (h − h₀)ᵀ M⁻¹ (h − h₀)   s.t.   A h <= c − m,

whose dual has only K variables:

    λ* = argmin_{λ >= 0} ½ λᵀ (A M Aᵀ) λ − λᵀ (A h₀ − c + m),      h* = h₀ − M Aᵀ λ*.

:func:`project` solves one such linear problem per row, differentiably in h₀, A, c and M (see
:mod:`~safeflow.steerers.dual_qp` for the solvers). :class:`ProjectionSteerer` applies it to
hidden states outside a constraint set: if h* falls into another activation pattern, the true
violations at h* decide, and it projects again from h* (up to ``max_rounds`` rounds) until every
violation is at most −m. The result says whether each row ended inside.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from ..constraints.base import ConstraintSet
from ..errors import ConfigError
from ..presets import preset as get_preset
from .base import Steerer, scaled_covariance
from .dual_qp import SOLVERS, Status, solve_dual

log = logging.getLogger(__name__)

METRICS = ("euclidean", "covariance")
#: Relative ridge ε added to A M Aᵀ (times its mean diagonal): keeps the dual strictly convex
#: when facets are linearly dependent; contradictory facets then show as infeasible.
RIDGE = 1e-10


@dataclass
class Projection:
    """Result of :func:`project` for B rows and K constraints."""

    hidden: torch.Tensor  #: [B, d] h*, the dtype of h₀; the original row where status != OK
    multipliers: torch.Tensor  #: [B, K] float64 λ*, the dual solution (0 where status != OK)
    status: torch.Tensor  #: [B] long, :class:`~safeflow.steerers.dual_qp.Status` codes


def project(h0: torch.Tensor, A: torch.Tensor, c: torch.Tensor, *, margin: float | torch.Tensor = 0.0,
            metric: torch.Tensor | None = None, solver: str = "native") -> Projection:
    """Project each row of h0 [B, d] onto ``{h : A_i h <= c_i − m}`` in the metric M (see module doc).

    Args:
        h0: points [B, d].
        A, c: the linear constraints, A [B, K, d] and c [B, K].
        margin: target depth m >= 0 (a float or a tensor broadcastable to [B, K]).
        metric: M [d, d], symmetric positive (semi)definite; None for the identity.
        solver: ``"native"`` or ``"cvxpylayers"``.

    Returns a :class:`Projection`; differentiable in h0, A, c, margin and metric. Rows with
    r = A h₀ − c + m <= 0 (already deep enough) come back bit-for-bit (λ* = 0). Computed in
    float64; rows whose constraints are infeasible, whose solve failed or whose input is not
    finite keep h₀ and say so in ``status`` — no exception.
    """
    if h0.ndim != 2 or A.shape != (*h0.shape[:1], A.shape[1], h0.shape[1]) or c.shape != A.shape[:2]:
        raise ConfigError(f"project needs h0 [B, d], A [B, K, d], c [B, K]; got {tuple(h0.shape)}, "
                          f"{tuple(A.shape)}, {tuple(c.shape)}")
    h, A, c = h0.double(), A.double(), c.double()
    MA = A if metric is None else A @ metric.double()  # rows of (M Aᵀ)ᵀ; M symmetric
    Q = A @ MA.mT
    r = (A @ h[..., None])[..., 0] - c + margin
    ridge = RIDGE * Q.diagonal(dim1=1, dim2=2).mean(1).detach()
    ridge = torch.where(ridge > 0, ridge, 1.0)  # A = 0: any ridge; infeasibility shows below
    lam, status = solve_dual(Q + ridge[:, None, None] * torch.eye(Q.shape[1], dtype=Q.dtype, device=Q.device), r, solver)
    h_star = h - (lam[:, None, :] @ MA)[:, 0]
    residual = (A @ h_star[..., None])[..., 0] - c + margin  # must be <= 0
    scale = r.abs().amax(1) + (c - margin).abs().amax(1)
    infeasible = (status == Status.OK) & ~(residual.amax(1) <= 1e-6 * scale)
    status = torch.where(infeasible, Status.INFEASIBLE, status)
    good = (status == Status.OK)[:, None]
    return Projection(hidden=torch.where(good, h_star, h).to(h0.dtype), multipliers=torch.where(good, lam, 0.0),
                      status=status)


def affine_at(constraints: ConstraintSet, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [N, K, d], c [N, K])`` with ``v(h) = A h − c`` in the activation pattern of each row of H.

    With autograd on and trainable parameters this is differentiable in the constraint set's
    parameters (A from ``torch.func.jacrev``, ``c = A h − v(h)``); otherwise it is
    :meth:`~safeflow.constraints.ConstraintSet.local_affine` (closed form for the polytope).
    """
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in constraints.parameters())):
        return constraints.local_affine(H)
    H = H.detach()
    A = torch.func.vmap(torch.func.jacrev(lambda h: constraints.violations(h[None])[0]))(H)
    return A, (A @ H[..., None])[..., 0] - constraints.violations(H)


class ProjectionSteerer(Steerer, name="projection"):
    """Steer by projecting onto the locally affine constraints (see the module doc).

    Args:
        metric: ``"euclidean"`` (M = I) or ``"covariance"`` (M = the constraint set's
            ``input_covariance`` scaled to mean eigenvalue 1, as SafeFlow's preconditioner:
            the nearest point in the Mahalanobis distance of the hidden states). Default: the
            preset's (``precondition="covariance"`` maps to ``"covariance"``).
        margin: target depth m — every violation ends <= −m (default: the preset's ``steer_margin``).
        max_rounds: projections per row at most; another round runs only when h* left the
            activation pattern and is not yet at depth m.
        solver: ``"cvxpylayers"`` (default) or ``"native"`` (same result, much faster; see
            :mod:`~safeflow.steerers.dual_qp`).
        preset: model preset supplying the defaults (see :mod:`safeflow.presets`).

    ``iterations`` in the :class:`~safeflow.steerers.SteerResult` counts rounds. A row whose first
    round fails (infeasible constraints, solver failure) is rejected: the original state is kept.
    """

    def __init__(self, metric: str | None = None, margin: float | None = None, *, max_rounds: int = 5,
                 solver: str = "cvxpylayers", preset: str = "default") -> None:
        p = get_preset(preset)
        metric = ("covariance" if p.precondition == "covariance" else "euclidean") if metric is None else metric
        margin = p.steer_margin if margin is None else float(margin)
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
        if solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "cvxpylayers" and not all(importlib.util.find_spec(m) for m in ("cvxpy", "cvxpylayers")):
            raise ConfigError("solver='cvxpylayers' needs the packages cvxpy and cvxpylayers (dependencies of safeflow); "
                              "install them, or pass solver='native' (the same projection, in PyTorch)")
        if not margin >= 0 or max_rounds < 1:
            raise ConfigError(f"need margin >= 0 and max_rounds >= 1; got {margin}, {max_rounds}")
        self.metric, self.margin, self.max_rounds, self.solver = metric, margin, int(max_rounds), solver

    def __repr__(self) -> str:
        return (f"ProjectionSteerer(metric={self.metric!r}, margin={self.margin}, max_rounds={self.max_rounds}, "
                f"solver={self.solver!r})")

    @torch.no_grad()
    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        M = None if self.metric == "euclidean" else scaled_covariance(constraints).double()
        x = h.clone()
        rounds = torch.zeros(len(h), dtype=torch.long, device=h.device)
        failed = torch.zeros(len(h), dtype=torch.bool, device=h.device)
        active = torch.arange(len(h), device=h.device)
        for _ in range(self.max_rounds):
            xa = x[active]
            A, c = constraints.local_affine(xa)
            # aim a hair deeper than m, so that rounding h* to float32 cannot leave it short
            slack = 1e-4 * (1.0 + self.margin + (A @ xa[..., None])[..., 0].sub(c).abs().amax(1, keepdim=True))
            p = project(xa, A, c, margin=self.margin + slack, metric=M, solver=self.solver)
            good = p.status == Status.OK
            failed[active[~good & (rounds[active] == 0)]] = True
            if not good.all():
                log.info("projection: %d row(s) not solved (status %s)", int((~good).sum()),
                         sorted({Status(int(s)).name for s in p.status[~good]}))
            x[active[good]] = p.hidden[good]
            rounds[active[good]] += 1
            active = active[good]
            active = active[constraints.violations(x[active]).amax(1) > -self.margin]
            if active.numel() == 0:
                break
        x[failed] = torch.nan  # the caller keeps the original state and reports the row as rejected
        return x, rounds
