"""Baseline constraint sets under the same interface: one learned halfspace and an MLP.

Both output a single violation, the logit of "unsafe": ``V [N, 1] = logit(h)``; unsafe iff V > 0.
Trained with class-balanced binary cross-entropy, Adam, on standardised inputs (folded back).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..features import FeatureDataset, Moments
from .base import ConstraintSet
from .training import default_epochs, fold_standardization, train_minibatches


class _LogitConstraint(ConstraintSet):
    """Shared fit/violations for single-logit baselines; subclasses build ``self.net``."""

    net: nn.Sequential

    def __init__(self, input_dim: int) -> None:
        super().__init__(input_dim)
        self.num_constraints = 1

    def violations(self, H: torch.Tensor) -> torch.Tensor:
        """The logit of "unsafe" [N, 1] for H [N, d] in the set's dtype and device (:class:`DataError`
        otherwise, and before ``fit``)."""
        return self.net(self._inputs(H))

    def _train(
        self,
        data: FeatureDataset,
        stats: Moments,
        *,
        progress: bool,
        epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        seed: int = 0,
    ) -> list[float]:
        """The baselines' fit options (:meth:`~safeflow.constraints.ConstraintSet.fit` takes them by
        keyword): balanced BCE + L2 ``weight_decay``, Adam with ``lr``, ``epochs`` defaulting to about
        600 steps of ``batch_size`` rows."""
        for m in self.net:
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        device = next(self.parameters()).device
        mean, std = stats.standardization()
        pos_weight = ((data.labels == 0).sum() / (data.labels == 1).sum()).to(device)

        def loss_fn(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logit = self.net(z).squeeze(1)
            bce = F.binary_cross_entropy_with_logits(logit, labels.float(), pos_weight=pos_weight)
            return bce + weight_decay * sum((p**2).sum() for n, p in self.net.named_parameters() if "weight" in n)

        history = train_minibatches(
            self.parameters(), loss_fn, data, mean, std,
            epochs=epochs or default_epochs(len(data), batch_size), batch_size=batch_size, lr=lr, seed=seed,
            progress=progress, desc=self.registered_name or "train",
        )
        first = self.net[0]
        assert isinstance(first, nn.Linear)
        fold_standardization(first.weight.data, first.bias.data, mean, std)
        return history


class LinearConstraint(_LogitConstraint, name="linear"):
    """A single halfspace (logistic probe): ``v(h) = wᵀh + c``."""

    def __init__(self, input_dim: int) -> None:
        super().__init__(input_dim)
        self.net = nn.Sequential(nn.Linear(input_dim, 1))

    def config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim}


class MLPConstraint(_LogitConstraint, name="mlp"):
    """The paper's MLP baseline: ``v(h) = MLP(h)`` with ReLU hidden layers ``hidden_sizes``."""

    def __init__(self, input_dim: int, hidden_sizes: tuple[int, ...] | list[int] = (256, 256)) -> None:
        super().__init__(input_dim)
        if not isinstance(hidden_sizes, (list, tuple)) or not hidden_sizes or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in hidden_sizes):
            raise ConfigError(f"hidden_sizes must be positive ints, got {hidden_sizes!r}")
        self.hidden_sizes = list(hidden_sizes)
        layers: list[nn.Module] = []
        width = input_dim
        for size in self.hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim, "hidden_sizes": self.hidden_sizes}
