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

import math
from dataclasses import dataclass

import torch

from .. import kernels
from ..constraints.base import ConstraintSet
from ..constraints.polytope import PolytopeConstraints
from ..errors import ConfigError
from ..presets import ModelPreset
from .base import Steerer, check_depth, require_covariance, target_margin

PRECONDITIONERS = ("none", "covariance")


@dataclass(frozen=True)
class SafeFlowSettings:
    """SafeFlow's settings in a model preset (:mod:`safeflow.presets`); the defaults — the paper's
    algorithm (plain gradient, stop at the boundary) with λ_unsafe = 4, λ_safe = 0 — apply with a
    preset that holds none."""

    lambda_unsafe: float = 4.0  #: λ_unsafe
    lambda_safe: float = 0.0  #: λ_safe
    depth: float = 0.0  #: target depth, in units of the steering constraint set's ``safe_depth``
    precondition: str = "none"  #: ``"none"`` or ``"covariance"``


class SafeFlowSteerer(Steerer, name="safeflow"):
    """Gradient-based SafeFlow steering.

    Args:
        lambda_unsafe, lambda_safe: loss weights (default: the ``preset``'s).
        preset: a model preset (:mod:`safeflow.presets`; a :class:`~safeflow.presets.ModelPreset`
            or its name) whose SafeFlow settings (:class:`SafeFlowSettings`, ``preset.settings["safeflow"]``)
            supply every argument left as None (``"default"``: the relative default; paper:
            ``"llama-2-7b"``, ``"ministral-8b"``, ``"qwen2-1.5b"``; a preset without SafeFlow
            settings: the defaults of :class:`SafeFlowSettings`).
        lr: gradient-descent step size (paper: 0.01).
        max_steps: step budget per row (paper: up to 100; the reference code took 1).
        depth: target depth m relative to the constraint set — stop once every violation is
            <= −depth × ``constraints.safe_depth`` (1: as deep as a typical safe training state;
            0: as soon as inside, the paper's algorithm). Carries over across models and layers.
        margin: the same target as an absolute number in violation units (instead of ``depth``).
        precondition: ``"none"`` (plain gradient, the paper) or ``"covariance"`` (see the module doc).
        backend: kernel backend (:mod:`safeflow.kernels`) for a polytope: a compiled one runs the
            whole loop in one call; ``"torch"`` runs the eager loop below; None (default) uses the
            constraint set's own ``backend``. Other constraint sets always run the eager loop.
    """

    settings_type = SafeFlowSettings
    #: The paper's SafeFlow weights (plain gradient into the boundary) and the default model's.
    preset_settings = {
        "llama-2-7b": SafeFlowSettings(lambda_unsafe=4.0, lambda_safe=1e-4),
        "ministral-8b": SafeFlowSettings(lambda_unsafe=0.25, lambda_safe=0.0),
        "qwen2-1.5b": SafeFlowSettings(lambda_unsafe=10.0, lambda_safe=5000.0),
        "smollm2-135m-instruct": SafeFlowSettings(lambda_unsafe=4.0, lambda_safe=0.0, depth=3.0,
                                                  precondition="covariance"),
    }

    def __init__(self, lambda_unsafe: float | None = None, lambda_safe: float | None = None, *,
                 preset: ModelPreset | str | None = "default", lr: float = 0.01, max_steps: int = 100,
                 depth: float | None = None, margin: float | None = None, precondition: str | None = None,
                 backend: str | None = None) -> None:
        p: SafeFlowSettings = self.settings_from_preset(preset) or SafeFlowSettings()
        if depth is None and margin is None:
            depth = p.depth
        check_depth(margin, depth)
        precondition = p.precondition if precondition is None else precondition
        lambda_unsafe = p.lambda_unsafe if lambda_unsafe is None else lambda_unsafe
        lambda_safe = p.lambda_safe if lambda_safe is None else lambda_safe
        for name, value in (("lr", lr), ("lambda_unsafe", lambda_unsafe), ("lambda_safe", lambda_safe)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf or (
                    name == "lr" and value == 0):
                raise ConfigError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ConfigError(f"max_steps must be an int >= 1, got {max_steps!r}")
        if precondition not in PRECONDITIONERS:
            raise ConfigError(f"precondition must be one of {PRECONDITIONERS}, got {precondition!r}")
        self.lambda_unsafe, self.lambda_safe = float(lambda_unsafe), float(lambda_safe)
        self.lr, self.max_steps, self.precondition = float(lr), max_steps, precondition
        self.depth = None if depth is None else float(depth)
        self.margin = None if margin is None else float(margin)
        self.backend = backend if backend is None else kernels.check_name(backend)

    def __repr__(self) -> str:
        target = f"depth={self.depth}" if self.margin is None else f"margin={self.margin}"
        return (f"SafeFlowSteerer(lambda_unsafe={self.lambda_unsafe}, lambda_safe={self.lambda_safe}, lr={self.lr}, "
                f"max_steps={self.max_steps}, {target}, precondition={self.precondition!r}, backend={self.backend!r})")

    def check(self, constraints: ConstraintSet) -> None:
        super().check(constraints)
        target_margin(constraints, self.margin, self.depth)  # a relative depth needs the set's safe_depth
        if self.precondition == "covariance":
            require_covariance(constraints, "precondition='covariance'", "precondition='none'")

    def _preconditioner(self, constraints: ConstraintSet) -> torch.Tensor | None:
        if self.precondition == "none":
            return None
        # cached per version of the covariance buffer (changed only by copy_), so that the kernels'
        # caches keyed on P hit between calls
        return kernels.derived(constraints.input_covariance, "preconditioner",
                               lambda cov: cov / (cov.trace() / cov.shape[0]), always=True)

    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        P = self._preconditioner(constraints)
        m = target_margin(constraints, self.margin, self.depth)
        if isinstance(constraints, PolytopeConstraints):
            name = kernels.resolve(self.backend or constraints.backend, h.device, h.dtype)
            if name != "torch":
                return kernels.safeflow_loop(h, *constraints.kernel_operands(), P=P, lr=self.lr,
                                             lambda_safe=self.lambda_safe, lambda_unsafe=self.lambda_unsafe,
                                             margin=m, max_steps=self.max_steps, backend=name)

        def weights(V: torch.Tensor) -> torch.Tensor:  # ∂/∂v of λ_s Σ v + λ_u Σ ReLU(v + m)
            return self.lambda_safe + self.lambda_unsafe * (V > -m).to(V.dtype)

        x = h.clone()
        d = h.shape[1]
        steps = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        active = torch.arange(h.shape[0], device=h.device)
        for _ in range(self.max_steps):
            V, grad = constraints.violations_vjp(x[active], weights)
            keep = (V.max(dim=1).values > -m) & torch.isfinite(V).all(dim=1)
            active, grad = active[keep], grad[keep]
            if active.numel() == 0:
                break
            grad = grad + torch.sign(x[active] - h[active]) / d
            x[active] -= self.lr * (grad if P is None else grad @ P)
            steps[active] += 1
        return x, steps
