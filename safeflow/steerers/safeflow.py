"""SafeFlow (Algorithm 1 of Chen, As & Krause, ICML 2025): gradient steps back into the polytope.

For each row h outside the constraint set, minimise over h'

    L(h') = ‖h' − h‖₁ / d + λ_safe · Σ_k v_k(h') + λ_unsafe · Σ_k ReLU(v_k(h'))

with plain gradient descent (learning rate ``lr``) for up to ``max_steps`` steps, stopping each
row as soon as it is inside with ``margin`` to spare (all ``v_k(h') <= −margin``). The gradient
of the violation terms is a vector-Jacobian product with weights ``λ_safe + λ_unsafe·[v_k > 0]``,
which the polytope computes in closed form (``((c Φ) ⊙ D) W`` for activation pattern D).
"""

from __future__ import annotations

import torch

from ..constraints.base import ConstraintSet
from ..errors import ConfigError
from ..presets import preset as get_preset
from .base import Steerer


class SafeFlowSteerer(Steerer, name="safeflow"):
    """Gradient-based SafeFlow steering.

    Args:
        lambda_unsafe, lambda_safe: loss weights (default: the ``preset``'s).
        preset: a model preset from :mod:`safeflow.presets` supplying the default weights
            (paper: ``"llama-2-7b"``, ``"ministral-8b"``, ``"qwen2-1.5b"``; ``"default"``).
        lr: gradient-descent step size (paper: 0.01).
        max_steps: step budget per row (paper: up to 100; the reference code took 1).
        margin: stop once every violation is <= −margin (0: as soon as inside).
    """

    def __init__(self, lambda_unsafe: float | None = None, lambda_safe: float | None = None, *, preset: str = "default",
                 lr: float = 0.01, max_steps: int = 100, margin: float = 0.0) -> None:
        if max_steps < 1 or lr <= 0 or margin < 0:
            raise ConfigError(f"need max_steps >= 1, lr > 0, margin >= 0; got {max_steps}, {lr}, {margin}")
        p = get_preset(preset)
        self.lambda_unsafe = p.lambda_unsafe if lambda_unsafe is None else float(lambda_unsafe)
        self.lambda_safe = p.lambda_safe if lambda_safe is None else float(lambda_safe)
        self.lr, self.max_steps, self.margin = float(lr), int(max_steps), float(margin)

    def __repr__(self) -> str:
        return (f"SafeFlowSteerer(lambda_unsafe={self.lambda_unsafe}, lambda_safe={self.lambda_safe}, lr={self.lr}, "
                f"max_steps={self.max_steps}, margin={self.margin})")

    def _weights(self, V: torch.Tensor) -> torch.Tensor:
        return self.lambda_safe + self.lambda_unsafe * (V > 0).to(V.dtype)

    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        x = h.clone()
        d = h.shape[1]
        steps = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        active = torch.arange(h.shape[0], device=h.device)
        for _ in range(self.max_steps):
            V, grad = constraints.violations_vjp(x[active], self._weights)
            keep = (V.max(dim=1).values > -self.margin) & torch.isfinite(V).all(dim=1)
            active, grad = active[keep], grad[keep]
            if active.numel() == 0:
                break
            grad = grad + torch.sign(x[active] - h[active]) / d
            x[active] -= self.lr * grad
            steps[active] += 1
        return x, steps

