"""Gradients through the projection, end to end: tune a constraint set so that projected states
make the model refuse.

For harmful prompts x and a refusal y = (y_1, ..., y_n), every layer-L state h₀ that produces a
refusal token (the last prompt token's, then y_1's, ..., y_{n−1}'s — the states the steering hook
sees while the model generates that refusal) is replaced, when it is outside the constraint set,
by h*(θ): the projection of h₀ (:func:`~safeflow.steerers.projection.project`) onto the linear
model of the violations at the point where the :class:`~safeflow.steerers.ProjectionSteerer`
ends — the steerer's fixed point, differentiated there. The loss is the mean negative
log-likelihood of the refusal,

    L(θ) = −(1/n) Σ_t log p(y_t | x, y_<t ; h*(θ)),

and its gradient reaches the constraint set's parameters θ through the model's later layers, the
projection's implicit derivative, and the local affine model (for the polytope's thresholds ξ,
``∂c/∂ξ = I``). :func:`tune_thresholds` descends on ξ alone: lowering ξ_k pushes projections
deeper past facet k; the gradient says which facets to move, and how far, to make refusals likely.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .constraints.base import ConstraintSet
from .errors import DataError
from .chat import format_prompts, pad_batch
from .layers import block_output, find_decoder_layers, hooked, normalize_layer, replace_block_output
from .responses import REFUSALS
from .steerers.projection import ProjectionSteerer, affine_at, project


def refusal_nll(model: nn.Module, tokenizer, constraints: ConstraintSet, steerer: ProjectionSteerer,
                prompts: Sequence[str], layer: int, *, refusal: str = REFUSALS[0],
                chat_template: bool | str = "auto") -> torch.Tensor:
    """Mean negative log-likelihood (a scalar tensor) of ``refusal`` after each prompt, with the
    layer-``layer`` states that produce it steered into ``constraints`` by ``steerer`` (see the
    module doc). Differentiable in the constraint set's parameters."""
    if not prompts:
        raise DataError("need at least one prompt")
    formatted = format_prompts(tokenizer, prompts, chat_template, None)
    r_ids = tokenizer(refusal, add_special_tokens=False)["input_ids"]
    if len(r_ids) < 1:
        raise DataError(f"the refusal {refusal!r} has no tokens")
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in formatted]
    device = next(model.parameters()).device
    ids, mask = pad_batch([p + r_ids for p in rows], tokenizer.pad_token_id, device=device)
    starts = torch.tensor([len(p) - 1 for p in rows], device=device)  # the state producing y_1
    offsets = torch.arange(len(r_ids), device=device)
    row_idx = torch.arange(len(rows), device=device)[:, None].expand(-1, len(r_ids)).reshape(-1)
    pos_idx = (starts[:, None] + offsets).reshape(-1)
    steerer.check(constraints)
    metric, margin = steerer.metric_matrix(constraints), steerer.target(constraints)

    def hook(_module: nn.Module, _inputs: tuple, output: object) -> object:
        hidden = block_output(output)
        H = hidden[row_idx, pos_idx].detach().to(next(constraints.parameters()).dtype)
        with torch.no_grad():
            outside = constraints.violations(H).amax(1) > 0
        if not outside.any():
            return output
        with torch.no_grad():  # where the steerer ends: its linear model there is the one to differentiate
            result = steerer.steer(H[outside], constraints)
        x = torch.where(result.rejected[:, None], H[outside], result.hidden)
        A, c = affine_at(constraints, x)
        moved = project(H[outside], A, c, margin=margin, metric=metric, solver=steerer.solver).hidden
        new = hidden.index_put((row_idx[outside], pos_idx[outside]), moved.to(hidden.dtype))
        return replace_block_output(output, new)

    blocks = find_decoder_layers(model)
    with hooked(blocks[normalize_layer(layer, len(blocks))], hook):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logits = logits[row_idx, pos_idx]
    logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    targets = ids[row_idx, pos_idx + 1]
    return -logp.gather(1, targets[:, None]).mean()


def tune_thresholds(model: nn.Module, tokenizer, constraints: ConstraintSet, steerer: ProjectionSteerer,
                    prompts: Sequence[str], layer: int, *, refusal: str = REFUSALS[0], steps: int = 20,
                    lr: float = 1.0, batch_size: int = 8, seed: int = 0) -> list[float]:
    """Adam on the thresholds ``constraints.thresholds`` (in place) to minimise :func:`refusal_nll`
    over minibatches of ``prompts``. Only ξ is trained; the model and the other parameters are
    frozen for the duration. Returns the loss of each step."""
    thresholds = getattr(constraints, "thresholds", None)
    if not isinstance(thresholds, nn.Parameter):
        raise DataError(f"{type(constraints).__name__} has no thresholds to tune; use a polytope")
    flags = {p: p.requires_grad for p in [*model.parameters(), *constraints.parameters()]}
    for p in flags:
        p.requires_grad_(p is thresholds)
    opt = torch.optim.Adam([thresholds], lr=lr)
    rng = random.Random(seed)
    losses = []
    try:
        for _ in range(steps):
            batch = rng.sample(list(prompts), min(batch_size, len(prompts)))
            loss = refusal_nll(model, tokenizer, constraints, steerer, batch, layer, refusal=refusal)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return losses
