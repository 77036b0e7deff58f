"""Prompts as the model sees them: chat-template formatting and padded token-id batches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from .errors import ConfigError, DataError
from .io import short_repr


def as_prompts(prompts: object, what: str = "prompts") -> list[str]:
    """``prompts`` as a list of strings, for every entry that takes prompts. A single ``str`` (which
    would otherwise be read as one prompt per character) or anything else that is not a sequence of
    strings is a :class:`DataError` naming ``what`` and the fix."""
    if isinstance(prompts, (str, bytes)):
        raise DataError(f"{what} must be a list of prompts, got a single {type(prompts).__name__} "
                        f"{short_repr(prompts, 60)}; pass a list, e.g. [text]")
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Iterable):
        raise DataError(f"{what} must be a list of prompts (strings), got {type(prompts).__name__}")
    out = list(prompts)
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise DataError(f"{what}[{i}] is a {type(p).__name__} ({short_repr(p, 60)}), not a string; pass a list "
                            "of prompt texts")
    return out


def positive_int(value: object, name: str) -> int:
    """``value`` if it is an ``int`` >= 1 (not a bool), else a :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def format_prompts(tokenizer, texts: Sequence[str], chat_template: bool | str, system_prompt: str | None) -> list[str]:
    """Apply the tokenizer's chat template (with the generation prompt) when requested.

    ``chat_template``: True (required), False (raw text) or "auto" (use it if the tokenizer has one).
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template == "auto":
        chat_template = has_template
    if not chat_template:
        return list(texts)
    if not has_template:
        raise ConfigError("chat_template=True but the tokenizer has no chat template; pass chat_template=False")
    prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        tokenizer.apply_chat_template(prefix + [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"] = "right",
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id ``rows`` padded with ``pad_id`` on ``side`` to the longest row: ``(input_ids,
    attention_mask)``, both int64 [B, T] on ``device``, the mask 1 at real tokens and 0 at padding.
    Right padding leaves the position ids of real tokens unchanged (extraction, teacher forcing);
    generation with decoder-only models needs left padding."""
    width = max(map(len, rows))
    ids, mask = [], []
    for row in rows:
        fill = width - len(row)
        if side == "left":
            ids.append([pad_id] * fill + list(row))
            mask.append([0] * fill + [1] * len(row))
        else:
            ids.append(list(row) + [pad_id] * fill)
            mask.append([1] * len(row) + [0] * fill)
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)
