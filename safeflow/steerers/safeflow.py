"""SafeFlow (Algorithm 1 of Chen, As & Krause, ICML 2025): gradient steps back into the polytope.

For each row h outside the constraint set, minimise over h'

    L(h') = ‖h' − h‖₁ / d + λ_safe · Σ_k v_k(h') + λ_unsafe · Σ_k ReLU(v_k(h') + m)

by gradient descent (step size ``lr``) for up to ``max_steps`` steps, stopping each row as soon
as it is inside with margin m to spare (all ``v_k(h') <= −m``; m = 0 is the paper's algorithm).
The gradient of the violation terms is a vector-Jacobian product with weights
``λ_safe + λ_unsafe·[v_k > −m]``, which the polytope computes in closed form (``((c Φ) ⊙ D) W``
for activation pattern D).

``precondition="covariance"`` takes the steps ``h' ← h' − lr · P ∇L(h')`` with P the covariance
of the constraint set's training states, scaled to mean eigenvalue 1: steepest descent in the
Mahalanobis geometry of the hidden states. The objective and the stopping rule are unchanged;
the path follows the directions in which hidden states actually vary. For a linear boundary
between two classes, the plain gradient is the discriminant ``Σ⁻¹(μ₁ − μ₀)`` while the
preconditioned one is the mean difference ``μ₁ − μ₀`` itself — on the default model the mean
difference is what changes the model's behaviour (see the concepts page of the docs).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..constraints.base import ConstraintSet
from ..constraints.polytope import PolytopeConstraints
from ..errors import ConfigError, DataError
from ..presets import preset as get_preset
from .base import Steerer

PRECONDITIONERS = ("none", "covariance")


class SafeFlowSteerer(Steerer, name="safeflow"):
    """Gradient-based SafeFlow steering.

    Args:
        lambda_unsafe, lambda_safe: loss weights (default: the ``preset``'s).
        preset: a model preset from :mod:`safeflow.presets` supplying the defaults of every
            argument left as None (paper: ``"llama-2-7b"``, ``"ministral-8b"``, ``"qwen2-1.5b"``;
            ``"default"``).
        lr: gradient-descent step size (paper: 0.01).
        max_steps: step budget per row (paper: up to 100; the reference code took 1).
        margin: target depth m — stop once every violation is <= −m (0: as soon as inside).
        precondition: ``"none"`` (plain gradient, the paper) or ``"covariance"`` (see the module doc).
        backend: kernel backend (:mod:`safeflow.kernels`) for a polytope: a compiled one runs the
            whole loop in one call; ``"torch"`` runs the eager loop below; None (default) uses the
            constraint set's own ``backend``. Other constraint sets always run the eager loop.
    """

    def __init__(self, lambda_unsafe: float | None = None, lambda_safe: float | None = None, *, preset: str = "default",
                 lr: float = 0.01, max_steps: int = 100, margin: float | None = None,
                 precondition: str | None = None, backend: str | None = None) -> None:
        p = get_preset(preset)
        margin = p.steer_margin if margin is None else float(margin)
        precondition = p.precondition if precondition is None else precondition
        if max_steps < 1 or lr <= 0 or margin < 0:
            raise ConfigError(f"need max_steps >= 1, lr > 0, margin >= 0; got {max_steps}, {lr}, {margin}")
        if precondition not in PRECONDITIONERS:
            raise ConfigError(f"precondition must be one of {PRECONDITIONERS}, got {precondition!r}")
        self.lambda_unsafe = p.lambda_unsafe if lambda_unsafe is None else float(lambda_unsafe)
        self.lambda_safe = p.lambda_safe if lambda_safe is None else float(lambda_safe)
        self.lr, self.max_steps, self.margin, self.precondition = float(lr), int(max_steps), margin, precondition
        self.backend = backend if backend is None else kernels.check_name(backend)

    def __repr__(self) -> str:
        return (f"SafeFlowSteerer(lambda_unsafe={self.lambda_unsafe}, lambda_safe={self.lambda_safe}, lr={self.lr}, "
                f"max_steps={self.max_steps}, margin={self.margin}, precondition={self.precondition!r}, "
                f"backend={self.backend!r})")

    def _weights(self, V: torch.Tensor) -> torch.Tensor:
        return self.lambda_safe + self.lambda_unsafe * (V > -self.margin).to(V.dtype)

    def _preconditioner(self, constraints: ConstraintSet) -> torch.Tensor | None:
        if self.precondition == "none":
            return None
        cov = constraints.input_covariance.float()
        scale = cov.trace() / cov.shape[0]
        if not scale > 0:
            raise DataError("precondition='covariance' needs the covariance of the constraint set's training states, "
                            "which this one lacks; fit it with this version of safeflow or pass precondition='none'")
        return cov / scale

    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        P = self._preconditioner(constraints)
        if isinstance(constraints, PolytopeConstraints):
            name = kernels.resolve(self.backend or constraints.backend, h.device)
            if name != "torch":
                return kernels.safeflow_loop(h, *constraints.kernel_operands(), P=P, lr=self.lr,
                                             lambda_safe=self.lambda_safe, lambda_unsafe=self.lambda_unsafe,
                                             margin=self.margin, max_steps=self.max_steps, backend=name)
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
            x[active] -= self.lr * (grad if P is None else grad @ P)
            steps[active] += 1
        return x, steps
