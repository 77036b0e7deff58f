"""Null-space constrained steering (AlphaSteer, Sheng et al. 2025): a learned linear steering map
that leaves benign states alone without a gate.

Row vectors throughout: a state h [1, d] is steered to ``h' = h + s · h Δ`` with the steering
matrix Δ [d, d] and strength s. Δ is fitted in closed form from states of benign prompts
H_b [N_b, d] and harmful prompts H_h [N_h, d] of one model's layer:

1. **Null space of the benign states.** P = Q Qᵀ, where the columns of Q are the eigenvectors of
   H_bᵀ H_b with (numerically) zero eigenvalues — at least ``null_fraction`` · d of the smallest —
   so that H_b P ≈ 0 and any Δ = P Δ̃ leaves benign states (nearly) unchanged: h_b Δ ≈ 0.
2. **Ridge regression onto the refusal direction.** With X = H_h P and every target row the
   refusal direction r (by default the difference of mean harmful and benign states),
   ``Δ̃ = (XᵀX + λ PᵀP)⁻¹ Xᵀ R``, R = 1 rᵀ [N_h, d]; λ = ``ridge`` × tr(XᵀX)/d (relative, so the
   setting carries over between models), and ``Δ = P Δ̃``: harmful states are mapped onto r.

Where safeflow differs from the reference code: the map is applied where every safeflow steerer
acts (the newest position of each row, for the first ``first_n_tokens`` steps) to each row's own
state; the reference adds the last prompt token's ``s · h Δ`` to every prompt position at prefill
only. The strength is chosen on validation data only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..constraints.base import ConstraintSet
from ..errors import ConfigError
from .base import SteeringData
from .fitted import FittedSteerer


class NullSpaceSteerer(FittedSteerer, name="alphasteer"):
    """``h' = h + s · h Δ`` with a null-space constrained steering matrix Δ (see the module doc).

    Args:
        input_dim: hidden size d.
        strength: s; 1 maps a typical harmful state onto one refusal direction.
    """

    matrix: torch.Tensor
    default_gate = "token"  # the null-space constraint leaves benign states alone without a gate
    unconditional = True  # moves every row

    def __init__(self, input_dim: int, strength: float = 1.0) -> None:
        super().__init__(input_dim)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ConfigError(f"strength must be a finite number, got {strength!r}")
        self.strength = float(strength)
        self.register_buffer("matrix", torch.zeros(input_dim, input_dim))

    def config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim, "strength": self.strength}

    def __repr__(self) -> str:
        return f"NullSpaceSteerer(input_dim={self.input_dim}, strength={self.strength}, fitted={bool(self.fitted)})"

    @torch.no_grad()
    def fit(self, H_harmful: Any, H_benign: Any, direction: Any = None, *, ridge: float = 1e-2,
            null_fraction: float = 0.1) -> NullSpaceSteerer:
        """Fit Δ from harmful states [N_h, d] and benign states [N_b, d] (float64; see the module doc).

        ``direction``: the refusal direction r [d] to map harmful states onto (default: the
        difference of the two means). ``ridge``: relative ridge λ. ``null_fraction``: the least
        share of dimensions kept as the benign null space. Returns self.
        """
        for name, value, low, high in (("ridge", ridge, 0.0, math.inf), ("null_fraction", null_fraction, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise ConfigError(f"{name} must be a number in ({low:g}, {high:g}], got {value!r}")
        Hh, Hb = self._states(H_harmful, "H_harmful"), self._states(H_benign, "H_benign")
        r = Hh.mean(0) - Hb.mean(0) if direction is None else self._states(
            torch.as_tensor(direction).reshape(1, -1), "direction")[0]
        d = self.input_dim
        eigenvalues, vectors = torch.linalg.eigh(Hb.T @ Hb)  # ascending
        zero = eigenvalues <= eigenvalues[-1] * d * torch.finfo(torch.float64).eps
        keep = max(int(zero.sum()), math.ceil(null_fraction * d))
        Q = vectors[:, :keep]
        P = Q @ Q.T
        X = Hh @ P
        gram = X.T @ X
        lam = ridge * float(gram.trace()) / d
        target = X.T @ r.expand(len(Hh), d)
        tilde = torch.linalg.lstsq(gram + lam * (P.T @ P), target).solution
        self.matrix.copy_(P @ tilde)
        self.fitted.fill_(True)
        return self

    def fit_data(self, data: SteeringData) -> None:
        """Harmful and harmless prompt states."""
        self.fit(data.harmful, data.harmless)

    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        return h + self.strength * (h @ self.matrix.to(h)), torch.ones(h.shape[0], dtype=torch.long, device=h.device)
