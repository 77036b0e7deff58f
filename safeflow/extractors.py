"""Hidden-state extraction: the ``Extractor`` interface and the Hugging Face implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .cache import HiddenStateCache
from .errors import ConfigError, DataError
from .layers import block_output, find_decoder_layers, normalize_layer
from .registry import Registered

Pooling = Literal["last", "mean"]


class Extractor(Registered, ABC, kind="extractor"):
    """Turns texts into hidden-state vectors: ``extract(texts) -> [N, d] float32``."""

    @abstractmethod
    def extract(self, texts: Sequence[str]) -> torch.Tensor:
        """Hidden states [N, d] (float32, CPU) of ``texts``, one row per text, in order."""


class _StopForward(Exception):
    """Raised from a hook once the deepest requested layer has run, to skip the rest."""


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


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last real (mask 1) position of each row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool [B, T, d] over real positions: the last real token, or their mean. Returns [B, d]."""
    if pooling == "last":
        idx = last_token_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


class HFExtractor(Extractor, name="hf"):
    """Hidden states of any Hugging Face causal LM at decoder layer ``layer``.

    Layer L is the output of decoder block L (see :mod:`safeflow.layers`), read by a forward
    hook; the forward pass stops after the deepest requested block. Texts are tokenized (through
    the chat template when ``chat_template`` allows), sorted by length, batched with right padding
    (so position ids of real tokens are unaffected) and pooled over real tokens only.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        layer: decoder block index (negative counts from the end).
        pooling: ``"last"`` (last real token; what steering acts on) or ``"mean"``.
        chat_template: True, False or "auto" (use the template if the tokenizer has one).
        system_prompt: optional system message when a chat template is used.
        batch_size, max_length: batching and truncation (truncation keeps the *end* of the prompt).
        cache_dir: if set, rows are cached there in safetensors and reused across runs.
        progress: show a progress bar.
        layers: override decoder-layer discovery (attribute path or module list).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        layer: int = -1,
        pooling: Pooling = "last",
        chat_template: bool | str = "auto",
        system_prompt: str | None = None,
        batch_size: int = 16,
        max_length: int = 512,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        layers: str | Sequence[nn.Module] | None = None,
    ) -> None:
        if pooling not in ("last", "mean"):
            raise ConfigError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.blocks = find_decoder_layers(model, layers)
        self.layer = normalize_layer(layer, len(self.blocks))
        self.pooling: Pooling = pooling
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.batch_size = batch_size
        self.max_length = max_length
        self.cache_dir = cache_dir
        self.progress = progress
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def extract(self, texts: Sequence[str]) -> torch.Tensor:
        return self.extract_layers(texts, [self.layer])[:, 0]

    def extract_layers(self, texts: Sequence[str], layers: Sequence[int]) -> torch.Tensor:
        """Hidden states [N, len(layers), d] (float32, CPU) at several layers in one pass."""
        self._check_not_steering()
        texts = list(texts)
        if not texts:
            raise DataError("no texts to extract; pass at least one prompt")
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise DataError("every text must be a non-empty string; drop empty rows from your data")
        layers = [normalize_layer(layer, len(self.blocks)) for layer in layers]
        cache = self._cache(layers)
        out: list[torch.Tensor | None] = [cache.get(t) if cache else None for t in texts]
        todo = [i for i, row in enumerate(out) if row is None]
        prompts = format_prompts(self.tokenizer, [texts[i] for i in todo], self.chat_template, self.system_prompt)
        lengths = [len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        order = sorted(range(len(todo)), key=lambda j: lengths[j])
        bar = tqdm(total=len(texts), initial=len(texts) - len(todo), desc="extract", unit="prompt", disable=not self.progress)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            hidden = self._forward([prompts[j] for j in batch], layers)
            for j, row in zip(batch, hidden):
                out[todo[j]] = row
            if cache is not None:
                cache.add([texts[todo[j]] for j in batch], hidden)
            bar.update(len(batch))
        bar.close()
        result = torch.stack(out)  # type: ignore[arg-type]
        if not torch.isfinite(result).all():
            raise DataError("the model produced NaN/inf hidden states; load it in float32 or check its weights")
        return result

    def _cache(self, layers: list[int]) -> HiddenStateCache | None:
        if self.cache_dir is None:
            return None
        fingerprint = {
            "model": getattr(self.model.config, "_name_or_path", type(self.model).__name__),
            "params": sum(p.numel() for p in self.model.parameters()),
            "dtype": next(self.model.parameters()).dtype,
            "layers": layers,
            "pooling": self.pooling,
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
            "max_length": self.max_length,
        }
        return HiddenStateCache(self.cache_dir, fingerprint)

    def extract_responses(self, prompts: Sequence[str], responses: Sequence[str | Sequence[int]],
                          max_tokens: int = 12) -> list[torch.Tensor]:
        """Hidden states that *produce* each response under teacher forcing.

        Each prompt is formatted as for :meth:`extract` and followed by the first ``max_tokens``
        tokens r_1..r_n of its response (a text, or token ids as returned by
        :func:`~safeflow.generation.generate_responses`). Row i of the result is [n_i, d]
        (float32, CPU): the state at the last prompt token (which produces r_1), then at r_1
        (which produces r_2), ... up to r_{n-1} — exactly the states steering sees at generation
        steps 0..n-1 when the model generates that response itself.
        """
        self._check_not_steering()
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses) or not prompts:
            raise DataError(f"need one response per prompt and at least one pair; got {len(prompts)} prompts "
                            f"and {len(responses)} responses")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        tok = self.tokenizer
        formatted = format_prompts(tok, prompts, self.chat_template, self.system_prompt)
        rows = []
        for text, response in zip(formatted, responses):
            p_ids = tok(text, add_special_tokens=False)["input_ids"][-self.max_length:]
            r_ids = list(tok(response, add_special_tokens=False)["input_ids"] if isinstance(response, str) else response)
            r_ids = r_ids[:max_tokens]
            if not r_ids:
                raise DataError(f"empty response for prompt {text[:60]!r}; drop rows without a response")
            rows.append((p_ids + r_ids[:-1], len(p_ids) - 1))
        out: list[torch.Tensor | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        bar = tqdm(total=len(rows), desc="extract responses", unit="pair", disable=not self.progress)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(rows[i][0]) for i in batch)
            pad = tok.pad_token_id
            ids = torch.tensor([rows[i][0] + [pad] * (width - len(rows[i][0])) for i in batch])
            mask = torch.tensor([[1] * len(rows[i][0]) + [0] * (width - len(rows[i][0])) for i in batch])
            hidden = self._layer_output(ids, mask, self.layer)
            for j, i in enumerate(batch):
                out[i] = hidden[j, rows[i][1] : len(rows[i][0])].float().cpu()
            bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    def _check_not_steering(self) -> None:
        from .generation import steering_active

        if steering_active(self.model):
            raise ConfigError("HFExtractor cannot run on a model inside a `with steering(...)` block (the steering "
                              "hook would act on its forward passes); extract before or after the block")

    @torch.no_grad()
    def _layer_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Block ``layer``'s full output [B, T, d] for a right-padded batch (forward stops there)."""
        device = next(self.model.parameters()).device
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(block_output(output))
            raise _StopForward

        handle = self.blocks[layer].register_forward_hook(hook)
        try:
            self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    @torch.no_grad()
    def _forward(self, prompts: list[str], layers: list[int]) -> torch.Tensor:
        tok = self.tokenizer
        side, trunc = tok.padding_side, tok.truncation_side
        tok.padding_side, tok.truncation_side = "right", "left"
        try:
            enc = tok(prompts, return_tensors="pt", padding=True, truncation=True,
                      max_length=self.max_length, add_special_tokens=False)
        finally:
            tok.padding_side, tok.truncation_side = side, trunc
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        captured: dict[int, torch.Tensor] = {}
        deepest = max(layers)

        def make_hook(index: int):
            def hook(_module, _inputs, output):
                captured[index] = pool(block_output(output), enc["attention_mask"], self.pooling).float().cpu()
                if index == deepest:
                    raise _StopForward

            return hook

        handles = [self.blocks[i].register_forward_hook(make_hook(i)) for i in sorted(set(layers))]
        try:
            self.model(**enc, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return torch.stack([captured[i] for i in layers], dim=1)
