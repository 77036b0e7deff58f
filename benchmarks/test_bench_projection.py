"""The projection: one ``project`` call, native vs cvxpylayers, and a projection-steered token.

Per call (issue 9): B in {1, 32}, d in {576, 4096}, K in {14, 50}, forward and forward +
backward, both solvers in the same run (target: native >= 100x faster). Euclidean metric, so the
shared cost of forming A M Aᵀ stays small and the ratio is the solvers'. Token latency on the
default model: unsteered, SafeFlow-steered and projection-steered (native and cvxpylayers) at
batch 1, the same prompts, the same refusal polytope and detection gate as
``test_bench_steering.py`` (target: projection with native <= 1.1x an unsteered token).
"""

import pytest
import torch

import safeflow as sf

from conftest import LAYER, record
from test_bench_steering import NEW_TOKENS, _generate, _pick


def _problem(B: int, K: int, d: int, grad: bool):
    """Random constraints with about half of them violated at h0 (float64)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(B, K, d, generator=g, dtype=torch.float64) / d**0.5
    h0 = torch.randn(B, d, generator=g, dtype=torch.float64)
    c = (A @ h0[..., None])[..., 0] + torch.randn(B, K, generator=g, dtype=torch.float64)
    return [t.requires_grad_(grad) for t in (h0, A, c)]


@pytest.mark.parametrize("solver", ["native", "cvxpylayers"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("K", [14, 50])
@pytest.mark.parametrize("d", [576, 4096])
@pytest.mark.parametrize("B", [1, 32])
def test_project_call(benchmark, B, d, K, backward, solver):
    h0, A, c = _problem(B, K, d, backward)
    w = torch.randn(B, d, dtype=torch.float64)

    def run():
        p = sf.project(h0, A, c, margin=0.5, solver=solver)
        if backward:
            torch.autograd.grad((p.hidden * w).sum(), (h0, A, c))
        return p

    slow = solver == "cvxpylayers"
    p = benchmark.pedantic(run, rounds=5 if slow else 30, iterations=1, warmup_rounds=1)
    assert (p.status == 0).all()
    benchmark.extra_info["active_per_row"] = float((p.multipliers > 0).sum(1).double().mean())
    key = f"project B{B} d{d} K{K} {'fwd+bwd' if backward else 'fwd'} {solver}"
    record(benchmark, key)
    record(benchmark, key + " (min)", stat="min")  # on a shared machine the minimum is the steadier figure


STEERERS = {
    "safeflow": lambda: sf.SafeFlowSteerer(),
    "projection native": lambda: sf.ProjectionSteerer(solver="native"),
    "projection cvxpylayers": lambda: sf.ProjectionSteerer(solver="cvxpylayers"),
}


@pytest.mark.parametrize("mode", ["unsteered", *STEERERS])
def test_projection_token_latency(benchmark, default_model, prompts, polytope, refusal_polytope, mode):
    model, tok = default_model
    texts = _pick(polytope, model, tok, prompts.where(sources=["advbench"]).texts[1::3][:60], True, 1)
    if mode == "unsteered":
        run = lambda: _generate(model, tok, texts)  # noqa: E731
    else:
        def run():
            with sf.steering(model, refusal_polytope, STEERERS[mode](), layer=LAYER, gate=polytope,
                             first_n_tokens=None) as log:
                _generate(model, tok, texts)
            benchmark.extra_info["tokens_steered"] = log.summary()["tokens_steered"]
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    record(benchmark, f"projection bench token b1 {mode}", per=NEW_TOKENS)


@pytest.mark.parametrize("mode", list(STEERERS))
def test_projection_steer_call(benchmark, default_model, prompts, refusal_polytope, mode):
    """One steer call on a prompt state outside the refusal polytope: the extra cost of a steered token."""
    model, tok = default_model
    texts = prompts.where(sources=["advbench"]).texts[1::3][:60]
    H = sf.HFExtractor(model, tok, layer=LAYER, progress=False).extract(texts)
    H = H[refusal_polytope.violations(H).max(1).values > 0][:1]
    assert len(H) == 1, "no prompt state outside the refusal polytope"
    steerer = STEERERS[mode]()
    result = benchmark.pedantic(lambda: steerer.steer(H, refusal_polytope), rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(iterations=int(result.iterations[0]), inside=bool(result.inside[0]),
                                shift=float(result.shift[0]))
    record(benchmark, f"projection bench steer call b1 {mode}")
