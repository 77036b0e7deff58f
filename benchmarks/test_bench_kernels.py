"""The fused facet-violation kernels against the eager "torch" backend, side by side in one run.

Every figure is recorded as ``kern <what> [<backend>]``; the session summary prints each
compiled backend's speed-up over ``[torch]`` for the same ``<what>``. Targets (issue 8): the
SafeFlow call >= 4x at batch 1 and 8; the training step (B = 128, F = 16384, d = 576) >= 1.5x
and, at B = 1024, peak extra memory <= 10% of eager's; the check at B = 1 with bfloat16 W
>= 1.8x float32 eager within 1e-2; never slower than eager on the grid; on a GPU (B = 1,
d = 4096, F = 16384, K = 50, bfloat16) forward + backward within 1.25x of reading W twice at
the measured copy bandwidth and >= 2x eager.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import safeflow as sf
from safeflow import kernels

from conftest import LAYER, MEDIANS, record

CPU = pytest.mark.skipif("cpu" not in kernels.available(), reason="the C++ kernel is not built here")
CUDA = pytest.mark.skipif("cuda" not in kernels.available(), reason="no CUDA device or CUDA kernels here")
THREADS = [1, 2]


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def operands(B, d, F, K, device="cpu", dtype=torch.float32, seed=0):
    """Random states and a polytope whose features are about 30% active (as at initialisation)."""
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(B, d, generator=g)
    W = torch.randn(F, d, generator=g) / d**0.5
    b = torch.randn(F, generator=g) * 0.5 - 0.3
    Phi = torch.randn(K, F, generator=g) / F**0.5
    xi = torch.zeros(K)
    return [t.to(device=device, dtype=dtype) for t in (H, W, b, Phi, xi)]


# --- CPU ---------------------------------------------------------------------------------


@CPU
@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("backend", ["torch", "cpu", "cpu-bf16"])
def test_check_b1(benchmark, threads, backend):
    """Forward (the check) at B = 1, F = 16384, d = 576, K = 14."""
    H, W, b, Phi, xi = operands(1, 576, 16384, 14)
    Wk = W.bfloat16() if backend == "cpu-bf16" else W
    name = backend.split("-")[0]
    with torch.no_grad():
        V = benchmark.pedantic(kernels.violations, args=(H, Wk, b, Phi, xi), kwargs={"backend": name}, rounds=30,
                               iterations=1, warmup_rounds=3)
        ref = kernels.reference.violations(H.double(), W.double(), b.double(), Phi.double(), xi.double())
    benchmark.extra_info["rel_error"] = float((V.double() - ref).norm() / ref.norm())
    record(benchmark, f"kern check b1 t{threads} [{backend}]")


GRID = [(B, d, K) for B in (1, 32, 1024) for d in (576, 4096) for K in (14, 50)]


@CPU
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("shape", GRID, ids=[f"B{B}-d{d}-K{K}" for B, d, K in GRID])
def test_check_grid(benchmark, backend, shape):
    """Forward on the grid B x d x K (F = 16384), one thread."""
    B, d, K = shape
    H, W, b, Phi, xi = operands(B, d, 16384, K)
    rounds = 3 if B * d >= 1024 * 4096 else 10
    with torch.no_grad():
        benchmark.pedantic(kernels.violations, args=(H, W, b, Phi, xi), kwargs={"backend": backend}, rounds=rounds,
                           iterations=1, warmup_rounds=1)
    record(benchmark, f"kern grid B{B:4d} d{d} K{K} [{backend}]")


@CPU
@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_training_step(benchmark, threads, backend):
    """Loss forward + backward of the polytope's fit at B = 128, F = 16384, d = 576, K = 14."""
    torch.manual_seed(0)
    poly = sf.PolytopeConstraints(576, 14, 16384, backend=backend)
    Z, unsafe = torch.randn(128, 576), torch.arange(128) % 2 == 1

    def step():
        poly.zero_grad(set_to_none=True)
        v, l1 = poly._loss_terms(Z)
        loss = torch.relu(5 + v[~unsafe]).sum() / 128 + torch.relu(5 - v[unsafe].max(1).values).sum() / 128
        (loss + l1.mean()).backward()

    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
    record(benchmark, f"kern train step B128 t{threads} [{backend}]")


# Linux: writing 5 to /proc/self/clear_refs resets the peak resident size (VmHWM) to the current one
PEAK_SCRIPT = """
import sys, torch, safeflow as sf
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
torch.set_num_threads(1)
torch.manual_seed(0)
poly = sf.PolytopeConstraints(576, 14, 16384, backend=sys.argv[1])
Z = torch.randn(1024, 576)
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
v, l1 = poly._loss_terms(Z)
(torch.relu(5 + v).sum() / 1024 + l1.mean()).backward()
grads = sum(p.grad.numel() * p.grad.element_size() for p in poly.parameters())
print(status("VmHWM:") - base, grads)
"""


@CPU
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc (Linux)")
def test_training_peak_memory(benchmark):
    """Peak extra resident memory of one loss forward + backward at B = 1024 (fresh process each),
    with and without the parameter gradients (which any training allocates)."""
    extra, grads = {}, 0
    for backend in ("torch", "cpu"):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, backend], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        assert out.returncode == 0, out.stderr[-2000:]
        peak, grads = map(int, out.stdout.split()[-2:])
        extra[backend] = peak
    benchmark.extra_info.update({f"peak_extra_bytes_{k}": v for k, v in extra.items()})
    benchmark.extra_info["parameter_gradient_bytes"] = grads
    benchmark.extra_info["ratio"] = extra["cpu"] / extra["torch"]
    benchmark.extra_info["ratio_without_gradients"] = (extra["cpu"] - grads) / (extra["torch"] - grads)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    for backend, value in extra.items():  # printed in the summary's "ms" column as MB
        MEDIANS[f"kern peak extra MB B1024 [{backend}]"] = value / 1e9
        MEDIANS[f"kern peak extra MB B1024 w/o grads [{backend}]"] = (value - grads) / 1e9


def _outside_states(model, tok, prompts, poly, n):
    texts = prompts.where(sources=["advbench"]).texts[1::3][:60]
    H = sf.HFExtractor(model, tok, layer=LAYER, progress=False).extract(texts)
    H = H[poly.violations(H).max(1).values > 0][:n]
    assert len(H) == n, "not enough prompt states outside the refusal polytope"
    return H


@CPU
@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("batch", [1, 8])
def test_safeflow_call(benchmark, default_model, prompts, refusal_polytope, threads, backend, batch):
    """One SafeFlow call (default preset) on prompt states outside the refusal polytope."""
    model, tok = default_model
    refusal_polytope.backend = "torch"
    H = _outside_states(model, tok, prompts, refusal_polytope, batch)
    refusal_polytope.backend = backend
    steerer = sf.SafeFlowSteerer(backend=backend)
    try:
        result = benchmark.pedantic(lambda: steerer.steer(H, refusal_polytope), rounds=10, iterations=1,
                                    warmup_rounds=2)
    finally:
        refusal_polytope.backend = "auto"
    benchmark.extra_info["iterations"] = result.iterations.tolist()
    record(benchmark, f"kern safeflow call b{batch} t{threads} [{backend}]")


@CPU
def test_active_feature_fraction(benchmark, default_model, prompts, polytope, refusal_polytope):
    """Fraction of features active (ReLU > 0) on the states each trained polytope sees."""
    model, tok = default_model
    texts = prompts.where(sources=["advbench", "safeflow-everyday"]).texts[::7][:80]
    H = sf.HFExtractor(model, tok, layer=LAYER, progress=False).extract(texts)
    with torch.no_grad():
        fractions = {name: float((p.features(H) > 0).float().mean())
                     for name, p in (("detection F16384", polytope), ("refusal F4096", refusal_polytope))}
    benchmark.extra_info.update(fractions)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    for name, frac in fractions.items():
        MEDIANS[f"kern active fraction % {name} [-]"] = frac * 100 / 1e3  # printed as "ms" = percent


# --- GPU ---------------------------------------------------------------------------------


def _graph_time(fn, reps: int = 50) -> float:
    """Median seconds of one replay of fn() captured in a CUDA graph: device time without the
    host's launch overhead (possible because the kernels never synchronise)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _cuda_time(graph.replay, reps)


def _cuda_time(fn, reps: int = 50) -> float:
    """Median seconds of fn() on the current stream, by CUDA events."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


@CUDA
def test_gpu_llama_shape(benchmark, tmp_path):
    """B = 1, d = 4096, F = 16384, K = 50, bfloat16: violations + input VJP (one SafeFlow step's work)."""
    H, W, b, Phi, xi = operands(1, 4096, 16384, 50, device="cuda", dtype=torch.bfloat16)
    C = torch.ones(1, 50, device="cuda", dtype=torch.bfloat16)
    buf = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    copy = _cuda_time(lambda: buf[: 2 << 30].copy_(buf[2 << 30 :]), reps=20)
    bandwidth = 2 * (2 << 30) / copy  # bytes read + written per second
    del buf
    read_w_twice = 2 * W.numel() * W.element_size() / bandwidth
    eager = _cuda_time(lambda: kernels.violations_vjp(H, W, b, Phi, xi, C, backend="torch"))
    fused = _cuda_time(lambda: kernels.violations_vjp(H, W, b, Phi, xi, C, backend="cuda"))
    eager_graph = _graph_time(lambda: kernels.violations_vjp(H, W, b, Phi, xi, C, backend="torch"))
    fused_graph = _graph_time(lambda: kernels.violations_vjp(H, W, b, Phi, xi, C, backend="cuda"))
    fwd_graph = _graph_time(lambda: kernels.violations(H, W, b, Phi, xi, backend="cuda"))
    Hg = H.clone().requires_grad_()
    autograd_fused = _cuda_time(lambda: torch.autograd.grad(kernels.violations(Hg, W, b, Phi, xi, backend="cuda").sum(),
                                                            Hg))
    with torch.no_grad():
        active = float((torch.relu(H.float() @ W.float().T + b.float()) > 0).float().mean())
    figures = {"copy_bandwidth_GBps": bandwidth / 1e9, "read_W_twice_ms": read_w_twice * 1e3, "eager_ms": eager * 1e3,
               "fused_ms": fused * 1e3, "autograd_fused_ms": autograd_fused * 1e3,
               "fused_over_read_W_twice": fused / read_w_twice, "eager_over_fused": eager / fused,
               "graph_eager_ms": eager_graph * 1e3, "graph_fused_ms": fused_graph * 1e3,
               "graph_forward_only_ms": fwd_graph * 1e3, "graph_fused_over_read_W_twice": fused_graph / read_w_twice,
               "graph_eager_over_fused": eager_graph / fused_graph,
               "active_fraction": active, "device": torch.cuda.get_device_name()}
    benchmark.extra_info.update(figures)
    benchmark.pedantic(lambda: kernels.violations_vjp(H, W, b, Phi, xi, C, backend="cuda"), rounds=20, iterations=1,
                       setup=torch.cuda.synchronize)
    out = os.environ.get("SAFEFLOW_BENCH_OUT")
    if out:
        with open(os.path.join(out, "gpu_llama_shape.json"), "w") as f:
            json.dump(figures, f, indent=1)
    MEDIANS["kern gpu llama fwd+vjp [torch]"] = eager
    MEDIANS["kern gpu llama fwd+vjp [cuda]"] = fused
    MEDIANS["kern gpu llama read W twice [copy]"] = read_w_twice
    MEDIANS["kern gpu llama fwd+vjp graph [torch]"] = eager_graph
    MEDIANS["kern gpu llama fwd+vjp graph [cuda]"] = fused_graph


@CUDA
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_safeflow_loop(benchmark, batch):
    """The SafeFlow loop on the GPU (d = 4096, F = 16384, K = 50; 30 forced steps) vs the eager loop."""
    torch.manual_seed(0)
    poly = sf.PolytopeConstraints(4096, 50, 16384).cuda()
    H = torch.randn(batch, 4096, device="cuda")
    with torch.no_grad():
        poly.thresholds.copy_(poly.violations(H).min(0).values - 1.0)  # every row starts outside
    kw = dict(lambda_unsafe=1.0, lambda_safe=0.0, lr=1e-3, max_steps=30, margin=1e6, precondition="none")
    eager = _cuda_time(lambda: sf.SafeFlowSteerer(backend="torch", **kw).steer(H, poly), reps=5)
    fused = _cuda_time(lambda: sf.SafeFlowSteerer(backend="cuda", **kw).steer(H, poly), reps=5)
    benchmark.extra_info.update({"eager_ms": eager * 1e3, "fused_ms": fused * 1e3})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    MEDIANS[f"kern gpu safeflow 30 steps b{batch} [torch]"] = eager
    MEDIANS[f"kern gpu safeflow 30 steps b{batch} [cuda]"] = fused
