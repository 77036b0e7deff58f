"""The ``Steerer`` interface: move hidden states that violate constraints back inside.

``steer(hidden [B, d], constraints) -> SteerResult``. Which rows move is the steerer's
:meth:`Steerer.select`: by default the rows outside the constraint set (some violation > 0) —
rows already inside are returned untouched; an *unconditional* steerer (an activation addition,
:mod:`safeflow.steerers.peers`) selects every finite row and leaves the choice of rows to the
gate of :func:`~safeflow.steering`. Only selected rows are handed to the implementation's ``_move``. The
optimisation runs in the constraint set's dtype (float32 or float64; float16/bfloat16 constraint
sets are refused — convert them with ``.float()``) whatever the hidden states' dtype. The result
is cast back to the hidden states' dtype *before* it is judged: rows whose written value is not
finite are rejected (the original hidden state is kept and ``rejected`` says so), and
``violations_after`` / ``inside`` describe exactly the value written back. Rows that arrive
non-finite (NaN/inf from upstream, or violations that overflow) are left untouched and marked
``nonfinite``; ``steer`` never raises on them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..checks import check_float, check_tensor
from ..constraints.base import ConstraintSet
from ..errors import ConfigError, DataError
from ..presets import ModelPreset, PresetConfigured
from ..saving import load_component

#: Format version of saved (fitted) steerers.
STEERER_FORMAT = 1
#: Dtypes a constraint set may compute steering in.
STEER_DTYPES = (torch.float32, torch.float64)


@dataclass
class SteerResult:
    """Outcome of one ``steer`` call for a batch of B rows and K constraints."""

    hidden: torch.Tensor  #: [B, d] new hidden states, input dtype and device
    steered: torch.Tensor  #: [B] bool, row was selected (by default: outside) and has been moved
    violations_before: torch.Tensor  #: [B, K] in the constraint set's dtype
    violations_after: torch.Tensor  #: [B, K] of the value written back (``hidden``), constraint set's dtype
    iterations: torch.Tensor  #: [B] long, optimisation steps used (0 for rows left alone)
    inside: torch.Tensor  #: [B] bool, all violations_after <= 0
    rejected: torch.Tensor  #: [B] bool, result was NaN/inf in the output dtype; original row kept
    shift: torch.Tensor  #: [B] L2 norm of the change made to each row
    nonfinite: torch.Tensor  #: [B] bool, the row or its violations were NaN/inf on arrival; left untouched


@dataclass(frozen=True)
class SteeringData:
    """The hidden states of one model's layer that a run offers a steerer to fit itself from
    (:meth:`Steerer.build`): the training prompts' last-token states and the response states of
    the refusal polytope (:mod:`safeflow.responses`)."""

    harmful: torch.Tensor  #: [N₁, d] states of harmful prompts
    harmless: torch.Tensor  #: [N₀, d] states of harmless prompts
    responses: torch.Tensor  #: [M, d] response states
    response_labels: torch.Tensor  #: [M] long, 1 = the answer helps with the harmful request, 0 = it refuses
    provenance: dict[str, Any] = field(default_factory=dict)  #: the states' source (:func:`~safeflow.describe_source`)
    preset: str | None = None  #: the model preset of the run


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


class Steerer(PresetConfigured, ABC, kind="steerer"):
    """Moves hidden states outside a constraint set back inside. Configured by its own
    hyper-parameters; receives the constraint set at call time.

    A steerer with per-model settings declares their dataclass (``settings_type``, whose fields are
    constructor arguments) and its values per preset (``preset_settings``, see
    :class:`~safeflow.presets.PresetConfigured`); :meth:`from_preset` and
    ``Steerer.create(name, preset=...)`` build it with them. The built-in steerers also take the
    preset themselves (``SafeFlowSteerer(preset=...)``).
    """

    #: The gate a comparison steers with (:func:`~safeflow.steering`'s ``gate``): ``"detector"`` —
    #: the rows a prompt detector flags — or ``"token"`` for a steerer meant to run without a gate.
    default_gate: ClassVar[str] = "detector"
    #: True for a steerer that moves every row it is given (an activation addition), whatever the
    #: constraint set says: :meth:`select` then chooses all rows and the gate alone decides.
    unconditional: ClassVar[bool] = False

    @classmethod
    def create(cls, name: str, **config: Any) -> Steerer:
        """Build the steerer registered under ``name`` with ``config``; ``preset=`` (a model preset
        or its name) builds it with its settings in that preset (:meth:`from_preset`). An argument
        its constructor does not take raises :class:`ConfigError` naming the valid ones."""
        if "preset" in config:
            return cls.implementation(name).from_preset(config.pop("preset"), **config)
        return super().create(name, **config)

    @classmethod
    def from_preset(cls, preset: ModelPreset | str | None, **options: Any) -> Steerer:
        """This steerer with its settings in a model preset (a :class:`~safeflow.presets.ModelPreset`
        or its name; None: the relative default): ``cls(**{**options_from_preset(preset), **options})``,
        explicit ``options`` taking precedence. An option the constructor does not take raises
        :class:`ConfigError` naming the valid ones."""
        cls.check_options(options)
        return cls(**{**cls.options_from_preset(preset), **options})

    @classmethod
    def options_from_preset(cls, preset: ModelPreset | str | None) -> dict[str, Any]:
        """Constructor arguments from a model preset: ``{"preset": preset}`` for a constructor that
        takes the preset itself (the built-in steerers), else the fields of this steerer's settings
        in the preset (:meth:`~safeflow.presets.PresetConfigured.settings_from_preset`) that its
        constructor takes; {} where the preset holds none (the constructor's defaults apply)."""
        options = cls.constructor_options()
        if "preset" in options:
            return {"preset": preset}
        return {k: v for k, v in cls.preset_fields(preset).items() if k in options}

    @classmethod
    def build(cls, data: SteeringData, **options: Any) -> Steerer:
        """This steerer for a run (the demo, the attack protocol, the command line): built with the
        run's ``preset`` (:meth:`from_preset`; None: the relative default) and ``options``. A steerer
        with learned tensors overrides this to fit itself on ``data``."""
        return cls.from_preset(data.preset, **options)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Steerer:
        """Read a fitted steerer (:class:`~safeflow.steerers.FittedSteerer`) saved with its ``save``;
        never executes code from the file (:mod:`safeflow.saving`)."""
        return load_component(path, Steerer.registry, cls, component="steerer", readable_versions=(STEERER_FORMAT,))

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

    def check_model(self, model: nn.Module, layer: int, check_provenance: bool = True) -> None:
        """Raise now if this steerer cannot steer ``model``'s layer ``layer`` (:func:`~safeflow.steering`
        calls it). A steerer without learned tensors fits any model; a fitted one checks its
        hidden size and recorded provenance."""

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
        chosen = self.select(before) & ~nonfinite
        B = h.shape[0]
        iterations = torch.zeros(B, dtype=torch.long, device=h.device)
        rejected = torch.zeros(B, dtype=torch.bool, device=h.device)
        after, new = before, h
        if chosen.any():
            moved, steps = self._move(h[chosen], constraints)
            written = moved.detach().to(hidden.dtype).to(h.dtype)  # what the model will actually see
            bad = ~torch.isfinite(written).all(dim=1)
            written[bad] = h[chosen][bad]
            new = h.clone()
            new[chosen] = written
            iterations[chosen] = steps
            rejected[chosen] = bad
            with torch.no_grad():
                after = before.clone()
                after[chosen] = constraints.violations(written)
        steered = chosen & ~rejected
        return SteerResult(
            hidden=new.to(device=hidden.device, dtype=hidden.dtype) if chosen.any() else hidden,
            steered=steered, violations_before=before, violations_after=after, iterations=iterations,
            inside=after.max(dim=1).values <= 0, rejected=rejected,
            shift=torch.where(nonfinite, 0.0, (new - h).norm(dim=1)), nonfinite=nonfinite,
        )

    def select(self, violations: torch.Tensor) -> torch.Tensor:
        """Rows [B] (bool) to move, from their violations [B, K]: the rows outside the constraint set
        (any ``v_k > 0``), or every row for an :attr:`unconditional` steerer. Override for another
        rule. Non-finite rows are never moved, whatever this says."""
        if self.unconditional:
            return torch.ones(violations.shape[0], dtype=torch.bool, device=violations.device)
        return violations.max(dim=1).values > 0

    @abstractmethod
    def _move(self, h: torch.Tensor, constraints: ConstraintSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Move rows h [M, d] (in the constraint set's dtype; the rows :meth:`select` chose).

        Returns the new rows [M, d] (may contain NaN/inf; the caller rejects those rows) and the
        number of steps used per row [M].
        """
