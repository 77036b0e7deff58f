"""Typed results of the evaluations: what :func:`~safeflow.evaluation.evaluate_steering`,
:func:`~safeflow.capability.capability_retention`, :func:`~safeflow.attacks.protocol.evaluate_attacks`
and :func:`~safeflow.recipes.detection_table` return, and what ``safeflow demo`` writes to
``metrics.json`` (:class:`RunMetrics`) and ``safeflow attack`` to ``attack_report.json``.

Every result is a frozen dataclass whose fields say what each number means and in which unit.
``to_json()`` gives the JSON layout these files have always had, plus ``"schema"``: the version
of that layout (:data:`SCHEMA`); ``from_json()`` reads it back, also from files written before the
field existed (read as schema 1, the same layout), and refuses a newer schema with a
:class:`~safeflow.errors.CorruptFileError` naming the version.

Shares are fractions in [0, 1] of the prompts of a group; a share over an empty group is NaN in
memory and ``null`` in JSON (read back as None).

**Deprecated-compatible mapping access.** These functions used to return string-keyed dicts. The
old keys still read: ``result["harmful_refusal_steered"]``, ``result.get("token_cost")``,
``"records" in result``, ``result.keys()`` / ``items()`` / ``values()``, iteration and ``len``
behave as on the old dict (read-only: no assignment, no ``pop``). ``[]``, ``get``, ``keys``,
``items`` and ``values`` emit a :class:`DeprecationWarning`; read the attributes instead
(``result.harmful_refusal_steered``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .errors import CorruptFileError

__all__ = ["SCHEMA", "AttackEval", "AttackRow", "BenignRow", "CapabilityEval", "DetectionRow", "Result", "RunMetrics",
           "SteeringEval"]

#: Version of the JSON layout written by ``to_json``. Files without ``"schema"`` are version 1.
SCHEMA = 1

R = TypeVar("R", bound="Result")


def _check_schema(data: Any, what: str) -> None:
    if not isinstance(data, Mapping):
        raise TypeError(f"{what} must be a JSON object, got {type(data).__name__}")
    version = data.get("schema", 1)
    if not isinstance(version, int) or version > SCHEMA:
        raise CorruptFileError(f"{what} has schema {version!r}, but this safeflow reads schema <= {SCHEMA}; "
                               "upgrade safeflow to read it")


class Result:
    """Base of the typed results: JSON conversion and the deprecated-compatible mapping access."""

    #: fields that ``to_json`` never writes (not JSON: e.g. token ids kept for reuse)
    _not_json: ClassVar[frozenset[str]] = frozenset()
    #: fields left out of the old keys and of ``to_json`` while they are None (optional extras)
    _omit_none: ClassVar[frozenset[str]] = frozenset()
    #: whether ``to_json`` writes ``"schema"`` (tables' rows do not: the file around them does)
    _writes_schema: ClassVar[bool] = True

    # --- JSON ---------------------------------------------------------------------------------
    def _field_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.name != "schema" and not (f.name in self._omit_none and getattr(self, f.name) is None)]

    def _json_value(self, name: str) -> Any:
        return _to_json(getattr(self, name))

    def to_json(self, *, records: bool = True) -> dict[str, Any]:
        """The result as JSON-ready dicts and lists (the file layout), with ``"schema"``.
        ``records=False`` leaves the per-prompt ``records`` out (written to their own file)."""
        out: dict[str, Any] = {"schema": SCHEMA} if self._writes_schema else {}
        for name in self._field_names():
            if name in self._not_json or (name == "records" and not records):
                continue
            out[name] = self._json_value(name)
        return out

    @classmethod
    def _from_fields(cls: type[R], data: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments from a JSON object: the known keys (unknown ones are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"schema"}  # type: ignore[arg-type]
        return {k: v for k, v in data.items() if k in names}

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any]) -> R:
        """Read :meth:`to_json`'s layout back (files written before ``"schema"`` existed too).
        Raises TypeError for a missing field or a value that is not a JSON object,
        :class:`~safeflow.errors.CorruptFileError` for a newer schema."""
        _check_schema(data, cls.__name__)
        return cls(**cls._from_fields(data))

    # --- deprecated-compatible mapping access ---------------------------------------------------
    def _mapping(self) -> dict[str, Any]:
        """The old dict's keys and values (the values typed where the field is)."""
        return {name: getattr(self, name) for name in self._field_names()}

    def _warn(self, key: str = "<field>") -> None:
        warnings.warn(f"reading {type(self).__name__} by string key is deprecated; read its attributes instead "
                      f"(result.{key}, not result[{key!r}])", DeprecationWarning, stacklevel=3)

    def __getitem__(self, key: str) -> Any:
        self._warn(key)
        return self._mapping()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Deprecated: the value of the old key ``key``, else ``default``."""
        self._warn(key)
        return self._mapping().get(key, default)

    def keys(self) -> list[str]:
        """Deprecated: the old dict's keys."""
        self._warn()
        return list(self._mapping())

    def items(self) -> list[tuple[str, Any]]:
        """Deprecated: the old dict's items."""
        self._warn()
        return list(self._mapping().items())

    def values(self) -> list[Any]:
        """Deprecated: the old dict's values."""
        self._warn()
        return list(self._mapping().values())

    def __contains__(self, key: object) -> bool:
        return key in self._mapping()

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping())

    def __len__(self) -> int:
        return len(self._mapping())


def _to_json(value: Any) -> Any:
    if isinstance(value, Result):
        return value.to_json()
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


# --- detection ----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DetectionRow(Result):
    """One detector on one evaluation split (:func:`~safeflow.recipes.detection_table`); unsafe
    (label 1) is the positive class and a prompt is flagged iff its score (largest violation) is > 0.
    A row carries no ``"schema"`` of its own: the file around the table does."""

    _writes_schema = False

    model: str  #: the detector: its registry name in the demo (the constraint family)
    split: str  #: the evaluation split (``test_id``, ``val_ood``, ``test_ood``, ...)
    n: int  #: prompts in the split
    accuracy: float  #: share of prompts classified correctly
    precision: float  #: flagged prompts that are unsafe / flagged prompts (0 when none is flagged)
    recall: float  #: unsafe prompts flagged / unsafe prompts (the true-positive rate)
    f1: float  #: harmonic mean of precision and recall
    fpr: float  #: safe prompts flagged / safe prompts (the false-positive rate)
    auroc: float | None  #: area under the ROC curve of the score; NaN / None with one class only


# --- steering -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SteeringEval(Result):
    """:func:`~safeflow.evaluation.evaluate_steering`: the same prompts answered without and with
    steering, in three groups — ``harmful``, ``benign`` and ``edgy`` (benign but edgy prompts).

    "Safe refusal": the judge's class is ``refusal`` or ``refusal_then_safe``
    (:data:`~safeflow.judge.SAFE_REFUSALS`); "any refusal": :data:`~safeflow.evaluation.REFUSING`.
    """

    _not_json = frozenset({"unsteered"})
    _omit_none = frozenset({"gate", "examples"})

    schema: int = SCHEMA  #: version of the JSON layout (:data:`SCHEMA`)
    harmful_refusal_unsteered: float  #: share of harmful prompts answered with a safe refusal, unsteered
    harmful_refusal_steered: float  #: the same share with steering
    harmful_rows_steered: float = float("nan")  #: share of harmful prompts with at least one steered token
    benign_unchanged: float  #: share of benign prompts whose answer is token-for-token unchanged
    edgy_false_refusal_unsteered: float  #: share of edgy prompts answered with any refusal, unsteered
    edgy_false_refusal_steered: float  #: the same share with steering
    edgy_unchanged: float = float("nan")  #: share of edgy prompts whose answer is unchanged
    #: ``{group: {"unsteered"|"steered": {judge class: share of the group's answers}}}``
    classes: dict[str, dict[str, dict[str, float]]]
    #: ``{group: {"unsteered"|"steered": {"perplexity", "repetition"}}}``: the answers' median
    #: perplexity under the unsteered model and their mean token-3-gram repetition (a share)
    fluency: dict[str, dict[str, dict[str, float]]]
    counts: dict[str, int]  #: prompts per group
    #: ``{"unsteered", "steered"}``: process CPU seconds of each generation (None for a reused
    #: baseline without its time)
    cpu_seconds: dict[str, float | None] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  #: ``{"unsteered", "steered"}``: tokens generated
    #: steered CPU seconds per token ÷ unsteered ones (dimensionless; None without the baseline's time)
    token_cost: float | None = None
    steering: dict[str, Any] = field(default_factory=dict)  #: :meth:`~safeflow.steering.SteeringLog.summary`
    #: the unsteered ``(texts, token_ids)``, to pass as ``unsteered=`` to a later call (not in JSON)
    unsteered: tuple[list[str], list[list[int]]] | None = field(default=None, repr=False, compare=False)
    #: per prompt: ``group``, ``prompt``, ``unsteered`` / ``steered`` (answers), ``class_unsteered`` /
    #: ``class_steered``, ``refused_*``, ``unchanged``, ``steered_tokens`` (count), ``was_steered``,
    #: ``perplexity_*``, ``repetition_*``
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    gate: str | None = None  #: the gate the steerer ran under, when a run records it (the demo)
    #: a few harmful prompts' records with steered tokens, when a run records them (the demo)
    examples: list[dict[str, Any]] | None = field(default=None, repr=False)

    def without_reuse(self) -> SteeringEval:
        """This result without the unsteered answers kept for reuse (smaller to keep around)."""
        return dataclasses.replace(self, unsteered=None)


@dataclass(frozen=True, kw_only=True)
class CapabilityEval(Result):
    """:func:`~safeflow.capability.capability_retention`: benign task prompts answered without and
    with steering."""

    _not_json = frozenset({"unsteered"})

    schema: int = SCHEMA  #: version of the JSON layout (:data:`SCHEMA`)
    n: int  #: task prompts
    rows_steered: float  #: share of prompts with at least one steered token
    unchanged: float  #: share of answers token-for-token identical with and without steering
    accuracy_unsteered: float | None  #: share answered correctly (the task's checker), unsteered; None without targets
    accuracy_steered: float | None  #: the same share with steering
    perplexity_unsteered: float  #: median perplexity of the answers under the unsteered model
    perplexity_steered: float  #: the same for the steered answers
    #: the unsteered ``(texts, token_ids)``, to pass as ``unsteered=`` to a later call (not in JSON)
    unsteered: tuple[list[str], list[list[int]]] | None = field(default=None, repr=False, compare=False)
    #: per prompt: ``prompt``, ``unsteered``, ``steered``, ``unchanged``, ``steered_tokens``,
    #: ``was_steered``, ``perplexity_*`` and, with targets, ``target``, ``correct_*``
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)


# --- attacks ------------------------------------------------------------------------------------
def _split_prefixed(data: Mapping[str, Any], prefixes: tuple[str, ...]) -> tuple[dict[str, dict[str, Any]],
                                                                                 dict[str, Any]]:
    """Keys ``<prefix><name>`` grouped by prefix (``{prefix: {name: value}}``), and the rest."""
    groups: dict[str, dict[str, Any]] = {p: {} for p in prefixes}
    rest: dict[str, Any] = {}
    for key, value in data.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            rest[key] = value
        else:
            groups[prefix][key[len(prefix):]] = value
    return groups, rest


@dataclass(frozen=True, kw_only=True)
class AttackRow(Result):
    """One attack's test prompts (or ``"overall"``: all pooled). JSON: ``attack``, ``n``,
    ``asr_<answers>`` and ``detected_<detector>`` (the old flat keys)."""

    _writes_schema = False

    attack: str  #: the attack's registry name, or ``"overall"``
    n: int  #: test prompts of the attack
    #: attack success rate by answers (``"unsteered"`` and each steerer): share of answers the
    #: judge finds harmful help in (:data:`~safeflow.judge.HARMFUL_HELP`)
    asr: dict[str, float]
    detected: dict[str, float] = field(default_factory=dict)  #: share of prompts each detector flags (score > 0)

    def to_json(self, *, records: bool = True) -> dict[str, Any]:
        return {"attack": self.attack, "n": self.n, **{f"asr_{k}": v for k, v in self.asr.items()},
                **{f"detected_{k}": v for k, v in self.detected.items()}}

    def _mapping(self) -> dict[str, Any]:
        return self.to_json()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttackRow:
        _check_schema(data, cls.__name__)
        groups, rest = _split_prefixed(data, ("asr_", "detected_"))
        return cls(attack=rest["attack"], n=rest["n"], asr=groups["asr_"], detected=groups["detected_"])


@dataclass(frozen=True, kw_only=True)
class BenignRow(Result):
    """The benign prompts of an attack evaluation. JSON: ``n``, ``unchanged_<steerer>``,
    ``false_refusal_<answers>`` and ``flagged_<detector>`` (the old flat keys)."""

    _writes_schema = False

    n: int  #: benign prompts
    unchanged: dict[str, float] = field(default_factory=dict)  #: by steerer: share of answers token-for-token unchanged
    #: by answers (``"unsteered"`` and each steerer): share answered with a safe refusal (a false refusal)
    false_refusal: dict[str, float] = field(default_factory=dict)
    flagged: dict[str, float] = field(default_factory=dict)  #: by detector: share flagged (its false-positive rate)

    def to_json(self, *, records: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n}
        for k in dict.fromkeys([*self.false_refusal, *self.unchanged]):
            if k in self.unchanged:
                out[f"unchanged_{k}"] = self.unchanged[k]
            if k in self.false_refusal:
                out[f"false_refusal_{k}"] = self.false_refusal[k]
        return out | {f"flagged_{k}": v for k, v in self.flagged.items()}

    def _mapping(self) -> dict[str, Any]:
        return self.to_json()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenignRow:
        _check_schema(data, cls.__name__)
        groups, rest = _split_prefixed(data, ("unchanged_", "false_refusal_", "flagged_"))
        return cls(n=rest["n"], unchanged=groups["unchanged_"], false_refusal=groups["false_refusal_"],
                   flagged=groups["flagged_"])


@dataclass(frozen=True, kw_only=True)
class AttackEval(Result):
    """:func:`~safeflow.attacks.protocol.evaluate_attacks` (and the report of
    :func:`~safeflow.attacks.protocol.run_attack_protocol`, which adds ``splits``, ``configs`` and
    ``setup``); ``attack_report.json`` is its JSON without the records."""

    _omit_none = frozenset({"splits", "configs", "setup"})

    schema: int = SCHEMA  #: version of the JSON layout (:data:`SCHEMA`)
    attacks: list[AttackRow]  #: one row per attack, then ``"overall"``
    benign: BenignRow  #: the benign prompts
    #: per prompt: ``attack`` (or ``"benign"``), ``prompt``, ``request``, ``group``, and per answers
    #: ``response_<k>``, ``class_<k>``, ``unchanged_<steerer>``, per detector ``flagged_<d>``
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    #: per attack: ``{"train", "test", "test_groups"}`` — attack strings on each side of the split
    splits: dict[str, dict[str, int]] | None = None
    configs: dict[str, Any] | None = None  #: per attack: its configuration
    setup: dict[str, Any] | None = None  #: layer, gate, detectors, steerers and sizes of the run

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttackEval:
        _check_schema(data, cls.__name__)
        kw = cls._from_fields(data)
        kw["attacks"] = [AttackRow.from_json(r) for r in data["attacks"]]
        kw["benign"] = BenignRow.from_json(data.get("benign") or {"n": 0})
        return cls(**kw)


# --- a demo run ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RunMetrics(Result):
    """``metrics.json`` of a ``safeflow demo`` run (:func:`~safeflow.demo.run_demo`); what
    ``safeflow report`` renders. Only ``model``, ``detection`` and ``steering`` are required, so
    runs written by older versions still render (what they lack is reported as missing)."""

    _omit_none = frozenset({"environment", "facets", "splits"})

    schema: int = SCHEMA  #: version of the JSON layout (:data:`SCHEMA`)
    model: str  #: the model's name or path
    layer: int | None = None  #: the decoder block steered and read (0-based)
    preset: dict[str, Any] = field(default_factory=dict)  #: the preset's settings
    config: dict[str, Any] = field(default_factory=dict)  #: the demo's arguments
    environment: dict[str, Any] | None = None  #: versions and machine
    splits: str | None = None  #: one sentence on the validation and test splits
    data: dict[str, Any] = field(default_factory=dict)  #: prompts per split, source and label
    detection: list[DetectionRow]  #: the detection table
    gate: str | None = None  #: the detector gating steering (its registry name)
    refusal_states: dict[str, Any] = field(default_factory=dict)  #: response states per kind and label
    first_n_tokens: int | None = None  #: generated tokens steered per answer (None: all)
    steering: dict[str, SteeringEval]  #: by steerer entry (``name[@gate]``), without records
    facets: dict[str, Any] | None = None  #: :meth:`~safeflow.analysis.FacetAnalysis.to_dict` of a detector
    #: ``{steerer entry: {task: result}}``, without records
    capability: dict[str, dict[str, CapabilityEval]] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)  #: wall seconds per stage

    def _json_value(self, name: str) -> Any:
        if name == "steering":
            return {k: v.to_json(records=False) for k, v in self.steering.items()}
        if name == "capability":
            return {k: {t: r.to_json(records=False) for t, r in tasks.items()} for k, tasks in self.capability.items()}
        return super()._json_value(name)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunMetrics:
        _check_schema(data, "metrics.json")
        kw = cls._from_fields(data)
        kw["detection"] = [DetectionRow.from_json(r) for r in data["detection"]]
        kw["steering"] = {k: SteeringEval.from_json(v) for k, v in data["steering"].items()}
        kw["capability"] = {k: {t: CapabilityEval.from_json(r) for t, r in tasks.items()}
                            for k, tasks in (data.get("capability") or {}).items()}
        return cls(**kw)
