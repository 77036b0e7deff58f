"""A constraint family and a steerer written the way a user would: one small file, registered by
importing it, no edit of safeflow. ``tests/test_conformance.py`` drives them through the Python
API, the command line (``safeflow train`` / ``generate`` / ``demo``) and the report.

* ``"toy-ball"``: the safe set is a ball around the mean of the safe training rows,
  ``v(h) = ‖h − c‖ / r − 1`` (one constraint), ``r`` the ``quantile`` of the safe rows' distances.
* ``"toy-toward-mean"``: move a row outside the set towards the safe training mean recorded by
  ``fit`` (``class_means[0]``), in ``steps`` equal steps, stopping at the first one inside.

Each declares its own per-model settings here (``settings_type``, ``preset_settings``): a value
for the ``"qwen2-1.5b"`` preset, the class defaults for every other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from safeflow import ConstraintSet, Steerer
from safeflow.errors import ConfigError
from safeflow.features import FeatureDataset, Moments


@dataclass(frozen=True)
class BallSettings:
    """The toy ball's settings in a model preset: a fit option."""

    quantile: float


@dataclass(frozen=True)
class TowardSettings:
    """The toy steerer's settings in a model preset: a constructor argument."""

    steps: int


class BallConstraint(ConstraintSet, name="toy-ball"):
    """Safe iff inside the ball of radius ``r`` around the safe training mean ``c``."""

    fit_option_rules = {"quantile": lambda v: None if isinstance(v, (int, float)) and not isinstance(v, bool)
                        and 0 < v <= 1 else "a number in (0, 1]"}
    settings_type = BallSettings
    preset_settings = {"qwen2-1.5b": BallSettings(quantile=0.75)}

    def __init__(self, input_dim: int) -> None:
        super().__init__(input_dim)
        self.num_constraints = 1
        self.center = nn.Parameter(torch.zeros(input_dim))
        self.radius = nn.Parameter(torch.ones(()))

    def config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim}

    def violations(self, H: torch.Tensor) -> torch.Tensor:
        H = self._inputs(H)
        return ((H - self.center).norm(dim=1) / self.radius - 1.0)[:, None]

    @torch.no_grad()
    def _train(self, data: FeatureDataset, stats: Moments, *, progress: bool, quantile: float = 0.9) -> list[float]:
        safe = torch.cat([X[y == 0] for X, y in data.labelled_chunks()]).to(self.center)
        if not len(safe):
            raise ConfigError("the toy ball needs safe (label 0) rows")
        self.center.copy_(safe.mean(0))
        self.radius.copy_(torch.quantile((safe - self.center).norm(dim=1), quantile).clamp_min(1e-6))
        return []


class TowardSafeMean(Steerer, name="toy-toward-mean"):
    """Move each selected row towards the constraint set's safe training mean until inside."""

    settings_type = TowardSettings
    preset_settings = {"qwen2-1.5b": TowardSettings(steps=3)}

    def __init__(self, steps: int = 8) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = steps

    def __repr__(self) -> str:
        return f"TowardSafeMean(steps={self.steps})"

    @torch.no_grad()
    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        target = constraints.class_means[0].to(h)
        out, used = h.clone(), torch.zeros(len(h), dtype=torch.long, device=h.device)
        moving = torch.ones(len(h), dtype=torch.bool, device=h.device)
        for k in range(1, self.steps + 1):
            x = h[moving] + (k / self.steps) * (target - h[moving])
            out[moving], used[moving] = x, k
            inside = constraints.violations(x).max(dim=1).values <= 0
            moving[moving.clone()] = ~inside
            if not moving.any():
                break
        return out, used
