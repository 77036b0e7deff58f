"""The compiled kernels as ``torch.library`` custom operators (``safeflow::*``, :mod:`safeflow.kernels.ops`).

Each operator passes ``torch.library.opcheck`` on the CPU backend (schema and aliasing, fake
implementation, autograd registration, AOT dispatch with dynamic shapes) in float32 and float64,
and its outputs match the float64 eager reference. ``torch.compile(fullgraph=True)`` traces
:func:`safeflow.kernels.violations` (forward and backward) without a graph break.
"""

import warnings

import pytest
import torch

import safeflow as sf
from safeflow import kernels
from safeflow.kernels import ops
from safeflow.kernels import reference as ref
from safeflow.kernels.compiled import IMPLS, ViolationsFunction

pytestmark = pytest.mark.skipif("cpu" not in kernels.available(), reason="the C++ kernel is not built here")

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def operands(B=5, d=9, F=70, K=3, dtype=torch.float64, seed=0):
    """H [B, d], W [F, d], b [F], Φ [K, F], ξ [K] with a mix of active and inactive features (F > 64:
    two bitmask words)."""
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(B, d, generator=g, dtype=torch.float64)
    W = torch.randn(F, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(F, generator=g, dtype=torch.float64) * 0.5 - 0.3
    Phi = torch.randn(K, F, generator=g, dtype=torch.float64) / F**0.5
    xi = torch.randn(K, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (H, W, b, Phi, xi)]


def f64(*ts):
    return [t.detach().double() for t in ts]


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def active_bits(mask, F):
    """[B, F] bool from the int64 bitmask [B, ceil(F/64)] (bit j % 64 of word j // 64 is feature j)."""
    return ((mask[:, :, None] >> torch.arange(64)) & 1).flatten(1)[:, :F].bool()


@pytest.mark.parametrize("dtype", DTYPES)
def test_violations(dtype):
    """The gradient-free forward: V alone."""
    H, W, b, Phi, xi = operands(dtype=dtype)
    torch.library.opcheck(ops.violations_only, (H, W, b, Phi, xi))
    V = ops.violations_only(H, W, b, Phi, xi)
    assert V.dtype == dtype and rel(V, ref.violations(*f64(H, W, b, Phi, xi))) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep_features", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_violations_forward(dtype, keep_features, grad):
    H, W, b, Phi, xi = (t.requires_grad_(grad) for t in operands(dtype=dtype))
    torch.library.opcheck(ops.violations_forward, (H, W, b, Phi, xi, keep_features))
    V, mask, feat = ops.violations_forward(H, W, b, Phi, xi, keep_features)
    H0, W0, b0, Phi0, xi0 = f64(H, W, b, Phi, xi)
    pre = H0 @ W0.T + b0
    assert V.dtype == dtype and rel(V, ref.violations(H0, W0, b0, Phi0, xi0)) < TOL[dtype]
    assert mask.shape == (5, 2) and mask.dtype == torch.int64 and torch.equal(active_bits(mask, 70), pre > 0)
    assert feat.shape == ((5, 70) if keep_features else (0,))
    if keep_features:
        assert rel(feat, pre.relu()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_violations_backward_matches_the_reference(dtype):
    """The registered autograd: every input's gradient as autograd through the eager reference (float64)."""
    leaves = [t.requires_grad_() for t in operands(dtype=dtype, seed=1)]
    weights = torch.randn(5, 3, dtype=dtype)
    (kernels.violations(*leaves, backend="cpu") * weights).sum().backward()
    exact = [t.requires_grad_() for t in f64(*leaves)]
    (ref.violations(*exact) * weights.double()).sum().backward()
    for name, got, want in zip(("H", "W", "b", "Phi", "xi"), leaves, exact):
        assert got.grad.dtype == dtype and rel(got.grad, want.grad) < TOL[dtype], name


def test_gradcheck_through_the_operator_with_and_without_kept_features():
    for keep in (False, True):
        inputs = [t.requires_grad_() for t in operands(B=3, d=5, F=70, K=2, seed=2)]
        fn = lambda *a: ops.violations_forward(*a, keep)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_the_bitmask_and_features_carry_no_gradient():
    H, W, b, Phi, xi = (t.requires_grad_() for t in operands())
    V, mask, feat = ops.violations_forward(H, W, b, Phi, xi, True)
    assert V.requires_grad and not mask.requires_grad and not feat.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_V", [False, True])
def test_violations_vjp_input(dtype, with_V):
    H, W, b, Phi, xi = operands(dtype=dtype, seed=3)
    V, mask, _ = ops.violations_forward(H, W, b, Phi, xi, False)
    C = torch.randn(5, 3, dtype=dtype)
    args = (W, Phi, mask, C, V if with_V else None)
    torch.library.opcheck(ops.violations_vjp_input, args)
    G = ops.violations_vjp_input(*args)
    assert G.dtype == dtype and rel(G, ref.violations_vjp(*f64(H, W, b, Phi, xi), C.double())[1]) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, True)])
@pytest.mark.parametrize("kept", [False, True])
def test_violations_param_grads(dtype, need, kept):
    H, W, b, Phi, xi = operands(dtype=dtype, seed=4)
    _, mask, feat = ops.violations_forward(H, W, b, Phi, xi, kept)
    C = torch.randn(5, 3, dtype=dtype)
    args = (H, W, b, Phi, mask, feat if kept else None, C, *need)
    torch.library.opcheck(ops.violations_param_grads, args)
    got = ops.violations_param_grads(*args)
    exact = [t.requires_grad_() for t in f64(W, b, Phi)]
    (ref.violations(H.double(), *exact, xi.double()) * C.double()).sum().backward()
    for name, asked, g, want in zip(("W", "b", "PhiT"), need, got, (exact[0].grad, exact[1].grad, exact[2].grad.T)):
        if asked:
            assert g.shape == want.shape and g.is_contiguous() and rel(g, want) < TOL[dtype], name
        else:
            assert g.shape == (0,), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_jacobian(dtype):
    H, W, b, Phi, xi = operands(dtype=dtype, seed=5)
    _, mask, _ = ops.violations_forward(H, W, b, Phi, xi, False)
    torch.library.opcheck(ops.jacobian, (W, b, Phi, xi, mask))
    A, c = ops.jacobian(W, b, Phi, xi, mask)
    A0, c0 = ref.local_affine(*f64(H, W, b, Phi, xi))
    assert A.dtype == c.dtype == dtype and rel(A, A0) < TOL[dtype] and rel(c, c0) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("precondition", [False, True])
def test_safeflow_loop(dtype, precondition):
    """One step from h: ``x = h − lr · g P`` with ``g = ((C Φ) ⊙ D) W`` (the sign term is 0 at x = h),
    ``C = λ_s + λ_u [V > −m]``; rows already at depth m take no step."""
    H, W, b, Phi, xi = operands(B=8, dtype=dtype, seed=6)
    P = torch.eye(9, dtype=dtype) + 0.1 * torch.ones(9, 9, dtype=dtype) if precondition else None
    lr, lam_s, lam_u, m = 0.05, 0.01, 2.0, 0.1
    torch.library.opcheck(ops.safeflow_loop, (H, W, b, Phi, xi, P, lr, lam_s, lam_u, m, 3))
    x, steps = ops.safeflow_loop(H, W, b, Phi, xi, P, lr, lam_s, lam_u, m, 1)
    V0, G0 = ref.violations_vjp(*f64(H, W, b, Phi, xi), lambda V: lam_s + lam_u * (V > -m).double())
    outside = (V0 > -m).any(1)
    assert outside.any() and not outside.all()
    step = G0 @ P.double() if P is not None else G0
    want = torch.where(outside[:, None], H.double() - lr * step, H.double())
    assert steps.dtype == torch.int64 and torch.equal(steps, outside.long())
    assert x.dtype == dtype and rel(x, want) < TOL[dtype]


@pytest.mark.parametrize("metric", [False, True])
def test_project(metric):
    g = torch.Generator().manual_seed(7)
    B, K, d = 4, 3, 6
    A = torch.randn(B, K, d, generator=g, dtype=torch.float64)
    c = torch.randn(B, K, generator=g, dtype=torch.float64)
    h0 = 3 * torch.randn(B, d, generator=g, dtype=torch.float64)
    X = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    M = torch.cov(X.T) if metric else None
    margin = torch.rand(B, 1, generator=g, dtype=torch.float64)
    args = (h0, A, c, margin.expand(B, K).contiguous(), M)
    torch.library.opcheck(ops.project, args)
    h, lam, status = ops.project(*args)
    eager = sf.project(h0, A, c, margin=margin, metric=M, backend="torch")
    assert h.dtype == lam.dtype == torch.float64 and status.dtype == torch.int64
    assert torch.equal(status, eager.status)
    torch.testing.assert_close(lam, eager.multipliers, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(h, eager.hidden, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_projection_steer(dtype):
    """The operator makes the eager steerer's decisions: the same rounds per row and the same states
    up to the dtype's rounding (rows start outside the polytope)."""
    torch.manual_seed(8)
    poly = sf.PolytopeConstraints(6, 3, 70, backend="torch").to(dtype)
    poly.fitted.fill_(True)  # random parameters stand in for trained ones
    with torch.no_grad():
        poly.thresholds.fill_(0.2)
        rows = torch.randn(200, 6, dtype=dtype)
        rows = rows[poly.violations(rows).amax(1) > 0][:6]
    assert len(rows) == 6
    W, b, Phi, xi = poly.kernel_operands()
    args = (rows, W.detach(), b.detach(), Phi.detach(), xi.detach(), None, None, 0.3, 4, 2)
    torch.library.opcheck(ops.projection_steer, args)
    out, rounds, status = ops.projection_steer(*args)
    eager = sf.ProjectionSteerer(solver="native", metric="euclidean", margin=0.3, max_rounds=4, ramp_rounds=2,
                                 backend="torch").steer(rows, poly)
    assert out.dtype == dtype and rounds.dtype == status.dtype == torch.int64
    assert torch.equal(rounds, eager.iterations) and torch.isfinite(out).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, eager.hidden, rtol=tol, atol=tol)


def test_the_operators_are_registered_under_safeflow():
    for name in ("violations", "violations_forward", "violations_vjp_input", "violations_param_grads", "jacobian",
                 "safeflow_loop", "project", "projection_steer"):
        assert hasattr(torch.ops.safeflow, name), name


def test_the_deprecated_autograd_function_still_works():
    leaves = [t.requires_grad_() for t in operands()]
    with pytest.warns(DeprecationWarning, match="safeflow.kernels.violations"):
        V = ViolationsFunction.apply(IMPLS["cpu"], *leaves)
    V.sum().backward()
    assert rel(V, ref.violations(*f64(*leaves))) < 1e-12 and leaves[3].grad is not None


def _compiled(fn):
    """``torch.compile(fn, fullgraph=True)``, or a skip if this machine cannot compile (no C compiler)."""
    compiled = torch.compile(fn, fullgraph=True)

    def run(*args):
        try:
            return compiled(*args)
        except Exception as exc:  # Inductor's own C/C++ toolchain errors; a graph break is not caught here
            if "CppCompileError" in type(exc).__name__ or "InvalidCxxCompiler" in type(exc).__name__:
                pytest.skip(f"torch.compile needs a working C++ compiler here: {exc}")
            raise

    return run


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_compile_fullgraph(dtype):
    torch._dynamo.reset()
    H, W, b, Phi, xi = operands(dtype=dtype, seed=9)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*unavailable")  # no fallback: the compiled backend runs
        V = _compiled(lambda *a: kernels.violations(*a, backend="cpu"))(H, W, b, Phi, xi)
    assert V.dtype == dtype and rel(V, ref.violations(*f64(H, W, b, Phi, xi))) < TOL[dtype]
    traced = torch._dynamo.explain(lambda *a: kernels.violations(*a, backend="cpu"))(H, W, b, Phi, xi)
    assert traced.graph_break_count == 0 and "torch.ops.safeflow.violations" in traced.graphs[0].code
    leaves = [t.requires_grad_() for t in (H, W, b, Phi, xi)]
    loss = _compiled(lambda *a: kernels.violations(*a, backend="cpu").square().sum())(*leaves)
    loss.backward()
    exact = [t.requires_grad_() for t in f64(*leaves)]
    ref.violations(*exact).square().sum().backward()
    for name, got, want in zip(("H", "W", "b", "Phi", "xi"), leaves, exact):
        assert rel(got.grad, want.grad) < 10 * TOL[dtype], name


def test_operators_refuse_buffers_that_do_not_fit():
    """Called directly, an operator checks what it hands to the raw-pointer kernel: the bitmask, kept
    features and projection operands of the wrong shape, dtype or layout are a DataError, never a read
    out of bounds."""
    H, W, b, Phi, xi = operands()
    _, mask, feat = ops.violations_forward(H, W, b, Phi, xi, True)
    C = torch.ones(5, 3, dtype=H.dtype)
    with pytest.raises(sf.DataError, match=r"mask has shape \(5, 1\)"):
        ops.violations_vjp_input(W, Phi, mask[:, :1], C, None)
    with pytest.raises(sf.DataError, match="mask is torch.int32"):
        ops.jacobian(W, b, Phi, xi, mask.int())
    with pytest.raises(sf.DataError, match="feat is torch.float32"):
        ops.violations_param_grads(H, W, b, Phi, mask, feat.float(), C, True, True, True)
    with pytest.raises(sf.DataError, match="V is torch.float32"):
        ops.violations_vjp_input(W, Phi, mask, C, C.float())
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    with pytest.raises(sf.DataError, match=r"h0 has shape \(2, 5\)"):
        ops.project(torch.zeros(2, 5, dtype=torch.float64), A, torch.zeros(2, 3), torch.zeros(2, 3), None)
    with pytest.raises(sf.DataError, match=r"M has shape \(8, 8\)"):
        ops.projection_steer(H, W, b, Phi, xi, torch.eye(8, dtype=torch.float64), None, 0.1, 2, 1)
    M = torch.eye(H.shape[1], dtype=torch.float64)
    with pytest.raises(sf.DataError, match=r"WM has shape \(3, 4\)"):
        ops.projection_steer(H, W, b, Phi, xi, M, W[:3, :4], 0.1, 2, 1)
    other = torch.float32 if H.dtype == torch.float64 else torch.float64
    with pytest.raises(sf.DataError, match=f"WM is {other}"):
        ops.projection_steer(H, W, b, Phi, xi, M, W.to(other), 0.1, 2, 1)
    with pytest.raises(sf.ConfigError, match="without the metric M"):
        ops.projection_steer(H, W, b, Phi, xi, None, W, 0.1, 2, 1)
    # a strided bitmask and features are made contiguous, not read as if they were
    wide = torch.stack([mask, mask], 2)[:, :, 0]
    assert not wide.is_contiguous()
    torch.testing.assert_close(ops.violations_vjp_input(W, Phi, wide, C, None),
                               ops.violations_vjp_input(W, Phi, mask, C, None))
