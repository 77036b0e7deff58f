"""Greedy coordinate gradient (GCG; Zou et al., 2023) and its adaptive variant against a detector.

The attack prompt is ``request + suffix``, where the suffix is ``suffix_length`` tokens chosen to
make the model begin its answer with ``target`` (e.g. "Sure, here is"). The prompt is formatted
exactly as safeflow formats prompts (:func:`safeflow.chat.format_prompts`: chat template with
the generation prompt) and tokenised without special tokens, giving ``before + suffix + after``
token ids, followed by the target ids. With ``x`` the one-hot suffix [S, V]:

* loss ``L(x) = mean_t CE(logits_t, target_t)`` over the target positions;
* each step: ``G = ∂L/∂x`` [S, V]; per position the ``topk`` tokens with the most negative
  gradient are candidates; ``candidates`` suffixes are drawn by replacing one random position by
  one random candidate token; those that do not **re-tokenise to themselves** (decode the prompt,
  format and encode it again: the same ids) are dropped; the rest are evaluated in batches and the
  best becomes the current suffix. The best suffix ever seen is returned.

Adaptive GCG adds a term that drives the prompt's hidden state ``h`` at the steering layer (the
state the detector and the steering gate read: the last prompt token) inside a constraint set:
``L(x) + weight · Σ_k ReLU(v_k(h) + margin)``.

The key/values of ``before`` (system prompt and request) are computed once per request and shared
by every candidate; logits are computed only at the target positions.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from ..constraints.base import ConstraintSet
from ..errors import ConfigError
from ..chat import format_prompts
from ..layers import block_output, find_decoder_layers, hooked, normalize_layer
from .base import Attack, positive_int, request_seed
from .cache import AttackPrompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

#: The default target: the start of a compliant answer.
TARGET = "Sure, here is"
_MARK = "\x00SAFEFLOW_SUFFIX\x00"


@dataclass
class _Problem:
    """Token layout of one request: ``before + suffix + after`` is the prompt, then ``target``."""

    request: str
    before: list[int]
    after: list[int]
    target: torch.Tensor  #: [T] long
    cache: Any  #: key/values of ``before`` (batch 1)


class GCGAttack(Attack, name="gcg"):
    """Greedy coordinate gradient suffix attack (white-box: needs the model's gradients).

    Budget per request: at most ``steps`` iterations, each evaluating at most ``candidates``
    suffixes of ``suffix_length`` tokens drawn from the ``topk`` tokens per position.

    Args:
        model, tokenizer: the causal LM attacked and its tokenizer.
        steps, candidates, suffix_length, topk: the budget (each >= 1).
        target: the answer prefix the suffix is optimised to elicit.
        init: the token the suffix starts as (``suffix_length`` copies of ``" " + init``).
        early_stop: stop once greedy decoding of the prompt yields the target.
        allow_non_ascii: allow suffix tokens that decode to non-ASCII or unprintable text.
        eval_batch_size: candidates per forward pass (memory knob; default: all at once).
        chat_template, system_prompt: as for :class:`safeflow.HFExtractor` / ``generate_responses``.
        seed: candidate sampling (combined with each request).
    """

    def __init__(self, model: PreTrainedModel, tokenizer, *, steps: int = 25, candidates: int = 64, suffix_length: int = 16,
                 topk: int = 64, target: str = TARGET, init: str = "!", early_stop: bool = True,
                 allow_non_ascii: bool = False, eval_batch_size: int | None = None, chat_template: bool | str = "auto",
                 system_prompt: str | None = None, seed: int = 0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.steps = positive_int("steps", steps)
        self.candidates = positive_int("candidates", candidates)
        self.suffix_length = positive_int("suffix_length", suffix_length)
        self.topk = positive_int("topk", topk)
        self.eval_batch_size = positive_int("eval_batch_size", eval_batch_size or candidates)
        self.target, self.init, self.early_stop, self.allow_non_ascii = target, init, early_stop, allow_non_ascii
        self.chat_template, self.system_prompt, self.seed = chat_template, system_prompt, seed
        self.device = next(model.parameters()).device
        self.embedding = cast(nn.Embedding, model.get_input_embeddings())
        self.allowed = self._allowed_tokens()
        if int(self.allowed.sum()) < self.topk:
            raise ConfigError(f"topk={topk} exceeds the {int(self.allowed.sum())} tokens a suffix may use")
        init_ids = tokenizer(" " + init, add_special_tokens=False)["input_ids"]
        if len(init_ids) != 1 or not self.allowed[init_ids[0]]:
            raise ConfigError(f"init={init!r} must be a single allowed token (with a leading space); try '!' or 'x'")
        self.init_id = init_ids[0]
        self.target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not self.target_ids:
            raise ConfigError("target is empty; pass the answer prefix to elicit, e.g. 'Sure, here is'")
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    # --- configuration ---------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        model_id = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        return {
            "attack": self.registered_name, "model": model_id, "params": sum(p.numel() for p in self.model.parameters()),
            "tokenizer": getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__,
            "vocab": len(self.tokenizer), "steps": self.steps, "candidates": self.candidates,
            "suffix_length": self.suffix_length, "topk": self.topk, "target": self.target, "init": self.init,
            "early_stop": self.early_stop, "allow_non_ascii": self.allow_non_ascii,
            "chat_template": self.chat_template, "system_prompt": self.system_prompt, "seed": self.seed,
        }

    def _allowed_tokens(self) -> torch.Tensor:
        """[V] bool: tokens a suffix may use — not special, decoding to non-blank (printable ASCII) text."""
        rows = self.embedding.weight.shape[0]
        n = min(rows, len(self.tokenizer))
        texts = self.tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
        ok = torch.zeros(rows, dtype=torch.bool)
        ok[:n] = torch.tensor([bool(t.strip()) and (self.allow_non_ascii or (t.isascii() and t.isprintable()))
                               for t in texts])
        special = set(self.tokenizer.all_special_ids) | set(getattr(self.tokenizer, "added_tokens_decoder", {}))
        ok[[i for i in special if i < rows]] = False
        return ok

    # --- prompt layout and re-tokenisation ------------------------------------------------
    def message(self, request: str, suffix: list[int]) -> str:
        """The user message: ``request``, a space unless the suffix text starts with one, the suffix."""
        text = self.tokenizer.decode(suffix, clean_up_tokenization_spaces=False)
        return request + (text if text[:1].isspace() else " " + text)

    def _format(self, messages: list[str]) -> list[list[int]]:
        texts = format_prompts(self.tokenizer, messages, self.chat_template, self.system_prompt)
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as safeflow's extractor and generation see it."""
        return self._format([prompt])[0]

    def _problem(self, request: str) -> _Problem:
        formatted = format_prompts(self.tokenizer, [request + _MARK], self.chat_template, self.system_prompt)[0]
        if formatted.count(_MARK) != 1:
            raise ConfigError("the chat template does not keep the user message verbatim; GCG cannot place a suffix")
        head, tail = formatted.split(_MARK)
        before = self.tokenizer(head, add_special_tokens=False)["input_ids"]
        after = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([before], device=self.device), use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        return _Problem(request, before, after, torch.tensor(self.target_ids, device=self.device), cache)

    def _consistent(self, problem: _Problem, suffixes: torch.Tensor) -> torch.Tensor:
        """[B] bool: the prompt with suffix row b decodes and re-encodes to ``before + row + after``."""
        rows = suffixes.tolist()
        encoded = self._format([self.message(problem.request, r) for r in rows])
        return torch.tensor([ids == problem.before + r + problem.after for ids, r in zip(encoded, rows)],
                            dtype=torch.bool, device=suffixes.device)

    # --- loss -------------------------------------------------------------------------------
    def _extra(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Additional loss [B] and largest detector violation [B] of prompt states [B, d]; none for GCG."""
        zero = hidden.new_zeros(hidden.shape[0])
        return zero, zero

    def _hidden_block(self) -> nn.Module | None:
        return None

    def _losses(self, problem: _Problem, suffix_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of a batch of suffix embeddings [B, S, d], each [B]: ``loss``, ``target_loss``,
        ``hit`` (greedy decoding gives the target), ``done`` (hit and no extra loss: early stop) and
        ``violation`` (adaptive only: largest detector violation)."""
        B = suffix_embeds.shape[0]
        rest = self.embedding(torch.tensor(problem.after + self.target_ids, device=self.device))
        x = torch.cat([suffix_embeds, rest.unsqueeze(0).expand(B, -1, -1)], dim=1)
        cache = copy.deepcopy(problem.cache)
        if B > 1:
            cache.batch_repeat_interleave(B)
        T = len(self.target_ids)
        position = suffix_embeds.shape[1] + len(problem.after) - 1  # the last prompt token
        captured: list[torch.Tensor] = []
        block = self._hidden_block()
        with hooked(block, lambda _m, _i, o: captured.append(block_output(o)[:, position])) \
                if block is not None else nullcontext():
            logits = self.model(inputs_embeds=x, **{self._cache_kw: cache}, use_cache=True,
                                logits_to_keep=T + 1).logits[:, :-1]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        target = problem.target.unsqueeze(0).expand(B, -1)
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(dim=1)
        extra, violation = self._extra(captured[0]) if captured else (torch.zeros_like(ce), torch.zeros_like(ce))
        hit = (logits.argmax(-1) == target).all(dim=1)
        return {"loss": ce + extra, "target_loss": ce, "hit": hit, "done": hit & (extra <= 0), "violation": violation}

    def _one_hot_embeds(self, one_hot: torch.Tensor) -> torch.Tensor:
        scale = getattr(self.embedding, "embed_scale", None)
        embeds = one_hot @ self.embedding.weight
        return embeds * scale.to(embeds.dtype) if isinstance(scale, torch.Tensor) else embeds * (scale or 1.0)

    def _gradient(self, problem: _Problem, suffix: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Loss of ``suffix`` [S] and its gradient with respect to the one-hot suffix [S, V]."""
        one_hot = F.one_hot(suffix, self.embedding.weight.shape[0]).to(self.embedding.weight.dtype)
        one_hot.requires_grad_(True)
        with torch.enable_grad():
            loss = self._losses(problem, self._one_hot_embeds(one_hot).unsqueeze(0))["loss"][0]
            (grad,) = torch.autograd.grad(loss, one_hot)
        return float(loss.detach()), grad

    @torch.no_grad()
    def _evaluate(self, problem: _Problem, suffixes: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = [self._losses(problem, self.embedding(chunk)) for chunk in suffixes.split(self.eval_batch_size)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    # --- the attack -------------------------------------------------------------------------
    def _sample(self, suffix: torch.Tensor, grad: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Up to ``candidates`` distinct suffixes [B, S], each differing from ``suffix`` in one position."""
        grad = grad.masked_fill(~self.allowed.to(grad.device), math.inf)
        top = (-grad).topk(self.topk, dim=1).indices.cpu()  # [S, k]
        position = torch.randint(0, self.suffix_length, (self.candidates,), generator=generator)
        choice = torch.randint(0, self.topk, (self.candidates,), generator=generator)
        out = suffix.cpu().repeat(self.candidates, 1)
        out[torch.arange(self.candidates), position] = top[position, choice]
        out = torch.unique(out, dim=0)
        return out[(out != suffix.cpu()).any(dim=1)].to(self.device)

    def run(self, request: str) -> tuple[list[int], dict[str, Any]]:
        """Optimise a suffix for ``request``; return its token ids and a record of the run."""
        start, cpu_start = time.perf_counter(), time.process_time()
        problem = self._problem(request)
        generator = torch.Generator().manual_seed(request_seed(self.seed, request))
        suffix = torch.full((self.suffix_length,), self.init_id, dtype=torch.long, device=self.device)
        if not bool(self._consistent(problem, suffix[None])[0]):
            raise ConfigError(f"the initial suffix of {self.init!r} tokens does not re-tokenise to itself with this "
                              "tokenizer and chat template; choose another init token")
        best = {k: v[0] for k, v in self._evaluate(problem, suffix[None]).items()} | {"suffix": suffix}
        history, initial_violation = [float(best["loss"])], float(best["violation"])
        steps = evaluated = 0
        while steps < self.steps and not (self.early_stop and bool(best["done"])):
            steps += 1
            _, grad = self._gradient(problem, suffix)
            candidates = self._sample(suffix, grad, generator)
            candidates = candidates[self._consistent(problem, candidates)]
            if len(candidates):
                scores = self._evaluate(problem, candidates)
                evaluated += len(candidates)
                i = int(scores["loss"].argmin())
                suffix = candidates[i]
                if scores["loss"][i] < best["loss"]:
                    best = {k: v[i] for k, v in scores.items()} | {"suffix": suffix}
            history.append(float(best["loss"]))
            log.debug("gcg step %d: %d candidates, best loss %.4f", steps, len(candidates), history[-1])
        ids = best["suffix"].tolist()
        info = {"suffix": self.tokenizer.decode(ids, clean_up_tokenization_spaces=False), "suffix_ids": ids,
                "loss": history[-1], "initial_loss": history[0], "losses": history,
                "target_loss": float(best["target_loss"]), "success": bool(best["hit"]), "steps": steps,
                "evaluated": evaluated, "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu_start}
        if self._hidden_block() is not None:
            info |= {"violation": float(best["violation"]), "initial_violation": initial_violation}
        return ids, info

    def attack_request(self, request: str) -> list[AttackPrompt]:
        ids, info = self.run(request)
        return [AttackPrompt(self.registered_name or "gcg", request, self.message(request, ids), group=request,
                             info=info)]


class AdaptiveGCGAttack(GCGAttack, name="adaptive-gcg"):
    """GCG that also pushes the prompt's hidden state at ``layer`` inside ``constraints`` (the
    detector the defence gates steering with): loss ``+ weight · Σ_k ReLU(v_k(h) + margin)``.

    Extra args: ``constraints`` (a fitted constraint set of the model's ``layer``), ``layer``,
    ``weight`` and ``margin`` (how deep inside to aim). The default weight suits the default
    model's detection polytope, whose summed violations on harmful requests are O(100) while the
    target loss is O(1). ``info["violation"]`` is the returned
    prompt's largest violation (<= 0: the detector passes it), ``info["initial_violation"]`` the
    plain request's (with the initial suffix).
    """

    def __init__(self, model: PreTrainedModel, tokenizer, *, constraints: ConstraintSet, layer: int, weight: float = 0.01,
                 margin: float = 0.0, **gcg: Any) -> None:
        super().__init__(model, tokenizer, **gcg)
        constraints.require_fitted()
        blocks = find_decoder_layers(model)
        self.layer = normalize_layer(layer, len(blocks))
        self.block = blocks[self.layer]
        d = self.embedding.weight.shape[1]
        if constraints.input_dim != d:
            raise ConfigError(f"the constraint set expects hidden size {constraints.input_dim} but the model's is {d}; "
                              "train it on this model's hidden states")
        if weight < 0:
            raise ConfigError(f"weight must be >= 0, got {weight}")
        self.constraints = constraints.to(self.device).eval()
        self.weight, self.margin = float(weight), float(margin)

    def config(self) -> dict[str, Any]:
        digest = hashlib.sha256()  # of the learned parameters only: buffers may be added by newer formats
        for name, tensor in sorted(self.constraints.named_parameters()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return super().config() | {"layer": self.layer, "weight": self.weight, "margin": self.margin,
                                   "constraints": f"{self.constraints.registered_name}:{digest.hexdigest()[:16]}"}

    def _hidden_block(self) -> nn.Module:
        return self.block

    def _extra(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        V = self.constraints.violations(hidden.to(self.constraints.input_covariance.dtype))
        return self.weight * F.relu(V + self.margin).sum(dim=1), V.max(dim=1).values
