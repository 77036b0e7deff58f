"""Activation addition along a refusal direction — the peer every steering paper compares with.

Arditi et al. (2024, "Refusal in language models is mediated by a single direction"), Turner et
al. (ActAdd) and Rimsky et al. (CAA): the difference of mean hidden states at layer L,

    r = mean_i h(harmful_i) − mean_j h(harmless_j)        [d],

added with a coefficient to the residual stream: ``h' = h + α r``. With a detector as the gate of
:func:`~safeflow.steering` this is conditional activation steering (Lee et al. 2024, CAST: the
addition only where a condition on the prompt's state fires — per row here, where IBM's
``activation-steering`` decides from the first batch row); with ``gate="token"`` it is plain,
unconditional activation addition.

Where safeflow differs from the papers: the hidden states are the last prompt token's (the state
that produces the first answer token; the papers choose among the post-instruction positions by
validation), and the addition is applied where every safeflow steerer acts — to the newest
position of each eligible row for the first ``first_n_tokens`` steps (the papers add it at every
position, prompt included). The coefficient is chosen on validation data only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..constraints.base import ConstraintSet
from ..errors import ConfigError, DataError
from .base import SteeringData
from .fitted import FittedSteerer


class DirectionSteerer(FittedSteerer, name="direction"):
    """``h' = h + α r`` on every row the gate passes (see the module doc).

    Args:
        input_dim: hidden size d.
        alpha: the coefficient α, in units of the fitted difference of means (1: move by one
            mean difference; negative values move toward the harmless mean, which removes
            refusal — an attack, not a defence).
    """

    direction: torch.Tensor

    def __init__(self, input_dim: int, alpha: float = 1.0) -> None:
        super().__init__(input_dim)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ConfigError(f"alpha must be a finite number, got {alpha!r}")
        self.alpha = float(alpha)
        self.register_buffer("direction", torch.zeros(input_dim))

    def config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim, "alpha": self.alpha}

    def __repr__(self) -> str:
        return f"DirectionSteerer(input_dim={self.input_dim}, alpha={self.alpha}, fitted={bool(self.fitted)})"

    @torch.no_grad()
    def fit(self, H_harmful: Any, H_harmless: Any) -> DirectionSteerer:
        """Set ``r`` = mean(H_harmful) − mean(H_harmless) from states [N₁, d] and [N₀, d] of the same
        model and layer (computed in float64). Returns self."""
        r = self._states(H_harmful, "H_harmful").mean(0) - self._states(H_harmless, "H_harmless").mean(0)
        if not r.norm() > 0:
            raise DataError("the harmful and harmless states have the same mean, so there is no direction; pass "
                            "states of harmful and of harmless prompts")
        self.direction.copy_(r)
        self.fitted.fill_(True)
        return self

    def fit_data(self, data: SteeringData) -> None:
        """The prompt-level refusal direction: harmful minus harmless prompt states."""
        self.fit(data.harmful, data.harmless)

    def select(self, violations: torch.Tensor) -> torch.Tensor:
        """Every row: an activation addition is unconditional; the gate chooses the rows."""
        return torch.ones(violations.shape[0], dtype=torch.bool, device=violations.device)

    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        return h + self.alpha * self.direction.to(h), torch.ones(h.shape[0], dtype=torch.long, device=h.device)
