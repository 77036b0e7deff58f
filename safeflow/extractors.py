"""Hidden-state extraction: the ``Extractor`` interface and the Hugging Face implementation."""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from . import distributed
from .cache import HiddenStateCache, text_key, weights_digest
from .chat import as_prompts, format_prompts, pad_batch, positive_int
from .distributed import World
from .errors import ConfigError, DataError
from .features import FeatureDataset
from .io import short_repr
from .layers import block_output, default_model_layer, find_decoder_layers, hooked, normalize_layer, position_limit
from .progress import progress_bar
from .registry import Registered
from .steering import steering_active

log = logging.getLogger(__name__)

Pooling = Literal["last", "mean"]


class Extractor(Registered, ABC, kind="extractor"):
    """Turns texts into hidden-state vectors: ``extract(texts) -> [N, d] float32``."""

    @abstractmethod
    def extract(self, texts: Sequence[str]) -> torch.Tensor:
        """Hidden states [N, d] (float32, CPU) of ``texts``, one row per text, in order."""


@dataclass(frozen=True)
class _Job:
    """How to compute rows: ``lengths(indices)`` (token counts, for batching) and
    ``compute(indices)`` (one row tensor per index, computed as one batch)."""

    lengths: Callable[[list[int]], list[int]]
    compute: Callable[[list[int]], list[torch.Tensor]]


def _finite(H: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(H).all():
        raise DataError("the model produced NaN/inf hidden states; load it in float32 or check its weights")
    return H


def _agree(world: World, cache: HiddenStateCache, keys: list[str]) -> None:
    """Raise on every rank unless all ranks extract the same keys with the same fingerprint."""
    digest = hashlib.sha256("".join(keys).encode()).hexdigest()
    everyone = world.all_gather((cache.fingerprint, digest))
    for rank, (fingerprint, text_digest) in enumerate(everyone):
        if fingerprint != everyone[0][0]:
            diff = "; ".join(f"{k}: {everyone[0][0].get(k)!r} on rank 0, {fingerprint.get(k)!r} on rank {rank}"
                             for k in sorted(set(fingerprint) | set(everyone[0][0]))
                             if fingerprint.get(k) != everyone[0][0].get(k))
            raise ConfigError(f"ranks disagree on the extraction settings ({diff}); load the same model, dtype and "
                              "options on every process")
        if text_digest != everyone[0][1]:
            raise DataError(f"rank {rank} was given other texts than rank 0; every rank must pass the same texts "
                            "in the same order (the work is split for you), or create the extractor with "
                            "distributed=False to extract per process")


def _check_complete(world: World, cache: HiddenStateCache, keys: list[str], batches: list[list[int]],
                    owners: list[int]) -> None:
    """After every rank finished: raise on every rank if some rank cannot see some row."""
    lost = cache.missing(keys)
    counts = world.all_gather(len(lost))
    if not any(counts):
        return
    owner = {keys[i]: rank for batch, rank in zip(batches, owners) for i in batch}
    writers = sorted({owner.get(k, -1) for k in lost})
    blind = [r for r, c in enumerate(counts) if c]
    raise DataError(
        f"after every rank finished, rank(s) {blind} miss up to {max(counts)} rows in {cache.directory}"
        + (f" that rank(s) {writers} should have written" if lost else "")
        + "; the cache directory must be on a filesystem every process sees (several nodes: a shared "
        "filesystem). Finished chunks are kept: fix that and rerun to compute only what is missing")


class _StopForward(Exception):
    """Raised from a hook once the deepest requested layer has run, to skip the rest."""


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
        layer: decoder block index (negative counts from the end); None (default): the model's
            preset layer, or the paper's relative depth (:func:`~safeflow.layers.default_model_layer`).
        pooling: ``"last"`` (last real token; what steering acts on) or ``"mean"``.
        chat_template: True, False or "auto" (use the template if the tokenizer has one).
        system_prompt: optional system message when a chat template is used.
        batch_size, max_length: batching and truncation (truncation keeps the *end* of the prompt,
            with a logged warning); ``max_length`` is capped at the model's position limit.
        cache_dir: if set, rows are cached there in safetensors and reused across runs.
        progress: show a progress bar.
        layers: override decoder-layer discovery (attribute path or module list).
        distributed: when ``torch.distributed`` is initialised with several processes, extraction
            is collective and sharded across them (see :meth:`extract_layers`); False keeps every
            call local to this process.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        layer: int | None = None,
        pooling: Pooling = "last",
        chat_template: bool | str = "auto",
        system_prompt: str | None = None,
        batch_size: int = 16,
        max_length: int = 512,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        layers: str | Sequence[nn.Module] | None = None,
        distributed: bool = True,
    ) -> None:
        if pooling not in ("last", "mean"):
            raise ConfigError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        positive_int(batch_size, "batch_size")
        positive_int(max_length, "max_length")
        limit = position_limit(model)
        if limit is not None and max_length > limit:
            log.warning("max_length %d is capped at the model's %d positions; longer prompts keep their last %d tokens",
                        max_length, limit, limit)
            max_length = limit
        self.model = model
        self.tokenizer = tokenizer
        self.blocks = find_decoder_layers(model, layers)
        self.layer = normalize_layer(default_model_layer(model, layers=layers) if layer is None else layer,
                                     len(self.blocks))
        self.pooling: Pooling = pooling
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.batch_size = batch_size
        self.max_length = max_length
        self.cache_dir = cache_dir
        self.progress = progress
        self.distributed = distributed
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def extract(self, texts: Sequence[str]) -> torch.Tensor:
        return self.extract_layers(texts, [self.layer])[:, 0]

    def extract_layers(self, texts: Sequence[str], layers: Sequence[int]) -> torch.Tensor:
        """Hidden states [N, len(layers), d] (float32, CPU) at several layers in one pass.

        With ``cache_dir``, cached rows are read and only missing ones are computed. Under a
        process group of several ranks (:mod:`safeflow.distributed`) this is a *collective* call:
        every rank passes the same texts, computes its share of the batches into ``cache_dir``,
        and returns all N rows — identical to a single-process run on the same device type.
        """
        self._check_not_steering()
        texts, layers = self._check_texts(texts), self._layers(layers)
        rows = self._fill(self._cache(layers), [text_key(t) for t in texts], self._prompt_job(texts, layers), "extract")
        return _finite(torch.stack(rows))  # type: ignore[arg-type]

    def fill_cache(self, texts: Sequence[str], layers: Sequence[int] | None = None) -> None:
        """Compute the rows of ``texts`` missing from ``cache_dir`` without reading any back.

        Collective under a process group, like :meth:`extract_layers`; read the rows afterwards
        with :meth:`cached` on the ranks that need them (``safeflow extract``: rank 0 only).
        """
        self._check_not_steering()
        texts, layers = self._check_texts(texts), self._layers(layers)
        cache = self._cache(layers)
        if cache is None:
            raise ConfigError("fill_cache writes to cache_dir, which is None; pass cache_dir=... to HFExtractor")
        self._fill(cache, [text_key(t) for t in texts], self._prompt_job(texts, layers), "extract", read=False)

    def cached(self, texts: Sequence[str], layers: Sequence[int] | None = None) -> torch.Tensor:
        """Rows of ``texts`` from ``cache_dir`` only, computing nothing (not collective):
        [N, d] at this extractor's layer, or [N, len(layers), d]. :class:`DataError` if any is missing."""
        texts, layer_list = self._check_texts(texts), self._layers(layers)
        cache = self._cache(layer_list)
        if cache is None:
            raise ConfigError("cached() reads cache_dir, which is None; pass cache_dir=... to HFExtractor")
        H = _finite(torch.stack(cache.read([text_key(t) for t in texts])))
        return H[:, 0] if layers is None else H

    def dataset(self, texts: Sequence[str], labels: Sequence[int] | torch.Tensor) -> FeatureDataset:
        """The cached rows of ``texts`` as a :class:`~safeflow.features.FeatureDataset` that
        ``fit`` streams from disk; computes missing rows first (collective, like :meth:`fill_cache`)."""
        self.fill_cache(texts)
        cache = self._cache(self._layers(None))
        assert cache is not None
        return FeatureDataset.from_cache(cache, [text_key(t) for t in self._check_texts(texts)], labels)

    def _check_texts(self, texts: Sequence[str]) -> list[str]:
        texts = as_prompts(texts, "texts")
        if not texts:
            raise DataError("no texts to extract; pass at least one prompt")
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise DataError("every text must be a non-empty string; drop empty rows from your data")
        return texts

    def _layers(self, layers: Sequence[int] | None) -> list[int]:
        return [normalize_layer(layer, len(self.blocks)) for layer in (layers if layers is not None else [self.layer])]

    def _prompt_job(self, texts: list[str], layers: list[int]) -> _Job:
        """Prompt rows: ``texts[i]`` through the chat template, pooled at ``layers``."""
        def formatted(idx: list[int]) -> list[str]:
            return format_prompts(self.tokenizer, [texts[i] for i in idx], self.chat_template, self.system_prompt)

        def lengths(idx: list[int]) -> list[int]:
            return [len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in formatted(idx)]

        return _Job(lengths, lambda idx: list(self._forward(formatted(idx), layers).unbind(0)))

    @property
    def world(self) -> World:
        """The process group extraction is shared with (a one-process World if not distributed)."""
        return distributed.current() if self.distributed else World()

    def _fill(self, cache: HiddenStateCache | None, keys: list[str], job: _Job, desc: str,
              read: bool = True) -> list[torch.Tensor] | None:
        """Rows of ``keys`` in order: cached ones are read, missing ones computed.

        Missing rows are sorted by length and cut into batches of ``batch_size`` (one plan, made
        on rank 0); whole batches are dealt to ranks (:func:`~safeflow.distributed.assign`, by
        padded tokens), so each row is computed in the batch one process would have used. Each
        batch becomes one cache chunk. With several ranks, all wait for each other, check that
        every row arrived, and read the rows back from the cache.
        """
        world = self.world
        if world.size > 1:
            if cache is None:
                raise ConfigError(f"extraction across {world.size} processes exchanges rows through cache_dir, which is "
                                  "None; pass cache_dir=... (or --cache DIR) on a filesystem every process sees")
            _agree(world, cache, keys)
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        plan = None
        if world.is_main:
            todo = [first[k] for k in (cache.missing(first) if cache is not None else first)]
            plan = self._plan(todo, job.lengths(todo) if todo else [], world.size)
        batches, owners = world.broadcast(plan)
        mine = [b for b, owner in zip(batches, owners) if owner == world.rank]
        computed: dict[str, torch.Tensor] = {}
        bar = progress_bar(total=sum(map(len, mine)), desc=desc, unit="row", disable=not self.progress or not world.is_main)
        try:  # the bar is closed before an error propagates, so it is not redrawn after the error's message
            for batch in mine:
                rows = job.compute(batch)
                batch_keys = [keys[i] for i in batch]
                if cache is not None:
                    cache.add(batch_keys, rows)
                else:
                    computed.update(zip(batch_keys, rows))
                bar.update(len(batch))
        finally:
            bar.close()
        if cache is None:
            return [computed[k] for k in keys]
        if world.size > 1:
            world.barrier()
            cache.refresh()
            _check_complete(world, cache, keys, batches, owners)
        return cache.read(keys) if read else None

    def _plan(self, todo: list[int], lengths: list[int], size: int) -> tuple[list[list[int]], list[int]]:
        """Length-sorted batches of ``todo`` and the rank that computes each."""
        order = sorted(range(len(todo)), key=lambda j: lengths[j])
        cuts = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        batches = [[todo[j] for j in cut] for cut in cuts]
        costs = [len(cut) * max(lengths[j] for j in cut) for cut in cuts]
        return batches, distributed.assign(costs, size)

    def _cache(self, layers: list[int], responses: bool = False) -> HiddenStateCache | None:
        if self.cache_dir is None:
            return None
        fingerprint = {
            "model": getattr(self.model.config, "_name_or_path", type(self.model).__name__),
            "params": sum(p.numel() for p in self.model.parameters()),
            "weights": weights_digest(self.model),
            "dtype": next(self.model.parameters()).dtype,
            "layers": layers,
            "rows": "responses" if responses else "prompts",
            "pooling": self.pooling,
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
            "max_length": self.max_length,
        }
        return HiddenStateCache(self.cache_dir, fingerprint, rank=self.world.rank, ragged=responses)

    def extract_responses(self, prompts: Sequence[str], responses: Sequence[str | Sequence[int]],
                          max_tokens: int = 12) -> list[torch.Tensor]:
        """Hidden states that *produce* each response under teacher forcing.

        Each prompt is formatted as for :meth:`extract` and followed by the first ``max_tokens``
        tokens r_1..r_n of its response (a text, or token ids as returned by
        :func:`~safeflow.decoding.generate_responses`). Row i of the result is [n_i, d]
        (float32, CPU): the state at the last prompt token (which produces r_1), then at r_1
        (which produces r_2), ... up to r_{n-1} — exactly the states steering sees at generation
        steps 0..n-1 when the model generates that response itself. Cached and collective under
        a process group like :meth:`extract_layers`.
        """
        self._check_not_steering()
        prompts = as_prompts(prompts)
        if isinstance(responses, (str, bytes)):
            raise DataError(f"responses must be a list of responses, got a single {type(responses).__name__} "
                            f"{short_repr(responses, 60)}; pass a list, e.g. [text]")
        responses = list(responses)
        for i, r in enumerate(responses):
            if not isinstance(r, str) and not (isinstance(r, Sequence) and all(type(t) is int for t in r)):
                raise DataError(f"responses[{i}] is a {type(r).__name__} ({short_repr(r, 60)}); pass a text or a list "
                                "of token ids per response")
        if len(prompts) != len(responses) or not prompts:
            raise DataError(f"need one response per prompt and at least one pair; got {len(prompts)} prompts "
                            f"and {len(responses)} responses")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        tok = self.tokenizer
        formatted = format_prompts(tok, prompts, self.chat_template, self.system_prompt)
        rows: list[tuple[list[int], int]] = []
        keys = []
        limit = position_limit(self.model)
        for prompt, text, response in zip(prompts, formatted, responses):
            r_ids = list(tok(response, add_special_tokens=False)["input_ids"] if isinstance(response, str) else response)
            r_ids = r_ids[:max_tokens]
            if not r_ids:
                raise DataError(f"empty response for prompt {text[:60]!r}; drop rows without a response")
            keep = self.max_length if limit is None else min(self.max_length, limit - len(r_ids) + 1)
            if keep < 1:
                raise ConfigError(f"max_tokens {max_tokens} leaves no room for the prompt within the model's {limit} "
                                  "positions; lower max_tokens")
            p_ids = tok(text, add_special_tokens=False)["input_ids"][-keep:]
            if not p_ids:
                raise DataError(f"prompt {short_repr(prompt, 60)} has no tokens; remove it or give it some text")
            rows.append((p_ids + r_ids[:-1], len(p_ids) - 1))
            keys.append(text_key(json.dumps([prompt, r_ids])))

        def compute(batch: list[int]) -> list[torch.Tensor]:
            ids, mask = pad_batch([rows[i][0] for i in batch], tok.pad_token_id)
            hidden = self._layer_output(ids, mask, self.layer)
            return [hidden[j, rows[i][1] : len(rows[i][0])].float().cpu() for j, i in enumerate(batch)]

        job = _Job(lambda idx: [len(rows[i][0]) for i in idx], compute)
        return self._fill(self._cache([self.layer], responses=True), keys, job, "extract responses")  # type: ignore[return-value]

    def _check_not_steering(self) -> None:
        if steering_active(self.model):
            raise ConfigError("HFExtractor cannot run on a model inside a `with steering(...)` block (the steering "
                              "hook would act on its forward passes); extract before or after the block")

    @torch.no_grad()
    def _layer_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Block ``layer``'s full output [B, T, d] for a right-padded batch (forward stops there)."""
        return self._run({"input_ids": input_ids, "attention_mask": attention_mask}, [layer], lambda hidden: hidden)[0]

    @torch.no_grad()
    def _forward(self, prompts: list[str], layers: list[int]) -> torch.Tensor:
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        for p, row in zip(prompts, ids):
            if not row:
                raise DataError(f"prompt {short_repr(p, 60)} has no tokens (the tokenizer drops all of it); remove it "
                                "or give it some text")
        long = sum(len(row) > self.max_length for row in ids)
        if long:
            log.warning("%d prompt(s) longer than %d tokens were cut to their last %d tokens (max_length)", long,
                        self.max_length, self.max_length)
        input_ids, attention_mask = pad_batch([row[-self.max_length:] for row in ids], self.tokenizer.pad_token_id)
        mask = attention_mask.to(next(self.model.parameters()).device)
        pooled = self._run({"input_ids": input_ids, "attention_mask": attention_mask}, layers,
                           lambda hidden: pool(hidden, mask, self.pooling).float().cpu())
        return torch.stack(pooled, dim=1)

    def _run(self, inputs: dict[str, torch.Tensor], layers: list[int],
             read: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """``read`` of block outputs [B, T, d] at ``layers`` (in that order) for one forward pass
        of ``inputs``, which stops after the deepest of them."""
        device = next(self.model.parameters()).device
        captured: dict[int, torch.Tensor] = {}
        deepest = max(layers)

        def make_hook(index: int) -> Callable[[nn.Module, tuple, object], None]:
            def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
                captured[index] = read(block_output(output))
                if index == deepest:
                    raise _StopForward

            return hook

        with ExitStack() as hooks:
            for i in sorted(set(layers)):
                hooks.enter_context(hooked(self.blocks[i], make_hook(i)))
            try:
                self.model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False)
            except _StopForward:
                pass
        return [captured[i] for i in layers]
