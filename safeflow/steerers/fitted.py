"""Steerers with learned tensors: fitted from hidden states, saved and loaded like constraint sets.

A :class:`FittedSteerer` is a :class:`~safeflow.steerers.Steerer` and an ``nn.Module``: its
tensors (a refusal direction, a steering matrix) are buffers, ``fit`` learns them from hidden
states of one model's layer, and ``provenance`` records that source exactly as a constraint set
does (``steerer.provenance.update(sf.describe_source(extractor))``), so steering refuses another
model or layer. ``save`` / :meth:`Steerer.load <safeflow.steerers.Steerer.load>` write and read one safetensors file with a JSON header
(:mod:`safeflow.saving`) — never pickle.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from ..constraints.base import ConstraintSet, as_features
from ..errors import ConfigError, DataError
from ..layers import hidden_size
from ..provenance import check_source
from ..saving import save_component
from .base import STEERER_FORMAT, SteeringData, Steerer


class FittedSteerer(Steerer, nn.Module):
    """A steerer whose move uses tensors learned by :meth:`fit` (see the module doc).

    Subclasses register buffers in ``__init__(input_dim, ...)``, implement ``fit``, ``config`` and
    ``_move``, and set ``self.fitted`` at the end of ``fit``.
    """

    fitted: torch.Tensor

    def __init__(self, input_dim: int) -> None:
        nn.Module.__init__(self)
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise DataError(f"input_dim must be a positive int (the model's hidden size), got {input_dim!r}")
        self.input_dim = input_dim
        self.register_buffer("fitted", torch.tensor(False))
        self.provenance: dict[str, Any] = {}

    @classmethod
    def build(cls, data: SteeringData, **options: Any) -> FittedSteerer:
        """Fit this steerer on a run's states (:meth:`fit_data`) and record their provenance."""
        obj = cls(data.harmful.shape[1], **options)
        obj.fit_data(data)
        obj.provenance.update(data.provenance)
        return obj

    @abstractmethod
    def fit_data(self, data: SteeringData) -> None:
        """Fit on the states a run offers (:class:`~safeflow.steerers.base.SteeringData`)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this steerer (saved in the JSON header)."""

    def require_fitted(self) -> None:
        """Raise :class:`DataError` unless the steerer has been fitted or loaded."""
        if not bool(self.fitted):
            raise DataError(f"this {type(self).__name__} has not been fitted; call .fit(...) or load a saved one "
                            "with Steerer.load(path)")

    def check(self, constraints: ConstraintSet) -> None:
        super().check(constraints)
        self.require_fitted()
        if constraints.input_dim != self.input_dim:
            raise DataError(f"this {type(self).__name__} was fitted on hidden size {self.input_dim} but the constraint "
                            f"set expects {constraints.input_dim}; fit both on states of the same model and layer")

    def check_model(self, model: nn.Module, layer: int, check_provenance: bool = True) -> None:
        self.require_fitted()
        d = hidden_size(model)
        if d != self.input_dim:
            raise ConfigError(f"this {type(self).__name__} was fitted on hidden size {self.input_dim} but the model's "
                              f"is {d}; fit it on hidden states of this model")
        if check_provenance:
            check_source(self.provenance, model=model, layer=layer, what=f"the {self.registered_name} steerer")

    def _states(self, H: Any, name: str) -> torch.Tensor:
        """Validated hidden states [N, input_dim] in float64 (fits are closed-form, in float64)."""
        return as_features(H, self.input_dim, name=name).double()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tensors, config and provenance to ``path`` (one safetensors file), atomically."""
        self.require_fitted()
        assert self.registered_name is not None
        save_component(path, self, component="steerer", name=self.registered_name, config=self.config(),
                       provenance=self.provenance, format_version=STEERER_FORMAT)
