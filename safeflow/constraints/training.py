"""The shared minibatch training loop and input standardisation for constraint sets.

Training runs on standardised inputs ``z = (h - μ) / σ``; afterwards the standardisation is
folded into the first affine map (``W' = W / σ``, ``b' = b - W' μ``), so the saved model acts on
raw hidden states and steering sees one plain affine layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


def standardization(H: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std [d] of H [N, d] (std floored at ``eps``)."""
    return H.mean(0), H.std(0, unbiased=False).clamp_min(eps)


@torch.no_grad()
def fold_standardization(linear_weight: torch.Tensor, linear_bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Rewrite ``x ↦ W((x-μ)/σ) + b`` in place as ``x ↦ W'x + b'``."""
    linear_weight.div_(std)
    linear_bias.sub_(linear_weight @ mean)


def train_minibatches(
    params: Iterable[nn.Parameter],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    H: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """Adam over shuffled minibatches; returns the mean loss of each epoch.

    Raises ``FloatingPointError`` if the loss becomes non-finite (lower ``lr``).
    """
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = H.shape[0]
    history: list[float] = []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for _ in bar:
        perm = torch.randperm(n, generator=gen).to(H.device)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            loss = loss_fn(H[idx], y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower lr (now {lr}) or the margin")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
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
