"""The shared minibatch training loop and input standardisation for constraint sets.

Training runs on standardised inputs ``z = (h - μ) / σ``; afterwards the standardisation is
folded into the first affine map (``W' = W / σ``, ``b' = b - W' μ``), so the saved model acts on
raw hidden states and steering sees one plain affine layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError

#: Largest training margin accepted: hinge terms stay finite in float32 well below it.
MAX_MARGIN = 1e6
#: Largest learning rate accepted (Adam's step is about lr in parameter units; beyond this it overflows).
MAX_LR = 1e6


def _int(low: int, optional: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= low
        return None if ok else f"an int >= {low}" + (" or None (the default)" if optional else "")
    return check


def _real(low: float, high: float = math.inf, strict: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
            v > low if strict else v >= low) and v <= high
        bound = f"> {low:g}" if strict else f">= {low:g}"
        return None if ok else f"a finite number {bound}" + (f" and <= {high:g}" if high < math.inf else "")
    return check


#: What each ``fit`` keyword must be; :func:`validate_fit_options` checks the ones it is given.
FIT_OPTION_RULES: dict[str, Callable[[Any], str | None]] = {
    "epochs": _int(1, optional=True),
    "batch_size": _int(1),
    "lr": _real(0.0, MAX_LR, strict=True),
    "margin": _real(0.0, MAX_MARGIN),
    "unsafe_weight": _real(0.0),
    "feature_l1": _real(0.0),
    "facet_l1": _real(0.0),
    "entropy_weight": _real(0.0),
    "weight_decay": _real(0.0),
    "seed": _int(0),
    "progress": lambda v: None if isinstance(v, bool) else "True or False",
}


def validate_fit_options(model: nn.Module, **options: Any) -> None:
    """Check ``fit`` settings up front: raise :class:`ConfigError` naming the first bad one.

    Every option with a rule in :data:`FIT_OPTION_RULES` is checked; the model must hold float32
    parameters (training runs in float32).
    """
    for name, value in options.items():
        rule = FIT_OPTION_RULES.get(name)
        need = rule(value) if rule else None
        if need:
            raise ConfigError(f"fit option {name}={value!r} is invalid: it must be {need}")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ConfigError(f"fit trains in float32 but this {type(model).__name__} is {dtype}; call .float() "
                          "before fit (and convert it again afterwards if you need another dtype)")


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
