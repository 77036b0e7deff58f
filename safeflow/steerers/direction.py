"""Activation addition along a refusal direction — the peer every steering paper compares with.

Arditi et al. (2024, "Refusal in language models is mediated by a single direction"), Turner et
al. (ActAdd) and Rimsky et al. (CAA): the difference of mean hidden states at layer L,

    r = mean_i h(harmful_i) − mean_j h(harmless_j)        [d],

added with a coefficient to the residual stream: ``h' = h + α r`` — registered as
``"direction"``, run without a gate (``gate="token"``): plain activation addition.

Conditional activation steering (Lee et al. 2024, CAST; IBM's ``activation-steering``) adds a
*behaviour* vector only where a condition on the prompt's state fires. Its behaviour vector
contrasts the model's states while it refuses with its states while it complies — in safeflow the
response states of the refusal polytope (:mod:`safeflow.responses`): ``r = mean(refusing) −
mean(complying)`` — and its condition is a prompt detector, the gate of :func:`~safeflow.steering`
(decided per row; IBM's library decides from the first batch row). Registered as ``"cast"``
(:class:`ConditionalSteerer`).

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
    default_gate = "token"  # plain activation addition is unconditional
    unconditional = True  # moves every row the gate passes

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

    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        return h + self.alpha * self.direction.to(h), torch.ones(h.shape[0], dtype=torch.long, device=h.device)


class ConditionalSteerer(DirectionSteerer, name="cast"):
    """CAST: ``h' = h + α r`` with the behaviour vector r = mean(refusing) − mean(complying) response
    states, on the rows a prompt detector flags (see the module doc)."""

    default_gate = "detector"

    def fit_data(self, data: SteeringData) -> None:
        """The behaviour vector: refusing (label 0) minus complying (label 1) response states."""
        y = data.response_labels
        self.fit(data.responses[y == 0], data.responses[y == 1])
