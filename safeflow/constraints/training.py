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

from ..errors import ConfigError

SCHEDULES = ("constant", "cosine")


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
    schedule: str = "constant",
    average: float = 0.0,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """Adam over shuffled minibatches; returns the mean loss of each epoch.

    ``schedule``: ``"constant"`` learning rate, or ``"cosine"`` decay from ``lr`` to 0 over all steps.
    ``average``: if > 0, the parameters are replaced at the end by their mean over the last
    ``average`` fraction of optimiser steps (Polyak–Ruppert / SWA averaging), which removes most
    of the dependence of the result on the order of the last minibatches.
    Raises ``FloatingPointError`` if the loss becomes non-finite (lower ``lr``).
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 <= average < 1.0:
        raise ConfigError(f"average must be a fraction in [0, 1), got {average!r}")
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = H.shape[0]
    total_steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps) if schedule == "cosine" else None
    average_from = total_steps - int(average * total_steps) if average > 0 else None
    mean_params = [torch.zeros_like(p) for p in params] if average_from is not None else []
    averaged = 0
    step = 0
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
            if sched is not None:
                sched.step()
            step += 1
            if average_from is not None and step > average_from:
                averaged += 1
                with torch.no_grad():
                    for m, p in zip(mean_params, params):
                        m.add_(p.detach() - m, alpha=1.0 / averaged)
            total += loss.item() * len(idx)
        history.append(total / n)
        bar.set_postfix(loss=f"{history[-1]:.4g}")
    if averaged:
        with torch.no_grad():
            for m, p in zip(mean_params, params):
                p.copy_(m)
    return history


def entropy_bits(counts: torch.Tensor) -> float:
    """Shannon entropy (base 2) of a histogram."""
    p = counts.float() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def default_epochs(n: int, batch_size: int, steps: int = 600, max_epochs: int = 200) -> int:
    """Epochs giving about ``steps`` optimiser steps (at least 1, at most ``max_epochs``)."""
    return max(1, min(max_epochs, math.ceil(steps / math.ceil(n / batch_size))))
