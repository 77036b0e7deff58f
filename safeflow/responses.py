"""Response-conditioned training data: hidden states labelled by what the model goes on to say.

A polytope trained on *prompt* states learns "this looks like a harmful request"; moving a
state into it makes the prompt look benign, which does not make a model refuse. For steering,
the safe set has to contain the states of *safe conversations* — including harmful requests
that are refused — and the unsafe side every state from which the model goes on to help with
harm, including help that follows a refusal ("I'm sorry … However, here is how"). From prompts
alone, :func:`response_states` builds (labels per state: the state that produces token t of an
answer is labelled by what the answer does from t on):

* **own answers**: harmful prompt + the model's own greedy answer (``max_tokens`` tokens),
  judged whole (:class:`~safeflow.judge.RefusalJudge`, with the prompt): *compliance* → every
  state **unsafe (1)**; *refusal then harmful help* → the states before the help **safe (0)**,
  from the help on **unsafe (1)**; *refusal* or *refusal then safe help* → **safe (0)**;
  *degenerate* answers are left out;
* **refusals**: harmful prompt + a refusal from ``refusals`` (teacher-forced) → **safe (0)**;
* **refusals continued** (``continue_refusals``): harmful prompt + a refusal + the model's own
  greedy continuation of it, judged whole like an own answer — this is where a model that has
  started to refuse turns to helping, so those turns are labelled **unsafe** from the turn on;
* **benign**: benign prompt + the model's own greedy answer → **safe (0)**, every state.

The prompt's last-token state (it produces the first answer token) is kept once per prompt, with
the label of the own answer. The states are exactly the ones the steering hook sees while the
model generates (see :meth:`safeflow.extractors.HFExtractor.extract_responses`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .distributed import map_batches
from .errors import ConfigError, DataError
from .chat import as_prompts, format_prompts
from .extractors import HFExtractor
from .decoding import generate_from_ids, generate_responses
from .judge import RefusalJudge, Verdict
from .steering import SteeringSpec

if TYPE_CHECKING:
    from .data import PromptSet

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


#: Row kinds of :class:`ResponseStates`.
KINDS: tuple[str, ...] = ("complied", "helped-after-refusal", "refused-own", "refusal", "refusal-continued", "benign",
                          "steered-refused", "steered-failed")


@dataclass
class ResponseStates:
    """Labelled hidden states [N, d] with, per row, the prompt it came from and its role."""

    H: torch.Tensor  #: [N, d] float32
    y: torch.Tensor  #: [N] long, 1 = unsafe
    prompt_index: torch.Tensor  #: [N] long, index into harmful + benign (in that order)
    kind: list[str]  #: per row, one of :data:`KINDS` (the answer the state belongs to)

    def __add__(self, other: ResponseStates) -> ResponseStates:
        return ResponseStates(torch.cat([self.H, other.H]), torch.cat([self.y, other.y]),
                              torch.cat([self.prompt_index, other.prompt_index]), self.kind + other.kind)

    def counts(self) -> dict[str, dict[str, int]]:
        """States per kind and label: ``{kind: {"unsafe": n1, "safe": n0}}``."""
        out: dict[str, dict[str, int]] = {}
        for k, label in zip(self.kind, self.y.tolist()):
            row = out.setdefault(k, {"unsafe": 0, "safe": 0})
            row["unsafe" if label == 1 else "safe"] += 1
        return out


def token_labels(verdict: Verdict, ids: Sequence[int], tokenizer) -> list[int] | None:
    """Label of each state that produces one of the answer tokens ``ids`` [n], from the judge's
    verdict on the whole answer: 1 from the token where harmful help starts (every token for
    compliance), 0 before it (every token for a refusal); None for a degenerate answer."""
    if verdict.label == "degenerate":
        return None
    if verdict.label == "compliance":
        return [1] * len(ids)
    if verdict.label != "refusal_then_harmful":
        return [0] * len(ids)
    turn = next((t for t in range(len(ids)) if len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True))
                 > verdict.help_at), len(ids))
    return [0] * turn + [1] * (len(ids) - turn)


def response_states(
    extractor: HFExtractor,
    harmful: Sequence[str],
    benign: Sequence[str] = (),
    *,
    max_tokens: int = 32,
    refusals: Sequence[str] = REFUSALS,
    continue_refusals: bool = True,
    judge: RefusalJudge | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> ResponseStates:
    """Generate the model's own answers (and continuations of refusals) and build
    response-conditioned states, labelled per state (see the module doc).

    ``max_tokens`` bounds each own answer and each continuation of a refusal. Without ``benign``
    prompts the data contrasts helping with refusing on harmful prompts only; a polytope fitted
    to it is a *refusal polytope* — the constraint set used for steering.

    Under a process group (see :meth:`HFExtractor.extract_layers`) this is collective: the
    generation batches and the teacher-forced extraction are shared between the ranks, and every
    rank returns the same result as one process would.
    """
    harmful, benign = as_prompts(harmful, "harmful"), as_prompts(benign, "benign")
    if not harmful:
        raise DataError("need at least one harmful prompt; response states contrast complying with refusing")
    if not refusals:
        raise DataError("refusals is empty; pass at least one refusal text")
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    judge = judge or RefusalJudge()
    tok = extractor.tokenizer
    prompts = harmful + benign
    formatted = format_prompts(tok, prompts, extractor.chat_template, extractor.system_prompt)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in formatted]
    texts, ids = _generate(extractor, prompt_ids, max_tokens, batch_size, progress)
    rng = random.Random(seed)
    chosen = [list(tok(rng.choice(list(refusals)), add_special_tokens=False)["input_ids"]) for _ in harmful]
    refusal_lengths = [len(r) for r in chosen]
    if continue_refusals:
        _, more = _generate(extractor, [p + r for p, r in zip(prompt_ids, chosen)], max_tokens, batch_size, progress)
        chosen = [r + m for r, m in zip(chosen, more)]
    pairs: list[_Pair] = []
    for i, prompt in enumerate(harmful):
        own = token_labels(judge.verdict(texts[i], prompt), ids[i], tok) if ids[i] else None
        if own is not None:
            kind = "complied" if own[0] else "helped-after-refusal" if any(own) else "refused-own"
            pairs.append(_Pair(i, ids[i], kind, own))
        # the refusal itself is safe; its continuation is labelled by what the whole answer does
        n = refusal_lengths[i]
        labels = token_labels(judge.verdict(tok.decode(chosen[i], skip_special_tokens=True), prompt), chosen[i], tok)
        if labels is None:  # a degenerate continuation: keep only the refusal
            chosen[i], labels = chosen[i][:n], [0] * n
        labels = [0] * n + labels[n:]
        pairs.append(_Pair(i, chosen[i], "refusal-continued" if continue_refusals else "refusal", labels,
                           keep_prompt_state=own is None))
    pairs += [_Pair(i, ids[i], "benign", [0] * len(ids[i])) for i in range(len(harmful), len(prompts)) if ids[i]]
    return _states(extractor, prompts, pairs)


def prompt_set_response_states(extractor: HFExtractor, data: PromptSet, *, max_tokens: int = 32,
                               with_benign: bool = False, progress: bool = False) -> tuple[ResponseStates, list[int]]:
    """:func:`response_states` of the harmful prompts of ``data`` (label 1) and, with
    ``with_benign``, of its benign prompts (label 0), each in ``data``'s order; returns the states
    and, per state, the index into ``data`` of its prompt (what ``safeflow extract --responses N``
    writes, with each row's source and category taken from that prompt)."""
    order = [i for i, lbl in enumerate(data.labels) if lbl == 1]
    order += [i for i, lbl in enumerate(data.labels) if lbl == 0] if with_benign else []
    states = response_states(extractor, [data.texts[i] for i in order if data.labels[i] == 1],
                             [data.texts[i] for i in order if data.labels[i] == 0],
                             max_tokens=max_tokens, progress=progress)
    return states, [order[i] for i in states.prompt_index.tolist()]  # the prompt of each state


def steered_states(
    extractor: HFExtractor,
    harmful: Sequence[str],
    steer: SteeringSpec | Mapping[str, Any],
    *,
    max_tokens: int = 32,
    judge: RefusalJudge | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> ResponseStates:
    """States of the model's answers to ``harmful`` prompts *under steering*, labelled by how the
    steering went — the hard negatives of a refusal polytope.

    ``steer`` is a :class:`~safeflow.steering.SteeringSpec` (the current refusal polytope, a
    steerer, the layer, ...; a dict of its fields still works, deprecated). Each steered answer is
    judged with its prompt: a safe refusal gives **safe (0)** states (kind ``steered-refused``);
    anything else — compliance, a refusal that turns to help (from the turn on), or a degenerate
    answer ("I'm here to help you …" loops, which steering into the nearest inside point can
    produce) — gives **unsafe (1)** states (kind ``steered-failed``). The states are those of the
    answer read back without steering, i.e. what the hook sees before it steers. A polytope
    refitted with them learns to keep steering away from the ways steering failed.
    """
    harmful = list(harmful)
    if not harmful:
        raise DataError("need at least one harmful prompt to steer")
    judge = judge or RefusalJudge()
    tok = extractor.tokenizer
    if extractor.world.size > 1:
        raise ConfigError("steered_states runs in one process; call it on one rank")
    texts, ids, _ = generate_responses(extractor.model, tok, harmful, max_new_tokens=max_tokens, batch_size=batch_size,
                                       chat_template=extractor.chat_template, system_prompt=extractor.system_prompt,
                                       steer=steer, progress=progress)
    pairs: list[_Pair] = []
    for i, prompt in enumerate(harmful):
        if not ids[i]:
            continue
        verdict = judge.verdict(texts[i], prompt)
        if verdict.refuses_safely:
            pairs.append(_Pair(i, ids[i], "steered-refused", [0] * len(ids[i])))
        else:
            labels = token_labels(verdict, ids[i], tok) or [1] * len(ids[i])  # degenerate: all unsafe
            pairs.append(_Pair(i, ids[i], "steered-failed", labels))
    if not pairs:
        raise DataError("steering produced no answer to judge; check the prompts and max_tokens")
    return _states(extractor, harmful, pairs)


def _states(extractor: HFExtractor, prompts: list[str], pairs: list[_Pair]) -> ResponseStates:
    """Teacher-forced states of each pair's answer, labelled per state."""
    longest = max(len(p.response) for p in pairs)
    states = extractor.extract_responses([prompts[p.prompt] for p in pairs], [p.response for p in pairs], longest)
    rows = [(s, torch.tensor(p.labels), p) if p.keep_prompt_state else (s[1:], torch.tensor(p.labels[1:]), p)
            for s, p in zip(states, pairs)]
    rows = [r for r in rows if len(r[0])]
    return ResponseStates(
        H=torch.cat([s for s, _, _ in rows]),
        y=torch.cat([y for _, y, _ in rows]).long(),
        prompt_index=torch.cat([torch.full((len(s),), p.prompt, dtype=torch.long) for s, _, p in rows]),
        kind=[p.kind for s, _, p in rows for _ in range(len(s))],
    )


def _generate(extractor: HFExtractor, prefixes: list[list[int]], max_tokens: int, batch_size: int,
              progress: bool) -> tuple[list[str], list[list[int]]]:
    """Greedy continuations of token-id prefixes; shared between the ranks of a process group."""
    model, tok, world = extractor.model, extractor.tokenizer, extractor.world
    if world.size > 1:  # each rank generates its share of the same batches; answers are exchanged
        answers = map_batches(world, lambda batch: list(zip(*generate_from_ids(model, tok, batch, batch_size=len(batch),
                                                                               max_new_tokens=max_tokens))),
                              prefixes, batch_size)
        return [a for a, _ in answers], [b for _, b in answers]
    return generate_from_ids(model, tok, prefixes, max_new_tokens=max_tokens, batch_size=batch_size, progress=progress)


@dataclass
class _Pair:
    """One (prompt, response) to teacher-force, with the label of each of its states."""

    prompt: int  #: index into harmful + benign
    response: list[int]  #: the answer's token ids
    kind: str
    labels: list[int]  #: one per state (per answer token)
    keep_prompt_state: bool = True  #: False: drop the first state (shared with the own-answer row)
