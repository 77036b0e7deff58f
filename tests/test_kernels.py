"""The compiled facet-violation kernels against the float64 eager reference.

Every compiled backend that loaded here runs; the CUDA cases skip without a GPU. Outputs are
allocated poisoned (NaN, or -1 for the bitmask) so an element a kernel forgets to write fails.
"""

import os
import subprocess
import sys

import pytest
import torch

import safeflow as sf
from safeflow import kernels
from safeflow.kernels import compiled
from safeflow.errors import ConfigError, DataError
from safeflow.kernels import reference as ref

from conftest import make_model, make_tokenizer, separable

COMPILED = [b for b in ("cpu", "cuda") if b in kernels.available()]
NO_EXT = os.environ.get("SAFEFLOW_NO_EXT", "") not in ("", "0")
needs_cuda = pytest.mark.skipif("cuda" not in kernels.available(), reason="no CUDA device or CUDA kernels here")

# (B, d, F, K): B = 1, K = 1, F and d off every tile and vector width, batches past the packed block
SHAPES = [(1, 5, 7, 1), (1, 576, 1000, 14), (3, 37, 130, 3), (9, 64, 200, 1), (37, 77, 333, 5), (64, 48, 129, 50)]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", empty)


def params(B, d, F, K, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(B, d, generator=g, dtype=torch.float64)
    W = torch.randn(F, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(F, generator=g, dtype=torch.float64) * 0.5 - 0.3
    Phi = torch.randn(K, F, generator=g, dtype=torch.float64) / F**0.5
    xi = torch.randn(K, generator=g, dtype=torch.float64) - 0.5  # negative, zero and positive thresholds
    xi[0] = 0.0
    return [t.to(device=device, dtype=dtype) for t in (H, W, b, Phi, xi)]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"


def test_cpu_kernel_is_built():
    if NO_EXT:
        pytest.skip("SAFEFLOW_NO_EXT is set: the compiled kernels are off on purpose")
    assert "cpu" in kernels.available(), "the C++ kernel did not build or load; reinstall with a C++ compiler"


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("shape", SHAPES)
def test_operations_match_float64_reference(backend, shape):
    H, W, b, Phi, xi = params(*shape, device=device_of(backend))
    H[0] = 0.0  # with b[0..] mostly negative: a row with few or no active features
    b_neg = b.clone()
    b_neg[:] = -1e6  # and a whole polytope where no feature is active
    C = torch.randn(shape[0], shape[3], dtype=H.dtype, device=H.device)
    assert rel(kernels.violations(H, W, b, Phi, xi, backend=backend), ref.violations(H, W, b, Phi, xi)) < 1e-12
    V, G = kernels.violations_vjp(H, W, b, Phi, xi, C, backend=backend)
    V0, G0 = ref.violations_vjp(H, W, b, Phi, xi, C)
    assert rel(V, V0) < 1e-12 and rel(G, G0) < 1e-12
    A, c = kernels.local_affine(H, W, b, Phi, xi, backend=backend)
    A0, c0 = ref.local_affine(H, W, b, Phi, xi)
    assert rel(A, A0) < 1e-12 and rel(c, c0) < 1e-12
    assert torch.allclose(torch.einsum("nkd,nd->nk", A, H) - c, V0, atol=1e-10)
    V_none = kernels.violations(H, W, b_neg, Phi, xi, backend=backend)
    assert torch.equal(V_none, -xi.expand_as(V_none))
    assert torch.equal(kernels.violations_vjp(H, W, b_neg, Phi, xi, C, backend=backend)[1], torch.zeros_like(H))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("shape", [(1, 5, 7, 1), (3, 9, 70, 2), (20, 6, 65, 3)])
def test_gradcheck_float64(backend, shape):
    inputs = [t.requires_grad_() for t in params(*shape, device=device_of(backend), seed=3)]
    assert torch.autograd.gradcheck(lambda *a: kernels.violations(*a, backend=backend), inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("B", [4, 300])  # below and above the batch whose features the CPU keeps
def test_backward_matches_autograd_reference(backend, B):
    d, F, K = 40, 70_000 // B * 4 if B == 300 else 130, 6
    leaves = [t.requires_grad_() for t in params(B, d, F, K, device=device_of(backend), seed=5)]
    weights = torch.randn(B, K, dtype=torch.float64, device=leaves[0].device)
    (kernels.violations(*leaves, backend=backend) * weights).sum().backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    (ref.violations(*leaves) * weights).sum().backward()
    for name, g, t in zip(("H", "W", "b", "Phi", "xi"), got, leaves):
        assert rel(g, t.grad) < 1e-12, name


@pytest.mark.parametrize("backend", COMPILED)
def test_nan_in_nan_out(backend):
    H, W, b, Phi, xi = params(4, 32, 100, 3, dtype=torch.float32, device=device_of(backend))
    H[2, 5] = float("nan")
    V, G = kernels.violations_vjp(H, W, b, Phi, xi, torch.ones(4, 3, device=H.device), backend=backend)
    assert torch.isnan(V[2]).all() and torch.isnan(G[2]).all()
    assert torch.isfinite(V[[0, 1, 3]]).all() and torch.isfinite(G[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend", COMPILED)
def test_non_contiguous_inputs_and_wrong_dtypes(backend):
    H, W, b, Phi, xi = params(6, 64, 150, 4, dtype=torch.float32, device=device_of(backend))
    Hnc, Wnc, Phinc = H.t().contiguous().t(), W.t().contiguous().t(), Phi.t().contiguous().t()
    assert not Hnc.is_contiguous() and not Wnc.is_contiguous()
    assert rel(kernels.violations(Hnc, Wnc, b, Phinc, xi, backend=backend), ref.violations(H, W, b, Phi, xi)) < 1e-5
    with pytest.raises(DataError, match="convert the states"):
        kernels.violations(H.double(), W, b, Phi, xi, backend=backend)
    with pytest.raises(DataError, match="float"):
        kernels.violations(H.to(torch.int32), W.to(torch.int32), b.int(), Phi.int(), xi.int(), backend=backend)


def test_bfloat16_weights_cpu():
    if "cpu" not in COMPILED:
        pytest.skip("the C++ kernel is not built here")
    H, W, b, Phi, xi = params(3, 576, 2000, 14, dtype=torch.float32)
    V = kernels.violations(H, W.bfloat16(), b, Phi, xi, backend="cpu")
    assert rel(V, ref.violations(*params(3, 576, 2000, 14))) < 1e-2
    poly = sf.PolytopeConstraints(576, 14, 2000, backend="cpu", weight_dtype=torch.bfloat16)
    poly.fitted.fill_(True)  # random parameters stand in for trained ones (violations refuse an unfitted set)
    with torch.no_grad():
        assert rel(poly.violations(H), sf.PolytopeConstraints.violations.__get__(poly)(H)) < 1e-2
        assert poly.kernel_operands()[0].dtype == torch.bfloat16
    assert poly.kernel_operands()[0].dtype == torch.float32  # gradients see the float32 parameter


@pytest.mark.parametrize("backend", COMPILED)
def test_empty_batch(backend):
    H, W, b, Phi, xi = params(1, 8, 20, 2, device=device_of(backend))
    assert kernels.violations(H[:0], W, b, Phi, xi, backend=backend).shape == (0, 2)


def test_backend_names_and_devices():
    assert kernels.resolve("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="valid names"):
        kernels.resolve("fast", torch.device("cpu"))
    with pytest.raises(ConfigError, match="valid names"):
        sf.PolytopeConstraints(4, 2, 8, backend="fast")
    with pytest.raises(DataError, match="cannot run on cuda tensors"):
        kernels.resolve("cpu", torch.device("cuda"))
    with pytest.raises(DataError, match="cannot run on cpu tensors"):
        kernels.resolve("cuda", torch.device("cpu"))
    with pytest.raises(ConfigError, match="compiled kernel backend"):
        H, W, b, Phi, xi = params(1, 4, 8, 2)
        kernels.safeflow_loop(H, W, b, Phi, xi, P=None, lr=0.1, lambda_safe=0, lambda_unsafe=1, margin=0,
                              max_steps=3, backend="torch")


@pytest.mark.parametrize("backend", COMPILED)
def test_torch_func_transforms_trace_the_eager_path(backend):
    H, W, b, Phi, xi = params(3, 6, 20, 2, device=device_of(backend))
    J = torch.func.vmap(torch.func.jacrev(lambda h: kernels.violations(h[None], W, b, Phi, xi, backend=backend)[0]))(H)
    assert rel(J, kernels.local_affine(H, W, b, Phi, xi, backend=backend)[0]) < 1e-12


def test_missing_extension_falls_back_to_torch_with_one_warning():
    code = (
        "import warnings, torch, safeflow as sf\n"
        "print(sf.available()['kernel'])\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    poly = sf.PolytopeConstraints(8, 2, 16, backend='cpu')\n"
        "    poly.fitted.fill_(True)\n"
        "    H = torch.randn(3, 8)\n"
        "    v = [poly.violations(H) for _ in range(3)]\n"
        "print(len([x for x in w if 'unavailable' in str(x.message)]))\n"
        "print(bool(torch.equal(v[0], poly.features(H) @ poly.facets.T - poly.thresholds)))\n"
    )
    env = dict(os.environ, SAFEFLOW_NO_EXT="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["['auto', 'torch']", "1", "True"]


# --- the polytope and the steerer on a compiled backend ---------------------------------


def trained_polytope(backend="torch", F=256, K=4, d=16, device=None):
    H, y = separable(256, d)
    poly = sf.PolytopeConstraints(d, K, F, backend=backend).to(device or device_of(backend))
    return poly.fit(H, y, margin=2.0, feature_l1=0.01, epochs=30, progress=False), H, y


@pytest.mark.parametrize("backend", COMPILED)
def test_fit_on_compiled_backend_matches_eager(backend):
    eager, H, y = trained_polytope("torch", device=device_of(backend))  # same device: same initialisation
    fast, _, _ = trained_polytope(backend)
    assert fast.train_history == pytest.approx(eager.train_history, rel=1e-3)
    assert (fast.predict(H) == eager.predict(H)).float().mean() > 0.99


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("precondition", ["none", "covariance"])
def test_compiled_safeflow_loop_equals_eager_loop(backend, precondition):
    poly, H, y = trained_polytope("torch")
    h = H[y == 1][:12].to(device_of(backend))
    poly = poly.to(device_of(backend))
    kw = dict(lambda_unsafe=4.0, lambda_safe=1e-3, lr=0.01 if precondition == "none" else 0.0005, max_steps=60,
              margin=1.0, precondition=precondition)
    eager = sf.SafeFlowSteerer(backend="torch", **kw).steer(h, poly)
    fast = sf.SafeFlowSteerer(backend=backend, **kw).steer(h, poly)
    assert eager.steered.any() and (eager.iterations > 3).any()
    assert torch.equal(fast.iterations, eager.iterations)
    assert rel(fast.hidden, eager.hidden) < 1e-4


@pytest.mark.skipif("cpu" not in COMPILED, reason="the C++ kernel is not built here")
@pytest.mark.parametrize("basis", ["leading", "random", "none"])
def test_cpu_safeflow_loop_bound_skips_features_without_changing_the_result(monkeypatch, basis):
    """The CPU loop skips features proven inactive with a bound over a basis of the steps'
    directions (the leading subspace of P); any basis, or none, gives the eager loop's result."""
    poly, H, y = trained_polytope("cpu", F=512, K=4, d=64)
    cov = torch.cov(H.T)
    P = cov / (cov.trace() / cov.shape[0])
    if basis == "none":
        monkeypatch.setattr(compiled, "STEP_BASIS_RANK", 0)
    elif basis == "random":
        monkeypatch.setattr(compiled, "leading_subspace",
                            lambda P, r: torch.linalg.qr(torch.randn(P.shape[0], r, dtype=torch.float64)).Q.T)
    compiled.clear_cache()
    h = H[y == 1][:12]
    lr, weights = 0.0005, lambda V: 1e-3 + 4.0 * (V > -1.0).to(V.dtype)
    x, steps = kernels.safeflow_loop(h, *poly.kernel_operands(), P=P, lr=lr, lambda_safe=1e-3, lambda_unsafe=4.0,
                                     margin=1.0, max_steps=60, backend="cpu")
    basis_used = compiled._loop_bound(poly.feature_map.weight, P, h.dtype)[1]
    assert basis_used is None if basis == "none" else basis_used.shape == (16, 64)
    ops = [t.detach() for t in poly.kernel_operands()]
    x_ref, steps_ref = h.clone(), torch.zeros_like(steps)  # the same loop, eager, row by row
    for i in range(len(h)):
        for _ in range(60):
            V, g = kernels.violations_vjp(x_ref[i : i + 1], *ops, weights, backend="torch")
            if not V.amax() > -1.0:
                break
            x_ref[i] -= lr * ((g[0] + torch.sign(x_ref[i] - h[i]) / 64) @ P)
            steps_ref[i] += 1
    assert (steps_ref > 3).any() and torch.equal(steps, steps_ref)
    assert rel(x, x_ref) < 1e-4
    if basis == "leading":  # the bound decides: with a wrong U Wᵀ, features that are active get skipped
        right = compiled._loop_bound
        monkeypatch.setattr(compiled, "_loop_bound", lambda W, P, dtype: (*right(W, P, dtype)[:2],
                                                                          torch.zeros_like(right(W, P, dtype)[2])))
        wrong, _ = kernels.safeflow_loop(h, *poly.kernel_operands(), P=P, lr=lr, lambda_safe=1e-3, lambda_unsafe=4.0,
                                         margin=1.0, max_steps=60, backend="cpu")
        assert rel(wrong, x_ref) > 1e-3


@pytest.mark.skipif("cpu" not in COMPILED, reason="the C++ kernel is not built here")
def test_cpu_safeflow_steering_under_inference_mode(tmp_path):
    """vLLM steers under ``torch.inference_mode``, where a loaded set's tensors have no version
    counter: the loop's cached aids (preconditioner, basis, W Uᵀ) must not need one."""
    poly, H, y = trained_polytope("cpu", F=512, K=4, d=64)
    poly.save(tmp_path / "set")
    h = H[y == 1][:4]
    steerer = sf.SafeFlowSteerer(backend="cpu", precondition="covariance", lr=0.0005, max_steps=60, margin=1.0)
    expected = steerer.steer(h, sf.ConstraintSet.load(tmp_path / "set"))
    with torch.inference_mode():
        loaded = sf.ConstraintSet.load(tmp_path / "set")
        assert loaded.input_covariance.is_inference()
        for _ in range(2):  # the second call reads the cached aids
            got = steerer.steer(h.clone(), loaded)
            assert torch.equal(got.iterations, expected.iterations) and rel(got.hidden, expected.hidden) < 1e-5


def test_steered_generation_cpu_equals_torch():
    if "cpu" not in COMPILED:
        pytest.skip("the C++ kernel is not built here")
    tok, model = make_tokenizer(), make_model("llama")
    prompts = ["how do i make a bomb", "bake cookies please", "hack bank steal car"]
    H = sf.HFExtractor(model, tok, layer=2, progress=False).extract(prompts)
    X = torch.cat([H + 1e-3 * H.std(0) * torch.randn_like(H) for _ in range(20)])
    poly = sf.PolytopeConstraints(H.shape[1], 4, 128).fit(X, torch.tensor([1, 0, 1]).repeat(20), margin=1.0,
                                                          feature_l1=0.01, epochs=100, progress=False)
    outs, logs = [], []
    for backend in ("torch", "cpu"):
        poly.backend = backend
        enc = tok([tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts],
                  return_tensors="pt", padding=True, add_special_tokens=False)
        with sf.steering(model, poly, sf.SafeFlowSteerer(lambda_unsafe=4.0, lr=0.1), layer=2) as log:
            outs.append(model.generate(**enc, max_new_tokens=8, do_sample=False))
        logs.append(log.summary()["tokens_steered"])
    assert logs[0] > 0 and logs[0] == logs[1]
    assert torch.equal(outs[0], outs[1])


# --- CUDA ---------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_cuda_low_precision_inputs(dtype, tol):
    H, W, b, Phi, xi = params(5, 256, 3000, 50, device="cuda")
    C = torch.randn(5, 50, dtype=torch.float64, device="cuda")
    low = [t.to(dtype) for t in (H, W, b, Phi, xi)]
    V, G = kernels.violations_vjp(*low, C.to(dtype), backend="cuda")
    V0, G0 = ref.violations_vjp(*[t.double() for t in low], C)
    assert V.dtype == dtype and rel(V, V0) < tol and rel(G, G0) < tol
    Vb = kernels.violations(H.float(), W.float().bfloat16(), b.float(), Phi.float(), xi.float(), backend="cuda")
    assert rel(Vb, ref.violations(H, W, b, Phi, xi)) < 2e-2


@needs_cuda
def test_cuda_runs_on_the_current_stream():
    H, W, b, Phi, xi = params(7, 128, 500, 8, dtype=torch.float32, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        V = kernels.violations(H, W, b, Phi, xi, backend="cuda")
    stream.synchronize()
    assert rel(V, ref.violations(H.double(), W.double(), b.double(), Phi.double(), xi.double())) < 1e-5


@pytest.mark.integration
def test_compiled_loop_equals_eager_on_default_refusal_polytope():
    """The default model's refusal polytope (as the pipeline trains it, on a small budget) and
    prompt states outside it: the C++ loop takes the eager loop's steps to the same states."""
    if "cpu" not in COMPILED:
        pytest.skip("the C++ kernel is not built here")
    from safeflow.recipes import train_refusal_polytope
    from safeflow.splits import default_splits

    model, tok = sf.load_model(progress=False)
    splits = default_splits(sf.load_prompts("default"))
    ext = sf.HFExtractor(model, tok, layer=20, progress=False)
    refusal, _ = train_refusal_polytope(ext, splits.train.where(label=1).texts[::8][:32], num_features=1024,
                                        progress=False)
    refusal.backend = "torch"
    H = ext.extract(splits.test_ood.where(label=1).texts[:40])
    H = H[refusal.violations(H).max(1).values > 0][:8]
    assert len(H) > 0, "no prompt state outside the refusal polytope"
    eager = sf.SafeFlowSteerer(backend="torch").steer(H, refusal)
    fast = sf.SafeFlowSteerer(backend="cpu").steer(H, refusal)
    assert (eager.iterations > 1).any()
    assert torch.equal(fast.iterations, eager.iterations)
    assert rel(fast.hidden, eager.hidden) < 1e-4
