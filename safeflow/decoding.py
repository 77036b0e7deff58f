"""Batched greedy decoding: responses to prompts (through the chat template, left-padded
batches), optionally inside a :func:`~safeflow.steering.steering` context."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .chat import as_prompts, format_prompts, pad_batch, positive_int
from .errors import ConfigError, DataError
from .io import short_repr
from .layers import position_limit
from .progress import progress_bar
from .steering import SteeringLog, SteeringSpec


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    chat_template: bool | str = "auto",
    system_prompt: str | None = None,
    steer: SteeringSpec | Mapping[str, Any] | None = None,
    progress: bool = False,
) -> tuple[list[str], list[list[int]], SteeringLog | None]:
    """Greedy responses to ``prompts`` (through the chat template), optionally steered.

    ``steer``: a :class:`~safeflow.steering.SteeringSpec` (constraints, steerer, layer, ...), or
    None; a dict of :func:`steering`'s keyword arguments still works, deprecated.
    Returns ``(texts, token_ids, log)``; token ids exclude the prompt and stop at EOS.

    ``prompts`` must be a list (a single ``str`` is a :class:`DataError`); a prompt with no tokens
    (empty without a chat template, or dropped whole by the tokenizer) is a :class:`DataError`, and
    one whose tokens plus ``max_new_tokens`` exceed the model's positions a :class:`ConfigError`.
    """
    prompts = as_prompts(prompts)
    formatted = format_prompts(tokenizer, prompts, chat_template, system_prompt)
    prefixes = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in formatted]
    for i, prefix in enumerate(prefixes):
        if not prefix:
            raise DataError(f"prompt {i} ({short_repr(prompts[i], 60)}) has no tokens"
                            + ("" if formatted[i] != prompts[i] else " (an empty text, or one the tokenizer drops "
                               "entirely, with no chat template around it)") + "; remove it or give it some text")
    spec = SteeringSpec.of(steer) if steer else None
    log: SteeringLog | None = None
    with spec.apply(model) if spec is not None else nullcontext() as log:
        texts, tokens = generate_from_ids(model, tokenizer, prefixes, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size, progress=progress, log=log)
    return texts, tokens, log


@torch.no_grad()
def generate_from_ids(
    model: Any,
    tokenizer,
    prefixes: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    progress: bool = False,
    log: SteeringLog | None = None,
) -> tuple[list[str], list[list[int]]]:
    """Greedy continuations of token-id ``prefixes`` (left-padded batches), e.g. a formatted
    prompt followed by the start of an answer. Returns ``(texts, token_ids)`` of the new tokens,
    stopping at EOS. Checks ``batch_size`` and ``max_new_tokens`` (integers >= 1), that every
    prefix has a token, and that no prefix plus ``max_new_tokens`` exceeds the model's position
    limit (:func:`~safeflow.layers.position_limit`), before anything runs.

    ``log``: the :class:`~safeflow.steering.SteeringLog` of an open steering context; each batch's
    generate() call is labelled with its prompts' indices in ``prefixes``
    (:meth:`~safeflow.steering.SteeringLog.label_next_call`), so every event records its prompt."""
    positive_int(batch_size, "batch_size")
    positive_int(max_new_tokens, "max_new_tokens")
    limit = position_limit(model)
    for i, prefix in enumerate(prefixes):
        if not len(prefix):
            raise DataError(f"prompt {i} has no tokens; remove it or give it some text")
        if limit is not None and len(prefix) + max_new_tokens > limit:
            raise ConfigError(f"prompt {i} has {len(prefix)} tokens; with max_new_tokens {max_new_tokens} that exceeds "
                              f"the model's {limit} positions; shorten the prompt or lower max_new_tokens")
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    texts: list[str] = []
    tokens: list[list[int]] = []
    for start in progress_bar(range(0, len(prefixes), batch_size), desc="generate", disable=not progress):
        ids, mask = pad_batch(prefixes[start : start + batch_size], pad, side="left", device=device)
        width = ids.shape[1]
        if log is not None:
            log.label_next_call(range(start, start + ids.shape[0]))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
            tokens.append(row[:cut])
            texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts, tokens
