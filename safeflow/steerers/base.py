"""The ``Steerer`` interface: move hidden states that violate constraints back inside.

``steer(hidden [B, d], constraints) -> SteerResult``. Rows already inside (all violations <= 0)
are returned untouched; only rows outside are handed to the implementation's ``_move``. The
optimisation runs in the constraint set's dtype (float32 or float64; float16/bfloat16 constraint
sets are refused — convert them with ``.float()``) whatever the hidden states' dtype. The result
is cast back to the hidden states' dtype *before* it is judged: rows whose written value is not
finite are rejected (the original hidden state is kept and ``rejected`` says so), and
``violations_after`` / ``inside`` describe exactly the value written back. Rows that arrive
non-finite (NaN/inf from upstream, or violations that overflow) are left untouched and marked
``nonfinite``; ``steer`` never raises on them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..checks import check_float, check_tensor
from ..constraints.base import ConstraintSet
from ..errors import ConfigError, DataError
from ..registry import Registered

#: Dtypes a constraint set may compute steering in.
STEER_DTYPES = (torch.float32, torch.float64)


@dataclass
class SteerResult:
    """Outcome of one ``steer`` call for a batch of B rows and K constraints."""

    hidden: torch.Tensor  #: [B, d] new hidden states, input dtype and device
    steered: torch.Tensor  #: [B] bool, row was outside and has been moved
    violations_before: torch.Tensor  #: [B, K] in the constraint set's dtype
    violations_after: torch.Tensor  #: [B, K] of the value written back (``hidden``), constraint set's dtype
    iterations: torch.Tensor  #: [B] long, optimisation steps used (0 for rows left alone)
    inside: torch.Tensor  #: [B] bool, all violations_after <= 0
    rejected: torch.Tensor  #: [B] bool, result was NaN/inf in the output dtype; original row kept
    shift: torch.Tensor  #: [B] L2 norm of the change made to each row
    nonfinite: torch.Tensor  #: [B] bool, the row or its violations were NaN/inf on arrival; left untouched


def target_margin(constraints: ConstraintSet, margin: float | None, depth: float | None) -> float:
    """The steering target depth m in the constraint set's violation units: ``margin`` as given
    (absolute), or ``depth × constraints.safe_depth`` (relative: 1 = as deep as a typical safe
    training state). Exactly one of the two is set."""
    if margin is not None:
        return margin
    assert depth is not None
    if depth == 0:
        return 0.0
    unit = float(constraints.safe_depth)
    if unit < 0:
        raise DataError(
            f"a relative steering depth ({depth}) needs the constraint set's safe_depth, which this one lacks "
            "(it was saved before format 3); call constraints.calibrate_depth(H_safe) with safe hidden states "
            "(and save it again), or give an absolute margin= instead of depth="
        )
    return depth * unit


def check_depth(margin: float | None, depth: float | None) -> None:
    """Validate a steerer's ``margin`` / ``depth`` pair: exactly one, finite and >= 0."""
    if (margin is None) == (depth is None):
        raise ConfigError(f"give exactly one of margin= (absolute) and depth= (relative to the constraint set's "
                          f"safe depth); got margin={margin!r}, depth={depth!r}")
    value = margin if margin is not None else depth
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
        raise ConfigError(f"the steering {'margin' if margin is not None else 'depth'} must be a finite number >= 0, "
                          f"got {value!r}")


def require_covariance(constraints: ConstraintSet, setting: str, fallback: str) -> None:
    """A covariance-based ``setting`` needs the constraint set's ``input_covariance`` (recorded by
    ``fit``); name the ``fallback`` setting otherwise."""
    if not constraints.input_covariance.trace() > 0:
        raise DataError(f"{setting} needs the covariance of the constraint set's training states, which this one "
                        f"lacks; fit it with this version of safeflow or pass {fallback}")


class Steerer(Registered, ABC, kind="steerer"):
    """Moves hidden states outside a constraint set back inside. Configured by its own
    hyper-parameters; receives the constraint set at call time."""

    def check(self, constraints: ConstraintSet) -> None:
        """Raise now (:class:`ConfigError` / :class:`DataError`) what :meth:`steer` would raise with
        ``constraints``; :func:`~safeflow.steering` calls it before generation starts."""
        if not isinstance(constraints, ConstraintSet):
            raise ConfigError(f"constraints must be a fitted ConstraintSet, got {type(constraints).__name__}; "
                              "load one with ConstraintSet.load(path) or fit one")
        constraints.require_fitted()
        if constraints.dtype not in STEER_DTYPES:
            raise ConfigError(f"this constraint set is {constraints.dtype}; steering optimises in float32 or float64 "
                              "(small steps vanish in half precision): call .float() on the constraint set (the model "
                              "may stay in half precision)")

    def steer(self, hidden: torch.Tensor, constraints: ConstraintSet) -> SteerResult:
        """Steer rows of ``hidden`` [B, d] that violate ``constraints``; see :class:`SteerResult`."""
        self.check(constraints)
        check_float("hidden", check_tensor("hidden", hidden))  # a tensor with values (not meta), real floats
        if hidden.ndim != 2 or hidden.shape[1] != constraints.input_dim:
            raise DataError(
                f"hidden states of shape {tuple(hidden.shape)} do not match the constraint set's input size "
                f"{constraints.input_dim}; steer [B, {constraints.input_dim}] rows from the layer it was trained on"
            )
        param = next(constraints.parameters())
        h = hidden.detach().to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            before = constraints.violations(h)
        nonfinite = ~(torch.isfinite(h).all(dim=1) & torch.isfinite(before).all(dim=1))
        outside = (before.max(dim=1).values > 0) & ~nonfinite
        B = h.shape[0]
        iterations = torch.zeros(B, dtype=torch.long, device=h.device)
        rejected = torch.zeros(B, dtype=torch.bool, device=h.device)
        after, new = before, h
        if outside.any():
            moved, steps = self._move(h[outside], constraints)
            written = moved.detach().to(hidden.dtype).to(h.dtype)  # what the model will actually see
            bad = ~torch.isfinite(written).all(dim=1)
            written[bad] = h[outside][bad]
            new = h.clone()
            new[outside] = written
            iterations[outside] = steps
            rejected[outside] = bad
            with torch.no_grad():
                after = before.clone()
                after[outside] = constraints.violations(written)
        steered = outside & ~rejected
        return SteerResult(
            hidden=new.to(device=hidden.device, dtype=hidden.dtype) if outside.any() else hidden,
            steered=steered, violations_before=before, violations_after=after, iterations=iterations,
            inside=after.max(dim=1).values <= 0, rejected=rejected,
            shift=torch.where(nonfinite, 0.0, (new - h).norm(dim=1)), nonfinite=nonfinite,
        )

    @abstractmethod
    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Move rows h [M, d] (in the constraint set's dtype, all outside) toward the inside.

        Returns the new rows [M, d] (may contain NaN/inf; the caller rejects those rows) and the
        number of steps used per row [M].
        """
