"""Line steering: the constraint set decides when and how far, a fitted direction decides where.

SafeFlow and the projection move a state to the nearest point inside the constraint set — in the
L1 or a Mahalanobis geometry — and the nearest point is often one from which the model still
turns to the harmful help a few tokens later. An activation addition (:mod:`.direction`) moves
along the direction in which the model's own states differ between the two behaviours, which
induces the behaviour strongly, but by a fixed amount everywhere. Line steering combines them:
for each selected row (outside the constraint set) it moves along the fitted unit direction u,

    h' = h + t* u,     t* = min { t in [0, t_max] : max_k v_k(h + t u) <= −m },

the smallest step that brings the true violations to the target depth m (bracketed by doubling,
then bisection to ``tolerance`` of the step; ``t_max`` = ``max_scale`` × the fitted mean
difference's norm). A row that cannot reach depth m along u within ``t_max`` moves by
``t_max`` and is reported by its true violations (``inside`` False).

``fit(H_from, H_to)`` sets u to the unit difference of means, mean(H_to) − mean(H_from): for a
refusal polytope, from the states of answers that help (unsafe) to those of refusals (safe) —
``fit(states.H[states.y == 1], states.H[states.y == 0])`` — or the prompt-level refusal
direction of the peers, from harmless to harmful prompts.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..constraints.base import ConstraintSet
from ..errors import ConfigError, DataError
from .base import SteeringData, check_depth, target_margin
from .fitted import FittedSteerer


class LineSteerer(FittedSteerer, name="line"):
    """Move rows outside the constraint set along a fitted direction to depth m (see the module doc).

    Args:
        input_dim: hidden size d.
        depth: target depth m relative to the constraint set's ``safe_depth`` (as SafeFlow's; default 1).
        margin: the same target as an absolute number in violation units (instead of ``depth``).
        max_scale: longest move, in units of the fitted mean difference's norm.
        tolerance: bisection stops when the bracket is shorter than this fraction of ``t_max``.
    """

    direction: torch.Tensor
    scale: torch.Tensor

    def __init__(self, input_dim: int, depth: float | None = None, *, margin: float | None = None,
                 max_scale: float = 4.0, tolerance: float = 1e-3) -> None:
        super().__init__(input_dim)
        if depth is None and margin is None:
            depth = 1.0
        check_depth(margin, depth)
        for name, value in (("max_scale", max_scale), ("tolerance", tolerance)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        self.depth = None if depth is None else float(depth)
        self.margin = None if margin is None else float(margin)
        self.max_scale, self.tolerance = float(max_scale), float(tolerance)
        self.register_buffer("direction", torch.zeros(input_dim))  # unit vector u
        self.register_buffer("scale", torch.tensor(0.0))  # ‖mean(H_to) − mean(H_from)‖

    def config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim, "depth": self.depth, "margin": self.margin, "max_scale": self.max_scale,
                "tolerance": self.tolerance}

    def __repr__(self) -> str:
        target = f"depth={self.depth}" if self.margin is None else f"margin={self.margin}"
        return f"LineSteerer(input_dim={self.input_dim}, {target}, max_scale={self.max_scale}, fitted={bool(self.fitted)})"

    @torch.no_grad()
    def fit(self, H_from: Any, H_to: Any) -> LineSteerer:
        """u = (mean(H_to) − mean(H_from)) / ‖·‖ from states [N₁, d] and [N₀, d] of one model's layer."""
        diff = self._states(H_to, "H_to").mean(0) - self._states(H_from, "H_from").mean(0)
        norm = diff.norm()
        if not norm > 0:
            raise DataError("the two sets of states have the same mean, so there is no direction; pass states of "
                            "the two behaviours (e.g. complying and refusing answers)")
        self.direction.copy_(diff / norm)
        self.scale.fill_(float(norm))
        self.fitted.fill_(True)
        return self

    def fit_data(self, data: SteeringData) -> None:
        """From the states of answers that help (unsafe) to those of refusals (safe)."""
        y = data.response_labels
        self.fit(data.responses[y == 1], data.responses[y == 0])

    def check(self, constraints: ConstraintSet) -> None:
        super().check(constraints)
        target_margin(constraints, self.margin, self.depth)  # a relative depth needs the set's safe_depth

    @torch.no_grad()
    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        m = target_margin(constraints, self.margin, self.depth)
        u = self.direction.to(h)
        t_max = self.max_scale * float(self.scale)

        def deep(t: torch.Tensor) -> torch.Tensor:  # [M] bool: all v_k(h + t u) <= −m
            return constraints.violations(h + t[:, None] * u).amax(1) <= -m

        lo = torch.zeros(len(h), dtype=h.dtype, device=h.device)  # known not deep enough (h itself is outside)
        hi = torch.full_like(lo, t_max)
        reached = deep(hi)
        t = torch.full_like(lo, t_max / 64)
        steps = torch.ones(len(h), dtype=torch.long, device=h.device)
        found = torch.zeros_like(reached)
        while bool((t < t_max).any()):  # doubling: the first power-of-two step that is deep enough
            ok = deep(t) & ~found & reached
            hi = torch.where(ok, t, hi)
            lo = torch.where(~found & ~ok & (t < hi), t, lo)
            found |= ok
            steps += (~found).long()
            t = t * 2
        for _ in range(max(1, math.ceil(math.log2(1 / self.tolerance)))):  # bisection on [lo, hi]
            live = reached & (hi - lo > self.tolerance * t_max)
            if not bool(live.any()):
                break
            mid = (lo + hi) / 2
            ok = deep(mid)
            hi = torch.where(live & ok, mid, hi)
            lo = torch.where(live & ~ok, mid, lo)
            steps += live.long()
        return h + hi[:, None] * u, steps
