"""The shared minibatch training loop and input standardisation for constraint sets.

Training runs on standardised inputs ``z = (h - μ) / σ``; afterwards the standardisation is
folded into the first affine map (``W' = W / σ``, ``b' = b - W' μ``), so the saved model acts on
raw hidden states and steering sees one plain affine layer. Inputs are a
:class:`~safeflow.features.FeatureDataset` (in memory or streamed from disk); μ, σ come from its
float64 :class:`~safeflow.features.Moments` and each minibatch is standardised as it is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..features import FeatureDataset
from ..progress import progress_bar

#: Largest training margin accepted: hinge terms stay finite in float32 well below it.
MAX_MARGIN = 1e6
#: Largest learning rate accepted (Adam's step is about lr in parameter units; beyond this it overflows).
MAX_LR = 1e6


#: A fit-option rule: None if the value is acceptable, else what it must be ("an int >= 1").
Rule = Callable[[Any], str | None]


def _int(low: int, optional: bool = False) -> Rule:
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= low
        return None if ok else f"an int >= {low}" + (" or None (the default)" if optional else "")
    return check


def _real(low: float, high: float = math.inf, strict: bool = False) -> Rule:
    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
            v > low if strict else v >= low) and v <= high
        bound = f"> {low:g}" if strict else f">= {low:g}"
        return None if ok else f"a finite number {bound}" + (f" and <= {high:g}" if high < math.inf else "")
    return check


def one_of(values: tuple[str, ...]) -> Rule:
    """A fit-option rule: the value is one of ``values``."""
    return lambda v: None if isinstance(v, str) and v in values else f"one of {values}"


SCHEDULES = ("constant", "cosine")

#: What each common ``fit`` keyword must be (read-only). Every constraint set inherits these
#: through :attr:`ConstraintSet.fit_option_rules <safeflow.constraints.ConstraintSet.fit_option_rules>`;
#: a family declares rules for its own options in its class body (the polytope adds ``assignment``
#: and ``init``), merged along the class's MRO by :meth:`~safeflow.constraints.ConstraintSet.option_rules`.
COMMON_FIT_OPTION_RULES: Mapping[str, Rule] = MappingProxyType({
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
    "schedule": one_of(SCHEDULES),
    "average": lambda v: _real(0.0)(v) or (None if v < 1 else "a fraction in [0, 1)"),
    "progress": lambda v: None if isinstance(v, bool) else "True or False",
})


def validate_fit_options(model: nn.Module, **options: Any) -> None:
    """Check ``fit`` settings up front: raise :class:`ConfigError` naming the first bad one.

    Every option with a rule — the model's :meth:`~safeflow.constraints.ConstraintSet.option_rules`
    (its class's rules merged along the MRO), or :data:`COMMON_FIT_OPTION_RULES` for another
    module — is checked; the model must hold float32 parameters (training runs in float32).
    Nothing is changed: ``fit`` trains a copy and swaps it in on success, so a failure leaves the
    model as it was.
    """
    option_rules = getattr(model, "option_rules", None)
    rules = option_rules() if callable(option_rules) else COMMON_FIT_OPTION_RULES
    for name, value in options.items():
        rule = rules.get(name)
        need = rule(value) if rule else None
        if need:
            raise ConfigError(f"fit option {name}={value!r} is invalid: it must be {need}")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ConfigError(f"fit trains in float32 but this {type(model).__name__} is {dtype}; call .float() "
                          "before fit (and convert it again afterwards if you need another dtype)")


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
        data = FeatureDataset.from_tensors(H, y, input_dim=input_dim)
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
    schedule: str = "constant",
    average: float = 0.0,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """Adam over shuffled minibatches of ``data`` (:meth:`FeatureDataset.batches`), each
    standardised with ``mean``, ``std`` [d] on their device; returns the mean loss of each epoch.

    ``schedule``: ``"constant"`` learning rate, or ``"cosine"`` decay from ``lr`` to 0 over all steps.
    ``average``: if > 0, the parameters are replaced at the end by their mean over the last
    ``average`` fraction of optimiser steps (Polyak–Ruppert / SWA averaging), which removes most
    of the dependence of the result on the order of the last minibatches.
    Raises :class:`ConfigError` if the loss becomes non-finite (lower ``lr``, the margin or a loss weight).
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 <= average < 1.0:
        raise ConfigError(f"average must be a fraction in [0, 1), got {average!r}")
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    total_steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps) if schedule == "cosine" else None
    average_from = total_steps - int(average * total_steps) if average > 0 else None
    mean_params = [torch.zeros_like(p) for p in params] if average_from is not None else []
    averaged = 0
    step = 0
    history: list[float] = []
    bar = progress_bar(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for _ in bar:
        total = 0.0
        for h, labels in data.batches(batch_size, gen, mean.device):
            loss = loss_fn((h - mean) / std, labels)
            if not torch.isfinite(loss):
                raise ConfigError(f"training loss became {loss.item()}; lower lr (now {lr}), the margin or the loss "
                                  "weights (unsafe_weight, feature_l1, facet_l1)")
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
            total += loss.item() * len(labels)
        history.append(total / n)
        bar.set_postfix(loss=f"{history[-1]:.4g}", refresh=False)
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
