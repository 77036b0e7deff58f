"""The shared minibatch training loop and input standardisation for constraint sets.

Training runs on standardised inputs ``z = (h - μ) / σ``; afterwards the standardisation is
folded into the first affine map (``W' = W / σ``, ``b' = b - W' μ``), so the saved model acts on
raw hidden states and steering sees one plain affine layer. Inputs are a
:class:`~safeflow.features.FeatureDataset` (in memory or streamed from disk); μ, σ come from its
float64 :class:`~safeflow.features.Moments` and each minibatch is standardised as it is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..features import FeatureDataset


def training_data(H: Any, y: Any, input_dim: int) -> FeatureDataset:
    """``fit``'s input as a :class:`FeatureDataset`: a dataset as it is (``y`` must be None: its
    labels are inside), or validated tensors H [N, input_dim], y [N] as one in-memory chunk."""
    if isinstance(H, FeatureDataset):
        if y is not None:
            raise ConfigError("a FeatureDataset carries its labels; call fit(dataset) without y")
        data = H
    elif y is None:
        raise DataError("labels y are missing; call fit(H, y) with y [N] (1 = unsafe, 0 = safe)")
    else:
        data = FeatureDataset.from_tensors(H, y)
    if data.dim != input_dim:
        raise DataError(f"H has hidden size {data.dim} but this constraint set expects {input_dim}; "
                        "extract features from the same model (and layer) the constraint set was trained on")
    return data


@torch.no_grad()
def fold_standardization(linear_weight: torch.Tensor, linear_bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Rewrite ``x ↦ W((x-μ)/σ) + b`` in place as ``x ↦ W'x + b'``."""
    linear_weight.div_(std)
    linear_bias.sub_(linear_weight @ mean)


def train_minibatches(
    params: Iterable[nn.Parameter],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: FeatureDataset,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """Adam over shuffled minibatches of ``data`` (:meth:`FeatureDataset.batches`), each
    standardised with ``mean``, ``std`` [d] on their device; returns the mean loss of each epoch.

    Raises ``FloatingPointError`` if the loss becomes non-finite (lower ``lr``).
    """
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    history: list[float] = []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for _ in bar:
        total = 0.0
        for h, labels in data.batches(batch_size, gen, mean.device):
            loss = loss_fn((h - mean) / std, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower lr (now {lr}) or the margin")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(labels)
        history.append(total / n)
        bar.set_postfix(loss=f"{history[-1]:.4g}")
    return history


def entropy_bits(counts: torch.Tensor) -> float:
    """Shannon entropy (base 2) of a histogram."""
    p = counts.float() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def default_epochs(n: int, batch_size: int, steps: int = 600, max_epochs: int = 200) -> int:
    """Epochs giving about ``steps`` optimiser steps (at least 1, at most ``max_epochs``)."""
    return max(1, min(max_epochs, math.ceil(steps / math.ceil(n / batch_size))))
