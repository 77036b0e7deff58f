"""The ``Steerer`` interface: move hidden states that violate constraints back inside.

``steer(hidden [B, d], constraints) -> SteerResult``. Rows already inside (all violations <= 0)
are returned untouched; only rows outside are handed to the implementation's ``_move``. The
optimisation runs in float32 whatever the input dtype (float64 for a float64 constraint set); rows
whose input or result is not finite are rejected (the original hidden state is kept and ``rejected`` says so).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..constraints.base import ConstraintSet
from ..errors import DataError
from ..registry import Registered


@dataclass
class SteerResult:
    """Outcome of one ``steer`` call for a batch of B rows and K constraints."""

    hidden: torch.Tensor  #: [B, d] new hidden states, input dtype and device
    steered: torch.Tensor  #: [B] bool, row was outside and has been moved
    violations_before: torch.Tensor  #: [B, K] float32
    violations_after: torch.Tensor  #: [B, K] float32
    iterations: torch.Tensor  #: [B] long, optimisation steps used (0 for rows left alone)
    inside: torch.Tensor  #: [B] bool, all violations_after <= 0
    rejected: torch.Tensor  #: [B] bool, input or result NaN/inf (or the steerer gave up); original row kept
    shift: torch.Tensor  #: [B] float32, L2 norm of the change made to each row


class Steerer(Registered, ABC, kind="steerer"):
    """Moves hidden states outside a constraint set back inside. Configured by its own
    hyper-parameters; receives the constraint set at call time."""

    def steer(self, hidden: torch.Tensor, constraints: ConstraintSet) -> SteerResult:
        """Steer rows of ``hidden`` [B, d] that violate ``constraints``; see :class:`SteerResult`."""
        if hidden.ndim != 2 or hidden.shape[1] != constraints.input_dim:
            raise DataError(
                f"hidden states of shape {tuple(hidden.shape)} do not match the constraint set's input size "
                f"{constraints.input_dim}; steer [B, {constraints.input_dim}] rows from the layer it was trained on"
            )
        param = next(constraints.parameters())
        h = hidden.detach().to(device=param.device, dtype=torch.promote_types(param.dtype, torch.float32))
        with torch.no_grad():
            before = constraints.violations(h)
        outside = before.max(dim=1).values > 0
        B = h.shape[0]
        iterations = torch.zeros(B, dtype=torch.long, device=h.device)
        rejected = ~torch.isfinite(h).all(dim=1)  # NaN/inf states are left as they are
        after, new = before, h
        if outside.any():
            moved, steps = self._move(h[outside], constraints)
            bad = ~torch.isfinite(moved).all(dim=1)
            moved[bad] = h[outside][bad]
            new = h.clone()
            new[outside] = moved
            iterations[outside] = steps
            rejected[outside] = bad
            with torch.no_grad():
                after = before.clone()
                after[outside] = constraints.violations(moved)
        steered = outside & ~rejected
        return SteerResult(
            hidden=new.to(device=hidden.device, dtype=hidden.dtype) if outside.any() else hidden,
            steered=steered, violations_before=before, violations_after=after, iterations=iterations,
            inside=after.max(dim=1).values <= 0, rejected=rejected, shift=(new - h).norm(dim=1),
        )

    @abstractmethod
    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Move rows h [M, d] (float32, all outside) toward the inside.

        Returns the new rows [M, d] (may contain NaN/inf; the caller rejects those rows) and the
        number of steps used per row [M].
        """


def scaled_covariance(constraints: ConstraintSet) -> torch.Tensor:
    """The constraint set's ``input_covariance`` [d, d] (float32) scaled to mean eigenvalue 1."""
    cov = constraints.input_covariance.float()
    scale = cov.trace() / cov.shape[0]
    if not scale > 0:
        raise DataError("steering in the covariance geometry needs the covariance of the constraint set's training "
                        "states, which this one lacks; fit it with this version of safeflow, or pass "
                        "precondition='none' (SafeFlow) / metric='euclidean' (projection)")
    return cov / scale
