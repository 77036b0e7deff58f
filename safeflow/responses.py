"""Response-conditioned training data: hidden states labelled by what the model goes on to say.

A polytope trained on *prompt* states learns "this looks like a harmful request"; moving a
state into it makes the prompt look benign, which does not make a model refuse. For steering,
the safe set has to contain the states of *safe conversations* — including harmful requests
that are refused. :func:`response_states` builds such data from prompts alone:

* harmful prompt + the model's own greedy answer → **unsafe (1)**, every state that produces
  one of its first ``max_tokens`` tokens (the first of them is the prompt's last-token state);
  if the judge finds the answer is already a refusal, the row is **safe (0)** instead;
* harmful prompt + a refusal from ``refusals`` (teacher-forced) → **safe (0)**, the states
  after the prompt (the prompt state itself is shared with the row above and keeps its label);
* benign prompt + the model's own greedy answer → **safe (0)**, every state.

The states are exactly the ones the steering hook sees while the model generates (see
:meth:`safeflow.extractors.HFExtractor.extract_responses`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .distributed import map_batches
from .errors import DataError
from .evaluation import RefusalJudge
from .extractors import HFExtractor
from .generation import generate_responses

#: Refusals used as the safe continuation of harmful prompts (project-written; any list works).
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that request.",
    "I cannot assist with that. It could cause serious harm to people.",
    "I'm sorry, I can't provide instructions for that.",
    "As an AI assistant, I can't help with anything illegal or dangerous.",
    "I won't help with this request because it could hurt someone.",
    "Sorry, but I cannot provide that information.",
    "I can't help with that. If you or someone else is in danger, please contact local authorities.",
    "I'm not able to help with that request.",
    "I must decline. This request asks for something harmful, and I won't provide it.",
    "I'm sorry, but helping with this would be unsafe and against my guidelines.",
)


@dataclass
class ResponseStates:
    """Labelled hidden states [N, d] with, per row, the prompt it came from and its role."""

    H: torch.Tensor  #: [N, d] float32
    y: torch.Tensor  #: [N] long, 1 = unsafe
    prompt_index: torch.Tensor  #: [N] long, index into harmful + benign (in that order)
    kind: list[str]  #: per row: "complied", "refused-own", "refusal", "benign"

    def counts(self) -> dict[str, int]:
        return {k: self.kind.count(k) for k in ("complied", "refused-own", "refusal", "benign")}


def response_states(
    extractor: HFExtractor,
    harmful: Sequence[str],
    benign: Sequence[str] = (),
    *,
    max_tokens: int = 12,
    refusals: Sequence[str] = REFUSALS,
    judge: RefusalJudge | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> ResponseStates:
    """Generate the model's own answers and build response-conditioned states (see the module doc).

    Without ``benign`` prompts the data contrasts complying with refusing on harmful prompts only;
    a polytope fitted to it is a *refusal polytope* — the constraint set used for steering.

    Under a process group (see :meth:`HFExtractor.extract_layers`) this is collective: the
    generation batches and the teacher-forced extraction are shared between the ranks, and every
    rank returns the same result as one process would.
    """
    harmful, benign = list(harmful), list(benign)
    if not harmful:
        raise DataError("need at least one harmful prompt; response states contrast complying with refusing")
    if not refusals:
        raise DataError("refusals is empty; pass at least one refusal text")
    judge = judge or RefusalJudge()
    model, tok = extractor.model, extractor.tokenizer
    options = dict(max_new_tokens=max_tokens, chat_template=extractor.chat_template, system_prompt=extractor.system_prompt)
    world = extractor.world
    if world.size > 1:  # each rank generates its share of the same batches; answers are exchanged
        answers = map_batches(world, lambda batch: list(zip(*generate_responses(model, tok, batch, batch_size=len(batch),
                                                                                **options)[:2])),
                              harmful + benign, batch_size)
        texts, ids = [a for a, _ in answers], [b for _, b in answers]
    else:
        texts, ids, _ = generate_responses(model, tok, harmful + benign, batch_size=batch_size, progress=progress, **options)
    rng = random.Random(seed)
    pairs: list[_Pair] = []
    for i in range(len(harmful)):
        if ids[i]:
            refused = judge(texts[i])
            pairs.append(_Pair(i, ids[i], "refused-own" if refused else "complied", int(not refused)))
        pairs.append(_Pair(i, rng.choice(list(refusals)), "refusal", 0, keep_prompt_state=not ids[i]))
    pairs += [_Pair(i, ids[i], "benign", 0) for i in range(len(harmful), len(texts)) if ids[i]]
    prompts = harmful + benign
    states = extractor.extract_responses([prompts[p.prompt] for p in pairs], [p.response for p in pairs], max_tokens)
    rows = [(s if p.keep_prompt_state else s[1:], p) for s, p in zip(states, pairs)]
    rows = [(s, p) for s, p in rows if len(s)]
    return ResponseStates(
        H=torch.cat([s for s, _ in rows]),
        y=torch.cat([torch.full((len(s),), p.label, dtype=torch.long) for s, p in rows]),
        prompt_index=torch.cat([torch.full((len(s),), p.prompt, dtype=torch.long) for s, p in rows]),
        kind=[p.kind for s, p in rows for _ in range(len(s))],
    )


@dataclass
class _Pair:
    """One (prompt, response) to teacher-force, with the label of its states."""

    prompt: int  #: index into harmful + benign
    response: str | list[int]  #: text, or the model's own token ids
    kind: str
    label: int
    keep_prompt_state: bool = True  #: False: drop the first state (shared with the own-answer row)
