"""The eager PyTorch reference of every kernel operation (the ``"torch"`` backend).

Shapes: H [B, d], W [F, d], b [F], Φ [K, F], ξ [K]; D = diag(H Wᵀ + b > 0) per row.
These are the expressions :class:`~safeflow.constraints.PolytopeConstraints` has always used;
the compiled backends are tested against them in float64. As on the compiled backends, rows
whose V holds a NaN get NaN input gradients and NaN A and c, and inactive features contribute
exactly 0 (a non-finite weight C or facet entry on an inactive feature changes nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F


def violations(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """V = ReLU(H Wᵀ + b) Φᵀ − ξ [B, K] (differentiable in every argument)."""
    return F.relu(F.linear(H, W, b)) @ Phi.T - xi


@torch.no_grad()
def violations_vjp(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
                   weights: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """V [B, K] and ∂(Σ C ⊙ V)/∂H = ((C Φ) ⊙ D) W [B, d] for weights C [B, K] (or a function V -> C)."""
    pre = F.linear(H, W, b)
    V = F.relu(pre) @ Phi.T - xi
    C = weights(V) if callable(weights) else weights
    G = torch.where(pre > 0, C @ Phi, 0.0) @ W  # inactive features contribute exactly 0, even for inf weights
    return V, G.masked_fill(V.isnan().any(1, keepdim=True), math.nan)


@torch.no_grad()
def local_affine(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor,
                 xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Φ D W [B, K, d] and c = ξ − Φ D b [B, K], so that V = A h − c within each row's pattern."""
    pre = F.linear(H, W, b)
    nan = (F.relu(pre) @ Phi.T - xi).isnan().any(1)
    PhiD = torch.where((pre > 0).unsqueeze(1), Phi.unsqueeze(0), 0.0)  # [B, K, F]: Φ on each row's active features
    return (PhiD @ W).masked_fill(nan[:, None, None], math.nan), (xi - PhiD @ b).masked_fill(nan[:, None], math.nan)
