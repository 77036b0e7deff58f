"""Fluency of generated answers: perplexity under the unsteered model, and repetition.

Steering that makes a model refuse can also make it babble; these two numbers make that visible
beside every refusal rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .chat import format_prompts, pad_batch


def repetition(tokens: Sequence[int], n: int = 3) -> float:
    """Share of an answer's n-grams that repeat an earlier one: ``1 − distinct / total``.

    0 for an answer without repeated n-grams (or shorter than n tokens); close to 1 for a loop.
    """
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def answer_perplexity(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[Sequence[int]],
    *,
    chat_template: bool | str = "auto",
    system_prompt: str | None = None,
    batch_size: int = 8,
) -> list[float]:
    """Perplexity ``exp(mean_t −log p(a_t | prompt, a_<t))`` of each answer's tokens [n_i] given
    its prompt (formatted as for generation), under ``model`` as it is — call it outside any
    steering context to score answers under the unsteered model. NaN for an empty answer."""
    formatted = format_prompts(tokenizer, prompts, chat_template, system_prompt)
    rows = [(tokenizer(p, add_special_tokens=False)["input_ids"], list(a)) for p, a in zip(formatted, answers)]
    out = [float("nan")] * len(rows)
    device = next(model.parameters()).device
    todo = [i for i, (_, a) in enumerate(rows) if a]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        seqs = [rows[i][0] + rows[i][1] for i in batch]
        ids, mask = pad_batch(seqs, tokenizer.pad_token_id, device=device)
        logprobs = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
        for j, i in enumerate(batch):
            p, a = rows[i]
            pos = torch.arange(len(p) - 1, len(p) + len(a) - 1, device=device)
            nll = -logprobs[j, pos, torch.tensor(a, device=device)].mean()
            out[i] = float(nll.exp())
    return out
