"""The K-dimensional dual of a projection onto a polyhedron, solved exactly and differentiably.

For B independent problems, with ``Q`` [B, K, K] symmetric positive definite and ``r`` [B, K],

    λ* = argmin_{λ >= 0}  ½ λᵀ Q λ − rᵀ λ                                   (1)

KKT: ``w = r − Q λ* <= 0``, ``λ* >= 0``, ``λ*_k w_k = 0``. On the support S = {k : λ*_k > 0}
the solution is ``λ*_S = Q_SS⁻¹ r_S``, so (for strict complementarity) ``dλ*_S = Q_SS⁻¹ (dr_S −
dQ_SS λ*_S)`` and the backward pass is ``u = Q_SS⁻¹ ḡ_S``, ``r̄ = u``, ``Q̄ = −u λ*ᵀ`` (symmetrised:
Q enters through ``(Q + Qᵀ)/2``).

Two solvers, selected by name:

* ``"native"`` — batched active-set methods in PyTorch (primal–dual steps, then Lawson–Hanson
  for a quadratic objective where those have not converged): exact in finitely many steps, one
  masked K×K Cholesky solve per step, any device; backward by the implicit differentiation above.
* ``"cvxpylayers"`` — (1) as a DPP-compliant :class:`cvxpylayers.torch.CvxpyLayer` with parameters
  ``L`` (the Cholesky factor of Q, so ``½‖Lᵀλ‖²`` is the quadratic term) and ``r``, solved by
  SCS through diffcp (tolerance 1e-10); gradients from diffcp's (dense) adjoint of the conic program.

Both return ``(λ [B, K] float64, status [B] long)`` with :class:`Status` codes; rows that fail
get ``λ = 0`` and a non-zero status, never an exception.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import Any

import torch

from ..errors import ConfigError

SOLVERS = ("native", "cvxpylayers")


class Status(IntEnum):
    """Outcome of one projection problem."""

    OK = 0  #: solved; the projection satisfies the linear constraints
    INFEASIBLE = 1  #: the linear constraints have no solution (e.g. contradictory facets)
    SOLVER_FAILED = 2  #: the solver did not converge or raised (SCS, in cvxpylayers, also on most infeasible systems)
    NONFINITE = 3  #: the input (state, A or c) has NaN/inf


def solve_dual(Q: torch.Tensor, r: torch.Tensor, solver: str = "native") -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (1) for Q [B, K, K] (symmetric positive definite) and r [B, K], in float64.

    Returns λ [B, K] (differentiable in Q and r) and status [B] (:class:`Status`). Rows with
    r <= 0 get λ = 0 without a solve; rows with non-finite input or a failed solve get λ = 0.
    """
    if solver not in SOLVERS:
        raise ConfigError(f"unknown projection solver {solver!r}; valid: {', '.join(SOLVERS)}")
    Q, r = Q.double(), r.double()
    finite = torch.isfinite(Q).flatten(1).all(1) & torch.isfinite(r).all(1)
    work = finite & (r > 0).any(1)  # r <= 0: λ = 0 is optimal, exactly
    lam = torch.zeros_like(r)
    status = torch.where(finite, Status.OK, Status.NONFINITE)
    if work.any():
        solve = _NativeDual.apply if solver == "native" else _cvxpylayers_dual
        solved, ok = solve(Q[work], r[work])
        ok = ok & torch.isfinite(solved).all(1)
        lam = lam.index_put((work.nonzero()[:, 0],), torch.where(ok[:, None], solved, 0.0))
        status[work] = torch.where(ok, Status.OK, Status.SOLVER_FAILED)
    return lam, status


# --- native: batched active set ------------------------------------------------------------
def _solve_on(Q: torch.Tensor, r: torch.Tensor, free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z with ``Q_FF z_F = r_F`` and ``z = 0`` off the free set F [B, K]; also whether Q_FF factorised."""
    both = free[:, :, None] & free[:, None, :]
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    L, info = torch.linalg.cholesky_ex(torch.where(both, Q, eye))
    return torch.cholesky_solve(torch.where(free, r, 0.0)[..., None], L)[..., 0], info == 0


def _pdas(Q: torch.Tensor, r: torch.Tensor, tol: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Primal–dual active-set (semismooth Newton) steps from the support guess {k : r_k > 0}: solve
    on the support F, then keep k ∈ F with λ_k > 0 and add k ∉ F with ``w_k = (r − Qλ)_k > 0``.
    Usually exact in a few steps, but not guaranteed to converge. Returns the last support, its
    solution λ, and which rows satisfy KKT (λ_F > 0, w <= 0 off F)."""
    free = r > tol[:, None]
    for i in range(iters + 1):
        lam, factored = _solve_on(Q, r, free)
        w = r - (Q @ lam[..., None])[..., 0]
        new = torch.where(free, lam > 0, w > tol[:, None]) & factored[:, None]
        if i == iters or torch.equal(new, free):
            break
        free = new
    return free, lam, factored & (new == free).all(1)


def active_set(Q: torch.Tensor, r: torch.Tensor, max_iter: int | None = None,
               pdas_steps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched exact solve of (1): λ [B, K] and converged [B] bool.

    First up to ``pdas_steps`` primal–dual active-set steps (:func:`_pdas`); rows they leave unsolved continue
    with Lawson–Hanson for a quadratic objective (finite, monotone), from λ = 0 and the PDAS
    support: each step solves the problem restricted to the free set; a solution with a
    non-positive entry is approached only as far as λ stays >= 0 and the entries that reach 0
    leave the free set; a positive one is accepted, and the constraint with the largest
    ``w_k = (r − Qλ)_k > 0`` joins the free set. Stops when no ``w_k`` off the free set is
    positive (KKT holds).
    """
    B, K = r.shape
    max_iter = 3 * K + 20 if max_iter is None else max_iter
    tol = 1e-12 * (r.abs().amax(1) + 1e-300)
    free, z, done = _pdas(Q, r, tol, iters=pdas_steps)
    if bool(done.all()):
        return z, done
    lam = torch.where(done[:, None], z, 0.0)
    adding = done.clone()  # row's λ solves its free set: may add
    ok = torch.ones(B, dtype=torch.bool, device=r.device)
    for _ in range(max_iter):
        w = r - (Q @ lam[..., None])[..., 0]
        cand = torch.where(free, -torch.inf, w)
        best_w, best = cand.max(1)
        done = done | (adding & ~(best_w > tol))
        if bool(done.all()):
            return lam, ok
        add = adding & ~done
        free = free | (add[:, None] & (torch.arange(K, device=r.device) == best[:, None]))
        z, factored = _solve_on(Q, r, free)
        ok = ok & (factored | done)
        neg = free & (z <= 0)
        accept = ~neg.any(1)
        ratio = torch.where(neg, lam / (lam - z).clamp_min(1e-300), torch.inf)
        alpha = ratio.amin(1, keepdim=True).clamp(0, 1)
        stepped = lam + alpha * (z - lam)
        live = (~done)[:, None]
        lam = torch.where(live, torch.where(accept[:, None], z, stepped), lam)
        leave = live & ~accept[:, None] & (neg & (ratio <= alpha) | (free & (lam <= 0)))
        free = free & ~leave
        lam = torch.where(leave, 0.0, lam)
        adding = accept | done
    return lam, ok & done


class _NativeDual(torch.autograd.Function):
    """λ* of (1) by :func:`active_set`; backward by implicit differentiation on the support.
    Q enters through its symmetric part ``(Q + Qᵀ)/2``, so the gradient is symmetric too."""

    @staticmethod
    def forward(Q: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return active_set((Q + Q.mT) / 2, r)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        Q, _ = inputs
        lam, ok = output
        ctx.save_for_backward(Q, lam)
        ctx.mark_non_differentiable(ok)

    @staticmethod
    def backward(ctx: Any, grad_lam: torch.Tensor, _grad_ok: Any) -> tuple[torch.Tensor, torch.Tensor]:
        Q, lam = ctx.saved_tensors
        lam = torch.where(torch.isfinite(lam), lam, 0.0)  # failed rows: no gradient, and no NaN for the others
        u, _ = _solve_on((Q + Q.mT) / 2, grad_lam, lam > 0)
        grad_Q = -u[:, :, None] * lam[:, None, :]
        return (grad_Q + grad_Q.mT) / 2, u


# --- cvxpylayers ---------------------------------------------------------------------------
#: cvxpylayers 1.2 under NumPy 2 warns about ``__array__`` and ``copy`` on every call; only that is silenced.
_NUMPY2_COPY_WARNING = r"__array__ implementation doesn't accept a copy keyword"
#: SCS at tight tolerances reaches ~1e-10 relative on (1) (Clarabel through diffcp's conic form stalls
#: near 1e-5); diffcp's dense derivative matches the implicit one to ~1e-9 (its default, lsqr, to ~1e-5).
_SOLVER_ARGS = {"solve_method": "SCS", "eps_abs": 1e-10, "eps_rel": 1e-10, "max_iters": 20000, "mode": "dense",
                "n_jobs_forward": 1, "n_jobs_backward": 1}


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NUMPY2_COPY_WARNING, category=DeprecationWarning)
        yield


@functools.lru_cache(maxsize=16)
def dual_layer(K: int):
    """The CvxpyLayer of (1) for K constraints: parameters ``(L [K, K], r [K])``, variable λ [K].

    Written as ``½‖Lᵀλ‖² − rᵀλ`` with ``L Lᵀ = Q`` — parameter times variable, so the problem is
    DPP and cvxpy canonicalises it once per K.
    """
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    L, r, lam = cp.Parameter((K, K)), cp.Parameter(K), cp.Variable(K)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ lam) - r @ lam), [lam >= 0])
    assert problem.is_dpp()
    return CvxpyLayer(problem, parameters=[L, r], variables=[lam])


class _LayerCall(torch.autograd.Function):
    """One call of :func:`dual_layer`, forward and backward under :func:`_quiet` (cvxpylayers'
    own backward would run outside any ``catch_warnings`` of the caller)."""

    @staticmethod
    def forward(ctx: Any, L: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad(), _quiet():
            L_, r_ = L.detach().requires_grad_(), r.detach().requires_grad_()
            (lam,) = dual_layer(r.shape[1])(L_, r_, solver_args=_SOLVER_ARGS)
        ctx.graph = (L_, r_, lam)
        return lam.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L_, r_, lam = ctx.graph
        with _quiet():
            dL, dr = torch.autograd.grad(lam, (L_, r_), grad)
        return dL, dr


def _cvxpylayers_dual(Q: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (1) with cvxpylayers; a batch that fails is retried row by row to isolate the failures."""
    device = r.device
    L, info = torch.linalg.cholesky_ex(Q.cpu())
    r = r.cpu()
    ok = info == 0
    L = torch.where(ok[:, None, None], L, torch.eye(r.shape[1], dtype=L.dtype))
    try:
        lam = _LayerCall.apply(L, r)
    except Exception:  # noqa: BLE001 — diffcp raises SolverError, ValueError, ...; report per row
        rows = []
        for i in range(len(r)):
            try:
                rows.append(_LayerCall.apply(L[i : i + 1], r[i : i + 1]))
            except Exception:  # noqa: BLE001
                ok[i] = False
                rows.append(torch.zeros_like(r[i : i + 1]))
        lam = torch.cat(rows)
    return lam.clamp_min(0.0).to(device), ok.to(device)
