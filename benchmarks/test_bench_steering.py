"""Per-token generation latency on the default model (CPU), unsteered vs with the steering hook.

The detection polytope (F = 16384) gates (the costlier of the demo's candidate gates), the
refusal polytope (F = 4096) is the steering set, SafeFlow with the default preset (covariance
preconditioning, steer margin 150). Targets (issue 3): the check adds <= 5% to an unsteered
token; a steered token costs <= 3x an unsteered one.
"""

import pytest

import safeflow as sf

from conftest import LAYER, record

NEW_TOKENS = 16


def _generate(model, tok, prompts):
    enc = tok([tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    return model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=tok.pad_token_id)


def _pick(polytope, model, tok, texts, outside: bool, n: int):
    H = sf.HFExtractor(model, tok, layer=LAYER, progress=False).extract(texts)
    mask = (polytope.violations(H).max(1).values > 0) == outside
    chosen = [t for t, m in zip(texts, mask.tolist()) if m][:n]
    assert len(chosen) == n, "not enough prompts on the requested side of the polytope"
    return chosen


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", ["unsteered", "check only (safe prompt)", "unsteered (outside prompts)",
                                  "steered (prompt outside)"])
def test_token_latency(benchmark, default_model, prompts, polytope, refusal_polytope, batch, mode):
    model, tok = default_model
    if mode.endswith("outside)") or mode.endswith("outside prompts)"):
        texts = _pick(polytope, model, tok, prompts.where(sources=["advbench"]).texts[1::3][:60], True, batch)
    else:
        texts = _pick(polytope, model, tok, prompts.where(sources=["rho-gsm8k"]).texts[:40], False, batch)
    if mode.startswith("unsteered"):
        run = lambda: _generate(model, tok, texts)  # noqa: E731
    else:
        def run():
            with sf.steering(model, refusal_polytope, sf.SafeFlowSteerer(), layer=LAYER, gate=polytope,
                             first_n_tokens=None) as log:
                _generate(model, tok, texts)
            benchmark.extra_info["tokens_steered"] = log.summary()["tokens_steered"]
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    record(benchmark, f"token b{batch} {mode}", per=NEW_TOKENS)


@pytest.mark.parametrize("batch", [1, 8])
def test_steer_call(benchmark, default_model, prompts, refusal_polytope, batch):
    """One SafeFlow call on [batch, d] prompt states outside the refusal polytope: the extra cost
    of a steered token."""
    model, tok = default_model
    texts = prompts.where(sources=["advbench"]).texts[1::3][:60]
    H = sf.HFExtractor(model, tok, layer=LAYER, progress=False).extract(texts)
    H = H[refusal_polytope.violations(H).max(1).values > 0][:batch]
    assert len(H) == batch, "not enough prompt states outside the refusal polytope"
    steerer = sf.SafeFlowSteerer()
    result = benchmark.pedantic(lambda: steerer.steer(H, refusal_polytope), rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info["mean_iterations"] = float(result.iterations.float().mean())
    record(benchmark, f"steer call b{batch}")
