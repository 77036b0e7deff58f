"""Steering: hooks that let ``model.generate`` run unchanged while hidden states at
layer L are checked against a constraint set and, when outside, steered back inside.

At every forward pass the hook on decoder block L looks at the newest position of each row —
the last prompt token at prefill, then each new token — for the first ``first_n_tokens``
generation steps. The gate decides which rows are eligible, once, at the prompt: with
``gate="prompt"`` (default) rows whose prompt state is outside the constraint set; with a
constraint set as the gate (a detector trained on prompt states), rows whose prompt it flags as
unsafe; with ``gate="token"`` every row. Eligible rows are checked at every step; rows inside
the constraint set are left bit-for-bit untouched, rows outside are replaced by the steerer's
result. Steered states are remembered per (row, position) and re-applied whenever generation
recomputes earlier positions (``use_cache=False``), so generation with and without the KV cache
sees the same hidden states.

Batches must be left-padded (the usual setting for generation with decoder-only models). The
prompt may be given as ``input_ids`` or as ``inputs_embeds``.

**Provenance.** The layer defaults to the one recorded in the constraint set's (or the gate's)
``provenance``; a recorded model architecture or layer that does not match is refused
(:func:`safeflow.provenance.check_source`) unless ``check_provenance=False``.

**Large shifts.** A steering shift larger than the hidden state itself usually means settings made
for another model (a margin or weights in another model's units). When the steered tokens of a
generate() call move states by more, on average, than their norm, one warning is logged for
that call, and :meth:`SteeringLog.summary` lists the call under ``large_shift_calls``.

**Non-finite hidden states.** A NaN/inf hidden state arriving from upstream (a broken layer, an
overflow) cannot be judged, so it is never steered and never makes ``generate`` raise: the row is
left untouched at that step and logged with ``nonfinite=True`` (counted as ``nonfinite`` in
:meth:`SteeringLog.summary`). A row whose prompt state is non-finite cannot be certified safe, so
every gate treats it as eligible and it is checked (and logged) at every step.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from .constraints.base import ConstraintSet
from .errors import ConfigError
from .layers import block_output, find_decoder_layers, hidden_size, normalize_layer, replace_block_output
from .provenance import check_source, recorded_layer
from .steerers.base import Steerer

log = logging.getLogger(__name__)

#: A generate() call is flagged when its steered tokens' mean shift exceeds this multiple of
#: their hidden states' mean L2 norm.
LARGE_SHIFT = 1.0


@dataclass
class SteerEvent:
    """One check of one row at one generation step."""

    call: int  #: index of the generate() call within the context (0-based)
    row: int  #: batch row
    step: int  #: generation step (0 = prefill, which produces generated token 1; step s produces token s+1)
    position: int  #: absolute position in the padded sequence
    violation_before: float  #: largest violation before steering (> 0 means outside)
    violation_after: float  #: largest violation after steering
    steered: bool
    iterations: int
    shift: float  #: L2 norm of the change
    inside: bool
    rejected: bool
    nonfinite: bool = False  #: the hidden state (or its violations) was NaN/inf; left untouched
    norm: float = 0.0  #: L2 norm of the hidden state before steering
    #: index of the row's prompt in the caller's prompt list, when the caller labelled the
    #: generate() call (:meth:`SteeringLog.label_next_call`, as
    #: :func:`~safeflow.decoding.generate_responses` does); None otherwise
    prompt: int | None = None


@dataclass
class SteeringLog:
    """Everything the steering hook did, for inspection after generation."""

    events: list[SteerEvent] = field(default_factory=list)
    large_shift_calls: list[int] = field(default_factory=list)  #: calls whose mean shift exceeded the mean norm
    #: prompt indices of the rows of the next generate() call (:meth:`label_next_call`)
    pending_prompts: list[int] | None = None

    def label_next_call(self, prompts: Sequence[int]) -> None:
        """Say which prompts the rows of the next generate() call are: row ``r`` of that call is
        prompt ``prompts[r]`` of the caller's list, recorded as :attr:`SteerEvent.prompt` of its
        events. Batched callers (:func:`~safeflow.decoding.generate_from_ids`) call it before each
        batch, so the log knows every event's prompt without reconstructing it from call numbers."""
        self.pending_prompts = [int(p) for p in prompts]

    def steered(self) -> list[SteerEvent]:
        return [e for e in self.events if e.steered]

    def steered_prompts(self) -> dict[int, int]:
        """Steered tokens per prompt index (:attr:`SteerEvent.prompt`), for prompts with at least
        one; events of unlabelled calls are left out."""
        counts: dict[int, int] = {}
        for e in self.steered():
            if e.prompt is not None:
                counts[e.prompt] = counts.get(e.prompt, 0) + 1
        return counts

    def steered_rows(self, call: int = -1) -> list[int]:
        """Rows of generate() call ``call`` (default: the last) with at least one steered token."""
        calls = sorted({e.call for e in self.events})
        if not calls:
            return []
        c = calls[call]
        return sorted({e.row for e in self.events if e.call == c and e.steered})

    def summary(self) -> dict[str, Any]:
        """Counts and magnitudes: checks, steered tokens, rows steered, ended inside, rejected;
        ``mean_relative_shift`` (mean of shift / state norm over steered tokens) and
        ``large_shift_calls`` (generate() calls whose mean shift exceeded their states' mean norm)."""
        steered = self.steered()
        rows = {(e.call, e.row) for e in self.events}
        per_row: dict[str, int] = {}
        for e in steered:
            key = f"{e.call}:{e.row}"
            per_row[key] = per_row.get(key, 0) + 1
        return {
            "checks": len(self.events),
            "rows": len(rows),
            "rows_steered": len({(e.call, e.row) for e in steered}),
            "tokens_steered": len(steered),
            "steered_tokens_per_row": per_row,
            "ended_inside": sum(e.inside for e in steered),
            "rejected": sum(e.rejected for e in self.events),
            "nonfinite": sum(e.nonfinite for e in self.events),
            "rows_nonfinite": len({(e.call, e.row) for e in self.events if e.nonfinite}),
            "mean_shift": sum(e.shift for e in steered) / len(steered) if steered else 0.0,
            "max_shift": max((e.shift for e in steered), default=0.0),
            "mean_iterations": sum(e.iterations for e in steered) / len(steered) if steered else 0.0,
            "mean_relative_shift": (sum(e.shift / max(e.norm, 1e-12) for e in steered) / len(steered)
                                    if steered else 0.0),
            "large_shift_calls": list(self.large_shift_calls),
        }

    def check_shifts(self, call: int) -> None:
        """Log one warning (and record ``call`` in ``large_shift_calls``) if the steered tokens of
        generate() call ``call`` moved, on average, by more than :data:`LARGE_SHIFT` × their states' norm."""
        steered = [e for e in self.events if e.call == call and e.steered]
        if not steered or call in self.large_shift_calls:
            return
        shift = sum(e.shift for e in steered) / len(steered)
        norm = sum(e.norm for e in steered) / len(steered)
        if shift > LARGE_SHIFT * norm:
            self.large_shift_calls.append(call)
            log.warning("steering moved hidden states by %.3g on average, %.1f× their norm (%.3g), in generate() call "
                        "%d; the steering settings probably do not fit this model or layer (another model's preset, "
                        "an absolute margin?): use a relative depth= (e.g. the steerer's default), a smaller "
                        "margin, or train the constraint set on this model", shift, shift / max(norm, 1e-12), norm,
                        call)


class _SequenceState:
    """Per-generate() bookkeeping: tokens seen, step counter and steered replacements."""

    def __init__(self, call: int) -> None:
        self.call = call
        self.tokens: torch.Tensor | None = None  # token ids seen so far [B, length]; None after inputs_embeds
        self.batch = 0
        self.length = 0  # positions seen so far
        self.step = -1
        self.flagged: torch.Tensor | None = None  # rows whose prompt was outside (gate="prompt")
        self.start = 0  # absolute position of column 0 in the current forward
        self.replacements: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # position -> (rows, values [r, d])
        self.prompts: list[int] | None = None  # prompt index of each row (SteeringLog.label_next_call)


def _cache_length(kwargs: dict[str, Any]) -> int:
    for name in ("past_key_values", "cache"):
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


class _SteeringHooks:
    def __init__(self, model: nn.Module, constraints: ConstraintSet, steerer: Steerer, block: nn.Module,
                 first_n_tokens: int | None, gate: str | ConstraintSet, log: SteeringLog) -> None:
        self.constraints, self.steerer, self.first_n, self.gate, self.log = constraints, steerer, first_n_tokens, gate, log
        self.state: _SequenceState | None = None
        self.calls = 0
        self.handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            block.register_forward_hook(self._after_block),
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        if self.state is not None:
            self.log.check_shifts(self.state.call)

    def _before_forward(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        source = ids if ids is not None else embeds
        if source is None:
            raise ConfigError("steered generation needs input_ids or inputs_embeds in every forward pass")
        B, T = source.shape[0], source.shape[1]
        past = _cache_length(kwargs)
        s = self.state
        # a call labelled with its prompts (SteeringLog.label_next_call) is always a new one
        continues = s is not None and s.batch == B and self.log.pending_prompts is None and (
            (past == s.length > 0 and T == 1)
            or (past == 0 and ids is not None and s.tokens is not None and T == s.length + 1
                and torch.equal(ids[:, :-1], s.tokens))
        )
        if not continues:
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.ndim == 2 and not bool(mask[:, -1].all()):
                raise ConfigError("steered generation needs left padding; set tokenizer.padding_side = 'left'")
            if s is not None:
                self.log.check_shifts(s.call)
            self.state = s = _SequenceState(self.calls)
            s.batch = B
            pending, self.log.pending_prompts = self.log.pending_prompts, None
            if pending is not None:
                if len(pending) != B:
                    raise ConfigError(f"the generate() call was labelled with {len(pending)} prompts "
                                      f"(SteeringLog.label_next_call) but has {B} rows")
                s.prompts = pending
            self.calls += 1
        assert s is not None
        s.step += 1
        s.start = past
        if ids is None:
            s.tokens = None
        elif past == 0:
            s.tokens = ids
        elif s.tokens is not None:
            s.tokens = torch.cat([s.tokens, ids], dim=1)
        s.length = past + T

    def _after_block(self, _module: nn.Module, _inputs: tuple, output: object) -> object:
        s = self.state
        if s is None:
            return output
        hidden = block_output(output)
        check = self.first_n is None or s.step < self.first_n
        replay = [p for p in s.replacements if s.start <= p < s.start + hidden.shape[1] - 1]
        if not check and not replay:
            return output
        new = None
        for p in replay:  # recomputed earlier positions get their steered states back
            rows, values = s.replacements[p]
            new = hidden.clone() if new is None else new
            new[rows, p - s.start] = values.to(new.dtype)
        if check:
            last = hidden[:, -1]
            if s.flagged is None and isinstance(self.gate, ConstraintSet):
                s.flagged = _flag(self.gate, last)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            if self.gate != "token" and s.flagged is not None:
                rows = rows[s.flagged]
            if rows.numel():
                result = self.steerer.steer(last[rows], self.constraints)
                if s.flagged is None:
                    s.flagged = ((result.violations_before.max(dim=1).values > 0) | result.nonfinite).to(hidden.device)
                position = s.start + hidden.shape[1] - 1
                moved = result.steered.to(hidden.device)
                if moved.any():
                    new = hidden.clone() if new is None else new
                    new[rows[moved], -1] = result.hidden[moved]
                    s.replacements[position] = (rows[moved], result.hidden[moved].detach())
                self._record(s, position, rows.tolist(), result, last[rows])
        return output if new is None else replace_block_output(output, new)

    def _record(self, s: _SequenceState, position: int, rows: list[int], r, hidden: torch.Tensor) -> None:
        before = r.violations_before.max(dim=1).values.tolist()
        after = r.violations_after.max(dim=1).values.tolist()
        norms = hidden.detach().float().norm(dim=1).tolist()
        for i, row in enumerate(rows):
            self.log.events.append(SteerEvent(
                call=s.call, row=row, step=s.step, position=position, violation_before=before[i],
                violation_after=after[i], steered=bool(r.steered[i]), iterations=int(r.iterations[i]),
                shift=float(r.shift[i]), inside=bool(r.inside[i]), rejected=bool(r.rejected[i]),
                nonfinite=bool(r.nonfinite[i]), norm=norms[i],
                prompt=None if s.prompts is None else s.prompts[row],
            ))


@torch.no_grad()
def _flag(gate: ConstraintSet, hidden: torch.Tensor) -> torch.Tensor:
    """Rows [B] the detector ``gate`` flags as unsafe at ``hidden`` [B, d]; rows it cannot judge
    (NaN/inf states or violations) are flagged too. Never raises on the values."""
    param = next(gate.parameters())
    V = gate.violations(hidden.detach().to(device=param.device, dtype=param.dtype))
    unknown = ~(torch.isfinite(hidden).all(dim=1) & torch.isfinite(V).all(dim=1).to(hidden.device))
    return (V.max(dim=1).values.to(hidden.device) > 0) | unknown


@contextmanager
def steering(
    model: nn.Module,
    constraints: ConstraintSet,
    steerer: Steerer,
    layer: int | None = None,
    first_n_tokens: int | None = 20,
    gate: str | ConstraintSet = "prompt",
    layers: str | Sequence[nn.Module] | None = None,
    check_provenance: bool = True,
) -> Iterator[SteeringLog]:
    """Steer ``model``'s hidden states at decoder layer ``layer`` while the context is open.

    Args:
        model: a Hugging Face causal LM (any architecture whose decoder blocks can be found).
        constraints: a fitted constraint set trained on the same model's layer ``layer``.
        steerer: e.g. ``Steerer.create("safeflow")``.
        layer: decoder block index, as used for extraction; None (default): the layer recorded in
            the provenance of ``constraints`` (or of the gate).
        first_n_tokens: check/steer only the first n generation steps of each row (None: all).
        gate: ``"prompt"`` — steer only rows whose prompt is outside the constraint set;
            a :class:`ConstraintSet` — steer only rows whose prompt it flags as unsafe (a
            detector, e.g. a prompt polytope, gating a refusal polytope); ``"token"`` — check
            every row at every step (the paper's Algorithm 1 literally).
        layers: override decoder-layer discovery (attribute path or module list).
        check_provenance: refuse constraint sets (and a gate) whose provenance records another
            model architecture or another layer (:func:`safeflow.provenance.check_source`); False
            skips that check.

    Yields a :class:`SteeringLog`. Hooks are removed on exit, also on exceptions.
    """
    block = check_steering(model, constraints, steerer, layer, first_n_tokens, gate, layers, check_provenance)
    log = SteeringLog()
    hooks = _SteeringHooks(model, constraints, steerer, block, first_n_tokens, gate, log)
    _ACTIVE[model] = _ACTIVE.get(model, 0) + 1
    try:
        yield log
    finally:
        hooks.remove()
        _ACTIVE[model] -= 1
        if not _ACTIVE[model]:
            del _ACTIVE[model]


#: Models with steering hooks attached (count of open ``steering`` contexts).
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, eq=False)
class SteeringSpec:
    """What to steer with — every argument of :func:`steering` but the model, as one typed value
    (``generate_responses(..., steer=spec)``, :func:`~safeflow.evaluation.evaluate_steering`, the
    attack protocol). Fields as in :func:`steering`; :meth:`check` validates them against a model
    and :meth:`apply` opens the steering context. Compared and hashed by identity."""

    constraints: ConstraintSet
    steerer: Steerer
    layer: int | None = None
    first_n_tokens: int | None = 20
    gate: str | ConstraintSet = "prompt"
    layers: str | Sequence[nn.Module] | None = None
    check_provenance: bool = True

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of :func:`steering` (without the model)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def check(self, model: nn.Module) -> nn.Module:
        """:func:`check_steering` on ``model``: the decoder block to hook, or :class:`ConfigError` /
        :class:`DataError` for anything that would fail during ``generate``."""
        return check_steering(model, **self.arguments())

    def apply(self, model: nn.Module) -> AbstractContextManager[SteeringLog]:
        """``steering(model, ...)`` with these arguments: a context manager yielding the log."""
        return steering(model, **self.arguments())

    @classmethod
    def of(cls, steer: SteeringSpec | Mapping[str, Any]) -> SteeringSpec:
        """``steer`` as given, or from a dict of :func:`steering`'s keyword arguments (deprecated:
        pass a SteeringSpec); an unknown key raises :class:`ConfigError` naming the valid ones."""
        if isinstance(steer, SteeringSpec):
            return steer
        if not isinstance(steer, Mapping):
            raise ConfigError(f"steer must be a SteeringSpec, got {type(steer).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(steer) - set(valid))
        if unknown:
            raise ConfigError(f"steer has unknown keys {unknown}; valid: {', '.join(valid)}")
        warnings.warn("passing steer as a dict is deprecated; pass safeflow.SteeringSpec(constraints=..., steerer=..., "
                      "...) with the same keys", DeprecationWarning, stacklevel=3)
        return cls(**steer)


def steering_active(model: nn.Module) -> bool:
    """Whether a :func:`steering` context is open on ``model``."""
    return model in _ACTIVE


def steering_layer(constraints: ConstraintSet, layer: int | None = None,
                   gate: str | ConstraintSet = "prompt") -> int:
    """``layer``, or the layer recorded in the provenance of ``constraints`` (else of ``gate``).
    Raises :class:`ConfigError` if neither is known."""
    if layer is not None:
        return layer
    found = recorded_layer(constraints, gate)
    if found is None:
        raise ConfigError("the constraint set does not record the layer it was trained on (saved before provenance "
                          "existed, or fitted on tensors without provenance); pass layer=L (command line: --layer L), "
                          "or record it: constraints.provenance.update(sf.describe_source(extractor))")
    return found


def check_steering(model: nn.Module, constraints: ConstraintSet, steerer: Steerer, layer: int | None = None,
                   first_n_tokens: int | None = 20, gate: str | ConstraintSet = "prompt",
                   layers: str | Sequence[nn.Module] | None = None, check_provenance: bool = True) -> nn.Module:
    """Check the arguments of :func:`steering` (everything that could fail during ``generate``)
    and return the decoder block to hook. Raises :class:`ConfigError` / :class:`DataError`."""
    if not isinstance(steerer, Steerer):
        raise ConfigError(f"steerer must be a Steerer, got {steerer!r}; create one with "
                          f"Steerer.create(name) (names: {', '.join(Steerer.available())})")
    if not isinstance(gate, ConstraintSet) and gate not in ("prompt", "token"):
        raise ConfigError(f"gate must be 'prompt', 'token' or a fitted ConstraintSet, got {gate!r}")
    if not isinstance(constraints, ConstraintSet):
        raise ConfigError(f"constraints must be a fitted ConstraintSet, got {constraints!r}; load one with "
                          "ConstraintSet.load(path) or fit one")
    blocks = find_decoder_layers(model, layers)
    index = normalize_layer(steering_layer(constraints, layer, gate), len(blocks))
    d = hidden_size(model)
    steerer.check(constraints)
    steerer.check_model(model, index, check_provenance)
    gates = [gate] if isinstance(gate, ConstraintSet) else []
    if check_provenance:
        for c, what in [(constraints, "the constraint set"), *((g, "the gate") for g in gates)]:
            check_source(c.provenance, model=model, layer=index, what=what)
    for c in [constraints] + gates:
        if c.input_dim != d:
            raise ConfigError(
                f"the constraint set expects hidden size {c.input_dim} but the model's is {d}; "
                "train the constraint set on hidden states of this model"
            )
        c.require_fitted()
    if first_n_tokens is not None and (isinstance(first_n_tokens, bool) or not isinstance(first_n_tokens, int)
                                       or first_n_tokens < 0):
        raise ConfigError(f"first_n_tokens must be an int >= 0 or None, got {first_n_tokens!r}")
    return blocks[index]
