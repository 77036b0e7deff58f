"""Line steering: the constraint set decides when and how far, its own training data where.

SafeFlow and the projection move a state to the nearest point inside the constraint set — in the
L1 or a Mahalanobis geometry — and the nearest point is often one from which the model still
turns to the harmful help a few tokens later. An activation addition (:mod:`.direction`) moves
along the direction in which the model's states differ between the two behaviours, which
induces the behaviour strongly, but by a fixed amount everywhere. Line steering combines them:
for each selected row (outside the constraint set) it moves along the unit direction u from the
mean of the constraint set's unsafe training rows to the mean of its safe ones
(:attr:`~safeflow.constraints.ConstraintSet.class_means`, recorded by ``fit``) —

    h' = h + t* u,     t* = min { t in [0, t_max] : max_k v_k(h + t u) <= −m },

the smallest step that brings the true violations to the target depth m (bracketed by doubling,
then bisection to ``tolerance`` of ``t_max``; ``t_max`` = ``max_scale`` × the distance between the
two means). For a refusal polytope (:mod:`safeflow.responses`) u points from the states of
answers that help with harm to those of refusals. A row that cannot reach depth m along u within
``t_max`` moves by ``t_max`` and is reported by its true violations (``inside`` False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..constraints.base import ConstraintSet
from ..errors import ConfigError, DataError
from ..presets import PRESETS, ModelPreset
from .base import Steerer, check_depth, target_margin


@dataclass(frozen=True)
class LineSettings:
    """Line steering's settings in a model preset (:mod:`safeflow.presets`)."""

    depth: float = 3.0  #: target depth, in units of the steering constraint set's ``safe_depth``


class LineSteerer(Steerer, name="line"):
    """Move rows outside the constraint set along its safe-minus-unsafe mean direction to depth m
    (see the module doc).

    Args:
        depth: target depth m relative to the constraint set's ``safe_depth`` (default: the
            preset's, :class:`LineSettings`).
        margin: the same target as an absolute number in violation units (instead of ``depth``).
        max_scale: longest move, in units of the distance between the two class means.
        tolerance: bisection stops when the bracket is shorter than this fraction of ``t_max``.
        preset: model preset supplying the default depth (a :class:`~safeflow.presets.ModelPreset`
            or its name, see :mod:`safeflow.presets`; one without line settings: 3).
    """

    settings_type = LineSettings
    #: Depth 3 for every preset (chosen on the default model's validation source).
    preset_settings = dict.fromkeys(PRESETS, LineSettings(depth=3.0))

    def __init__(self, depth: float | None = None, *, margin: float | None = None, max_scale: float = 4.0,
                 tolerance: float = 1e-3, preset: ModelPreset | str | None = "default") -> None:
        if depth is None and margin is None:
            depth = (self.settings_from_preset(preset) or LineSettings()).depth
        check_depth(margin, depth)
        for name, value in (("max_scale", max_scale), ("tolerance", tolerance)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        self.depth = None if depth is None else float(depth)
        self.margin = None if margin is None else float(margin)
        self.max_scale, self.tolerance = float(max_scale), float(tolerance)

    def __repr__(self) -> str:
        target = f"depth={self.depth}" if self.margin is None else f"margin={self.margin}"
        return f"LineSteerer({target}, max_scale={self.max_scale}, tolerance={self.tolerance})"

    def check(self, constraints: ConstraintSet) -> None:
        super().check(constraints)
        target_margin(constraints, self.margin, self.depth)  # a relative depth needs the set's safe_depth
        self.direction(constraints)

    @staticmethod
    def direction(constraints: ConstraintSet) -> tuple[torch.Tensor, float]:
        """(u [d], ‖mean_safe − mean_unsafe‖): the unit direction from the constraint set's unsafe
        training mean to its safe one, and the distance between them."""
        diff = constraints.class_means[0] - constraints.class_means[1]
        norm = float(diff.norm())
        if not norm > 0:
            raise DataError("line steering needs the means of the constraint set's safe and unsafe training rows, "
                            "which this one lacks (saved before format 4); fit it again, or call "
                            "constraints.record_class_means(H, y) with its training states (and save it)")
        return diff / norm, norm

    @torch.no_grad()
    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        m = target_margin(constraints, self.margin, self.depth)
        u, scale = self.direction(constraints)
        u = u.to(h)
        t_max = self.max_scale * scale

        def deep(t: torch.Tensor) -> torch.Tensor:  # [M] bool: all v_k(h + t u) <= −m
            return constraints.violations(h + t[:, None] * u).amax(1) <= -m

        lo = torch.zeros(len(h), dtype=h.dtype, device=h.device)  # not deep enough: h itself is outside
        hi = torch.full_like(lo, t_max)
        reached = deep(hi)
        found = torch.zeros_like(reached)
        steps = torch.ones(len(h), dtype=torch.long, device=h.device)
        t = torch.full_like(lo, t_max / 64)
        while bool((t < t_max).any()):  # doubling: the first step t_max·2^-k that is deep enough
            ok = deep(t) & ~found & reached
            hi = torch.where(ok, t, hi)
            lo = torch.where(~found & ~ok, t, lo)
            found |= ok
            steps += (~found).long()
            t = t * 2
        for _ in range(math.ceil(math.log2(1 / self.tolerance))):  # bisection on [lo, hi]
            live = reached & (hi - lo > self.tolerance * t_max)
            if not bool(live.any()):
                break
            mid = (lo + hi) / 2
            ok = deep(mid)
            hi = torch.where(live & ok, mid, hi)
            lo = torch.where(live & ~ok, mid, lo)
            steps += live.long()
        return h + hi[:, None] * u, steps
