"""Projection steering: the nearest point inside the constraint set, with a certificate.

Within the ReLU activation pattern of h₀ the violations are affine, ``v(h) = A h − c``
(:meth:`~safeflow.constraints.ConstraintSet.local_affine`; for the polytope ``A = Φ D W``,
``c = ξ − Φ D b``). The projection of h₀ onto ``{h : A h <= c − m}`` in the metric M is

    h* = argmin_h ½ (h − h₀)ᵀ M⁻¹ (h − h₀)   s.t.   A h <= c − m,

whose dual has only K variables:

    λ* = argmin_{λ >= 0} ½ λᵀ (A M Aᵀ) λ − λᵀ (A h₀ − c + m),      h* = h₀ − M Aᵀ λ*.

:func:`project` solves one such linear problem per row, differentiably in h₀, A, c and M (see
:mod:`~safeflow.steerers.dual_qp` for the solvers). :class:`ProjectionSteerer` applies it to
hidden states outside a constraint set. The linear model holds only within the activation
pattern where it was taken, so the steerer works in rounds (sequential quadratic programming):

1. linearise the violations at the latest point x (x = h₀ at first) and project h₀ onto
   ``{A_x h <= c_x − m_r}`` — or, if the latest point fell short of its target depth, project x
   itself (a restoration step, "repeat from h*");
2. walk the segment from the projected point's origin to h* and keep the first point (by
   bisection) at depth m_r: h* overshoots when the pattern changes on the way;
3. remember the point nearest to h₀ (in the metric) at depth m; stop when a round comes no closer.

The target depth ramps up over the first ``ramp_rounds`` rounds, ``m_r = m·min(1, r/ramp_rounds)``
(a continuation: each linear model is only trusted near where it was taken). On the default
model's refusal polytope this reaches depth m on every row with a smaller edit than SafeFlow's,
where projecting once (or repeatedly from h*) lands 4–20× farther (see the concepts page).

With the native solver on a polytope whose kernel backend is the CPU one, all rounds run in one
compiled call (:func:`safeflow.kernels.projection_steer`, the same algorithm: the same rows
steered, inside and rejected after the same rounds, states equal up to float rounding); the
eager rounds below are the reference (``backend="torch"``) and serve every other constraint set.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels
from ..constraints.base import ConstraintSet
from ..constraints.polytope import PolytopeConstraints
from ..errors import ConfigError, DataError
from ..presets import ModelPreset
from .base import Steerer, SteeringData, check_depth, require_covariance, target_margin
from .dual_qp import SOLVERS, Status, solve_dual

log = logging.getLogger(__name__)

METRICS = ("euclidean", "covariance")
#: Relative ridge ε added to A M Aᵀ (times its mean diagonal): keeps the dual strictly convex
#: when facets are linearly dependent; contradictory facets then show as infeasible.
RIDGE = 1e-10


@dataclass(frozen=True)
class ProjectionSettings:
    """The projection steerer's settings in a model preset (:mod:`safeflow.presets`)."""

    metric: str = "euclidean"  #: ``"euclidean"`` or ``"covariance"``
    depth: float = 0.0  #: target depth, in units of the steering constraint set's ``safe_depth``


@dataclass
class Projection:
    """Result of :func:`project` for B rows and K constraints."""

    hidden: torch.Tensor  #: [B, d] h*, the dtype of h₀; the original row where status != OK
    multipliers: torch.Tensor  #: [B, K] float64 λ*, the dual solution (0 where status != OK)
    status: torch.Tensor  #: [B] long, :class:`~safeflow.steerers.dual_qp.Status` codes


def project(h0: torch.Tensor, A: torch.Tensor, c: torch.Tensor, *, margin: float | torch.Tensor = 0.0,
            metric: torch.Tensor | None = None, solver: str = "native", backend: str = "auto") -> Projection:
    """Project each row of h0 [B, d] onto ``{h : A_i h <= c_i − m}`` in the metric M (see module doc).

    Args:
        h0: points [B, d].
        A, c: the linear constraints, A [B, K, d] and c [B, K].
        margin: target depth m >= 0 (a float or a tensor broadcastable to [B, K]).
        metric: M [d, d], symmetric positive (semi)definite; None for the identity.
        solver: ``"native"`` or ``"cvxpylayers"``.
        backend: kernel backend for the native solver when nothing needs a gradient: on the CPU,
            ``"auto"`` or ``"cpu"`` solve every row in one compiled call
            (:func:`safeflow.kernels.project`, the same algorithm); ``"torch"`` keeps the eager
            operations, which are also what runs whenever an input requires a gradient.

    Returns a :class:`Projection`; differentiable in h0, A, c, margin and metric. Rows with
    r = A h₀ − c + m <= 0 (already deep enough) come back bit-for-bit (λ* = 0). Computed in
    float64; rows whose constraints are infeasible, whose solve failed or whose input is not
    finite keep h₀ and say so in ``status`` — no exception.
    """
    if h0.ndim != 2 or A.ndim != 3 or A.shape[::2] != h0.shape or c.shape != A.shape[:2]:
        raise DataError(f"project needs h0 [B, d], A [B, K, d], c [B, K]; got {tuple(h0.shape)}, "
                          f"{tuple(A.shape)}, {tuple(c.shape)}")
    if solver == "native" and _compiled(backend, h0, A, c, margin, metric):
        m = torch.as_tensor(margin, dtype=torch.float64).expand(c.shape)
        hidden, lam, status = kernels.project(h0, A, c, m, metric, backend="cpu")
        return Projection(hidden=hidden.to(h0.dtype), multipliers=lam, status=status)
    h, A, c = h0.double(), A.double(), c.double()
    MA = A if metric is None else A @ metric.double()  # rows of (M Aᵀ)ᵀ; M symmetric
    Q = A @ MA.mT
    r = (A @ h[..., None])[..., 0] - c + margin
    ridge = RIDGE * Q.diagonal(dim1=1, dim2=2).mean(1).detach()
    ridge = torch.where(ridge > 0, ridge, 1.0)  # A = 0: any ridge; infeasibility shows below
    lam, status = solve_dual(Q + ridge[:, None, None] * torch.eye(Q.shape[1], dtype=Q.dtype, device=Q.device), r, solver)
    h_star = h - (lam[:, None, :] @ MA)[:, 0]
    residual = r - (Q @ lam[..., None])[..., 0]  # = A h* − c + m, must be <= 0
    scale = r.abs().amax(1) + (c - margin).abs().amax(1)
    infeasible = (status == Status.OK) & ~(residual.amax(1) <= 1e-6 * scale)
    status = torch.where(infeasible, Status.INFEASIBLE, status)
    good = (status == Status.OK)[:, None]
    return Projection(hidden=torch.where(good, h_star, h).to(h0.dtype), multipliers=torch.where(good, lam, 0.0),
                      status=status)


def _compiled(backend: str, h0: torch.Tensor, *others: float | torch.Tensor | None) -> bool:
    """Whether :func:`project` runs compiled: the backend resolves to ``"cpu"`` and no input needs a gradient."""
    tensors = [t for t in (h0, *others) if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" for t in tensors) and kernels.resolve(backend, h0.device) == "cpu"


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
            preset's (:class:`ProjectionSettings`).
        depth: target depth m relative to the constraint set, as SafeFlow's — every violation ends
            <= −depth × ``constraints.safe_depth`` (default: the preset's).
        margin: the same target as an absolute number in violation units (instead of ``depth``).
        max_rounds: projections per row at most (see the module doc).
        ramp_rounds: rounds over which the target depth ramps up to m.
        solver: ``"cvxpylayers"`` (default) or ``"native"`` (same result, much faster; see
            :mod:`~safeflow.steerers.dual_qp`).
        backend: kernel backend (:mod:`safeflow.kernels`) for the native solver. On a polytope whose
            backend (or this one) resolves to ``"cpu"``, every round runs in one compiled call
            (:func:`safeflow.kernels.projection_steer`; the same decisions, states within float
            rounding, see the tests); ``"torch"`` runs the eager rounds (the reference). None follows
            the constraint set's backend. Other constraint sets always run the eager rounds.
        preset: model preset supplying the defaults (a :class:`~safeflow.presets.ModelPreset` or its
            name, see :mod:`safeflow.presets`; one without projection settings: the defaults of
            :class:`ProjectionSettings`).

    ``iterations`` in the :class:`~safeflow.steerers.SteerResult` counts rounds; ``inside`` is
    computed from the true violations (a certificate). A row whose first round fails (infeasible
    constraints, solver failure) is rejected: the original state is kept. A row that never reaches
    depth m keeps its latest point and is reported inside or not by its true violations.
    """

    settings_type = ProjectionSettings
    #: The paper's presets: euclidean, to the boundary (as their SafeFlow); the default model's:
    #: the covariance metric and depth 3 (as its SafeFlow).
    preset_settings = {
        "llama-2-7b": ProjectionSettings(metric="euclidean", depth=0.0),
        "ministral-8b": ProjectionSettings(metric="euclidean", depth=0.0),
        "qwen2-1.5b": ProjectionSettings(metric="euclidean", depth=0.0),
        "smollm2-135m-instruct": ProjectionSettings(metric="covariance", depth=3.0),
    }

    def __init__(self, metric: str | None = None, depth: float | None = None, *, margin: float | None = None,
                 max_rounds: int = 8, ramp_rounds: int = 4, solver: str = "cvxpylayers",
                 backend: str | None = None, preset: ModelPreset | str | None = "default") -> None:
        p: ProjectionSettings = self.settings_from_preset(preset) or ProjectionSettings()
        metric = p.metric if metric is None else metric
        if depth is None and margin is None:
            depth = p.depth
        check_depth(margin, depth)
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
        if solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "cvxpylayers" and not all(importlib.util.find_spec(m) for m in ("cvxpy", "cvxpylayers")):
            raise ConfigError("solver='cvxpylayers' needs the packages cvxpy and cvxpylayers (dependencies of safeflow); "
                              "install them, or pass solver='native' (the same projection, in PyTorch)")
        for name, value in (("max_rounds", max_rounds), ("ramp_rounds", ramp_rounds)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        self.metric, self.solver, self.max_rounds, self.ramp_rounds = metric, solver, max_rounds, ramp_rounds
        self.backend = backend if backend is None else kernels.check_name(backend)
        self.depth = None if depth is None else float(depth)
        self.margin = None if margin is None else float(margin)

    @classmethod
    def build(cls, data: SteeringData, **options: Any) -> ProjectionSteerer:
        """For a run: the native solver (the same projection as cvxpylayers', much faster) unless
        ``options`` name another, and the run's preset."""
        options.setdefault("solver", "native")
        steerer = super().build(data, **options)
        assert isinstance(steerer, ProjectionSteerer)
        return steerer

    def __repr__(self) -> str:
        target = f"depth={self.depth}" if self.margin is None else f"margin={self.margin}"
        return (f"ProjectionSteerer(metric={self.metric!r}, {target}, max_rounds={self.max_rounds}, "
                f"ramp_rounds={self.ramp_rounds}, solver={self.solver!r}, backend={self.backend!r})")

    def check(self, constraints: ConstraintSet) -> None:
        super().check(constraints)
        target_margin(constraints, self.margin, self.depth)  # a relative depth needs the set's safe_depth
        if self.metric == "covariance":
            require_covariance(constraints, "metric='covariance'", "metric='euclidean'")

    def target(self, constraints: ConstraintSet) -> float:
        """The target depth m in the constraint set's violation units."""
        return target_margin(constraints, self.margin, self.depth)

    def metric_matrix(self, constraints: ConstraintSet) -> torch.Tensor | None:
        """M: None (identity) or the constraint set's covariance scaled to mean eigenvalue 1, float64."""
        if self.metric == "euclidean":
            return None
        return kernels.derived(constraints.input_covariance, "unit-trace metric", _unit_trace, always=True)

    @torch.no_grad()
    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        M = self.metric_matrix(constraints)
        n, m = len(h), self.target(constraints)
        backend: str = self.backend or getattr(constraints, "backend", None) or "auto"
        if self.solver == "native" and isinstance(constraints, PolytopeConstraints):
            if kernels.resolve(backend, h.device, h.dtype) == "cpu":
                W, b, Phi, xi = constraints.kernel_operands()
                out, rounds, status = kernels.projection_steer(
                    h, W, b, Phi, xi, M=M, margin=m, max_rounds=self.max_rounds, ramp_rounds=self.ramp_rounds,
                    WM=None if M is None else kernels.metric_rows(W, M, h.dtype), backend="cpu")
                if (status != Status.OK).any():
                    log.info("projection: %d row(s) not solved in their last round (status %s)",
                             int((status != Status.OK).sum()),
                             sorted({Status(int(s)).name for s in status[status != Status.OK]}))
                return out, rounds
        best = torch.full((n,), torch.inf, dtype=torch.float64, device=h.device)  # M-distance of the best point
        out = h.clone()  # the nearest point found at depth m, else the latest one
        rounds = torch.zeros(n, dtype=torch.long, device=h.device)
        failed = torch.zeros(n, dtype=torch.bool, device=h.device)
        x, active = h.clone(), torch.arange(n, device=h.device)
        G = torch.zeros(h.shape, dtype=torch.float64, device=h.device)  # x − h = −M G, so ‖x − h‖² in M⁻¹ is GᵀMG
        restore = torch.zeros(n, dtype=torch.bool, device=h.device)  # last point short of its depth: project it
        for r in range(1, self.max_rounds + 1):
            depth = m * min(1.0, r / min(self.ramp_rounds, self.max_rounds))
            base = torch.where(restore[active, None], x[active], h[active])
            A, c = constraints.local_affine(x[active])
            # aim a hair deeper, so that rounding h* to float32 cannot leave it short
            slack = 1e-4 * (1.0 + m + constraints.violations(h[active]).abs().amax(1, keepdim=True))
            p = project(base, A, c, margin=depth + slack, metric=M, solver=self.solver, backend=backend)
            good = p.status == Status.OK
            failed[active[~good & (rounds[active] == 0)]] = True
            if not good.all():
                log.info("projection: %d row(s) not solved (status %s)", int((~good).sum()),
                         sorted({Status(int(s)).name for s in p.status[~good]}))
            active, base, slack = active[good], base[good], slack[good]
            step, g = p.hidden[good] - base, (A[good].double().mT @ p.multipliers[good][..., None])[..., 0]
            rounds[active] += 1
            # the linear model changes on the way: the nearest point at this depth on the segment base → h*
            t = _shortest(constraints, base, step, -depth - slack / 2)
            short = torch.isnan(t)
            t = torch.where(short, 1.0, t)
            new = base + t[:, None] * step
            G[active] = torch.where(restore[active, None], G[active], 0.0) + t.double()[:, None] * g
            dist = (G[active] * (G[active] if M is None else G[active] @ M)).sum(1).sqrt()
            reached = constraints.violations(new).amax(1) <= -m
            better = reached & (dist < best[active] * (1 - 1e-3))
            keep = better | torch.isinf(best[active])
            out[active[keep]] = new[keep]
            best[active[better]] = dist[better]
            x[active], restore[active] = new, short
            active = active[(depth < m) | ~reached | better]  # stop at depth m once no closer
            if active.numel() == 0:
                break
        out[failed] = torch.nan  # the caller keeps the original state and reports the row as rejected
        return out, rounds


def _unit_trace(cov: torch.Tensor) -> torch.Tensor:
    """cov [d, d] in float64, scaled to mean eigenvalue 1."""
    cov = cov.detach().double()
    return cov / (cov.trace() / cov.shape[0])


def _shortest(constraints: ConstraintSet, h0: torch.Tensor, step: torch.Tensor, level: torch.Tensor,
              bisections: int = 8) -> torch.Tensor:
    """Smallest t in (0, 1] (to 2⁻⁸, by bisection) with every violation at h0 + t·step <= level [M, 1];
    NaN for rows where t = 1 is not."""
    ok = constraints.violations(h0 + step).amax(1, keepdim=True) <= level
    lo, hi = torch.zeros_like(level), torch.ones_like(level)
    for _ in range(bisections):
        mid = (lo + hi) / 2
        inside = constraints.violations(h0 + mid * step).amax(1, keepdim=True) <= level
        hi, lo = torch.where(inside, mid, hi), torch.where(inside, lo, mid)
    return torch.where(ok, hi, torch.nan)[:, 0]
