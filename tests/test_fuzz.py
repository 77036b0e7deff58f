"""Property-based fuzz of the public API (issue 19), bounded and seeded.

Shapes (matching and not), dtypes, NaN/inf, empty batches, wide inputs, wrong types and meta
tensors go through every ``safeflow.kernels`` function on the ``torch`` and ``cpu`` backends and
through ``ConstraintSet.violations`` / ``score`` / ``fit`` and ``Steerer.steer``. The property:
**a SafeflowError or a correct result** — the right shape and dtype, and the float64 eager
reference's values (NaN exactly where it has NaN) — never another exception, never a crash.

Hypothesis runs derandomized (the same examples every run, no example database) with a modest
``max_examples``; the whole file takes well under a minute. ``SAFEFLOW_FUZZ_EXAMPLES`` scales
the example counts (e.g. for a longer run under AddressSanitizer, see setup.py).
"""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeflow as sf
from safeflow import kernels
from safeflow.errors import SafeflowError
from safeflow.kernels import reference as ref

from conftest import separable

BACKENDS = ["torch", *(["cpu"] if "cpu" in kernels.available() else [])]
SCALE = float(os.environ.get("SAFEFLOW_FUZZ_EXAMPLES", "1"))
SPECIAL = [math.nan, math.inf, -math.inf, 1e4, -1e4, 0.0]
MUTATIONS = ["size", "ndim", "dtype", "type", "meta"]
#: mutations that always make a call invalid (a dtype change may be allowed: bfloat16 W with float32 states)
ALWAYS_INVALID = {"size", "ndim", "type", "meta"}


def fuzz(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


def tensor(data, shape, dtype, label):
    """Random values of ``shape`` in ``dtype``, sometimes with one special value (NaN, ±inf, ±1e4, 0)."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label=f"{label} seed"))
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if t.numel() and data.draw(st.integers(0, 4), label=f"{label} poison?") == 0:
        t.view(-1)[data.draw(st.integers(0, t.numel() - 1), label=f"{label} at")] = data.draw(
            st.sampled_from(SPECIAL), label=f"{label} value")
    return t.to(dtype)


def mutate(data, value, how, label):
    """``value`` broken in the way ``how`` names."""
    if how == "size":  # H's rows are free (B); any other size must agree with the other operands
        dim = 1 if label == "H" else data.draw(st.integers(0, value.ndim - 1), label=f"{label} dim")
        shape = list(value.shape)
        shape[dim] = max(0, shape[dim] + data.draw(st.sampled_from([-1, 1, 7]), label=f"{label} by"))
        if shape == list(value.shape):
            shape[dim] += 1
        return torch.randn(shape, dtype=torch.float64).to(value.dtype)
    if how == "ndim":
        add = data.draw(st.booleans(), label=f"{label} add") or value.ndim == 1 or value.shape[0] == 0
        return value[..., None] if add else value[0]
    if how == "dtype":
        return value.to(data.draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                                    torch.int64, torch.bool, torch.complex64]), label=f"{label} dtype"))
    if how == "type":
        return data.draw(st.sampled_from([value.tolist(), value.numpy() if value.dtype != torch.bfloat16 else None,
                                          None, "H", 3.0]), label=f"{label} type")
    return value.to("meta")


def coarsest(*tensors: torch.Tensor) -> torch.dtype:
    """The least precise dtype among ``tensors`` (what bounds a result's accuracy)."""
    return max((t.dtype for t in tensors), key=lambda dt: torch.finfo(dt).eps)


def close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """``out`` equals the float64 ``expected`` within ``dtype``'s precision: NaN exactly where it has
    NaN, the same infinities, and close finite values."""
    out, expected = out.double(), expected.double()
    if not torch.equal(out.isnan(), expected.isnan()):
        return False
    both = torch.isfinite(out) & torch.isfinite(expected)
    if not torch.equal(out[~both].nan_to_num(0.0), expected[~both].nan_to_num(0.0)):
        return False
    tol = {torch.float64: 1e-9, torch.float32: 2e-3}.get(dtype, 5e-2)
    scale = 1.0 + float(expected[both].abs().max()) if both.any() else 1.0
    return bool(torch.allclose(out[both], expected[both], rtol=tol, atol=tol * scale))


def draw_operands(data, extra: tuple[str, ...] = (), valid: bool = False):
    """Operands of a kernel call (H, W, b, Phi, xi and ``extra`` of "C", "P"), their sizes, dtype
    and the mutation applied to one of them (None: all valid; always None if ``valid``)."""
    B, d = data.draw(st.integers(0, 5), label="B"), data.draw(st.integers(1, 9), label="d")
    F, K = data.draw(st.integers(1, 70), label="F"), data.draw(st.integers(1, 4), label="K")
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]), label="dtype")
    shapes = {"H": (B, d), "W": (F, d), "b": (F,), "Phi": (K, F), "xi": (K,), "C": (B, K), "P": (d, d)}
    names = ["H", "W", "b", "Phi", "xi", *extra]
    ops = {n: tensor(data, shapes[n], dtype, n) for n in names}
    ops["W"], ops["Phi"] = ops["W"] / math.sqrt(d), ops["Phi"] / math.sqrt(F)
    if "P" in ops:
        ops["P"] = torch.eye(d, dtype=dtype) + 0.1 * ops["P"]
    how = None if valid else data.draw(st.sampled_from([None] * 5 + MUTATIONS), label="mutation")
    if how is not None:
        which = data.draw(st.sampled_from(names), label="mutated")
        ops[which] = mutate(data, ops[which], how, which)
    return ops, (B, d, F, K), dtype, how


def finite_params(ops) -> bool:
    """Whether the parameters (W, b, Phi, xi, P) are finite: values are specified only then
    (:mod:`safeflow.kernels`); states H and weights C may hold anything."""
    return all(bool(torch.isfinite(t).all()) for n, t in ops.items() if n not in ("H", "C") and isinstance(
        t, torch.Tensor) and not t.is_meta and (t.is_floating_point() or t.is_complex()))


def run(call):
    """The result of ``call()``, or None if it raised a SafeflowError; any other exception fails."""
    try:
        return call()
    except SafeflowError:
        return None


# --- kernels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(40)
@given(data=st.data())
def test_fuzz_violations(backend, data):
    ops, (B, d, F, K), dtype, how = draw_operands(data)
    V = run(lambda: kernels.violations(*ops.values(), backend=backend))
    if V is None:
        return
    assert how not in ALWAYS_INVALID, f"a {how} mutation was accepted"
    assert V.shape == (B, K) and V.dtype == ops["H"].dtype
    if finite_params(ops):
        assert close(V, ref.violations(*(t.double() for t in ops.values())), coarsest(*ops.values()))


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(40)
@given(data=st.data())
def test_fuzz_violations_autograd(backend, data):
    """The backward pass (input and parameter gradients) on valid, finite operands."""
    ops, (B, d, F, K), dtype, _ = draw_operands(data, valid=True)
    ops = {n: t.nan_to_num(0.0, 0.0, 0.0).requires_grad_(True) for n, t in ops.items()}
    weights = torch.randn(B, K, dtype=dtype)
    (kernels.violations(*ops.values(), backend=backend) * weights).sum().backward()
    exact = {n: t.detach().double().requires_grad_(True) for n, t in ops.items()}
    (ref.violations(*exact.values()) * weights.double()).sum().backward()
    for n in ops:
        assert ops[n].grad is not None and ops[n].grad.shape == ops[n].shape, n
        assert close(ops[n].grad, exact[n].grad, dtype), n


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(40)
@given(data=st.data())
def test_fuzz_violations_vjp(backend, data):
    ops, (B, d, F, K), dtype, how = draw_operands(data, extra=("C",))
    C = ops.pop("C")
    as_function = data.draw(st.booleans(), label="weights as a function")
    weights = (lambda V: C) if as_function else C
    out = run(lambda: kernels.violations_vjp(*ops.values(), weights, backend=backend))
    if out is None:
        return
    assert how not in ALWAYS_INVALID, f"a {how} mutation was accepted"
    V, G = out
    assert V.shape == (B, K) and G.shape == (B, d) and G.dtype == ops["H"].dtype
    if finite_params(ops):
        eV, eG = ref.violations_vjp(*(t.double() for t in ops.values()), C.double())
        tol = coarsest(*ops.values(), C)
        assert close(V, eV, tol) and close(G, eG, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(40)
@given(data=st.data())
def test_fuzz_local_affine(backend, data):
    ops, (B, d, F, K), dtype, how = draw_operands(data)
    out = run(lambda: kernels.local_affine(*ops.values(), backend=backend))
    if out is None:
        return
    assert how not in ALWAYS_INVALID, f"a {how} mutation was accepted"
    A, c = out
    assert A.shape == (B, K, d) and c.shape == (B, K)
    if finite_params(ops):
        eA, ec = ref.local_affine(*(t.double() for t in ops.values()))
        assert close(A, eA, coarsest(*ops.values())) and close(c, ec, coarsest(*ops.values()))


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(40)
@given(data=st.data())
def test_fuzz_safeflow_loop(backend, data):
    use_P = data.draw(st.booleans(), label="precondition")
    ops, (B, d, F, K), dtype, how = draw_operands(data, extra=("P",) if use_P else ())
    P = ops.pop("P", None)
    max_steps = data.draw(st.sampled_from([0, 1, 5, -1]), label="max_steps")
    lr = data.draw(st.sampled_from([0.05, 1.0, math.nan]), label="lr")
    out = run(lambda: kernels.safeflow_loop(*ops.values(), P=P, lr=lr, lambda_safe=0.0, lambda_unsafe=1.0,
                                            margin=0.0, max_steps=max_steps, backend=backend))
    if out is None:
        return
    assert backend != "torch" and how not in ALWAYS_INVALID and max_steps >= 0 and not math.isnan(lr)
    x, steps = out
    assert x.shape == (B, d) and x.dtype == ops["H"].dtype and steps.shape == (B,)
    assert bool(((steps >= 0) & (steps <= max_steps)).all())
    if not finite_params({**ops, "P": P}):
        return
    V = ref.violations(*(t.double() for t in ops.values()))
    stopped = (V <= 0).all(1) | ~torch.isfinite(V).all(1)  # inside or not finite from the start: no step
    assert bool((steps[stopped] == 0).all()) and torch.equal(x[stopped].isnan(), ops["H"][stopped].isnan())


# --- constraint sets and steerers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def poly():
    H, y = separable(128, 8)
    return sf.PolytopeConstraints(8, num_facets=3, num_features=70).fit(H, y, epochs=2, progress=False)


def draw_states(data, dim):
    """States for a ``dim``-wide set: usually [N, dim] float, sometimes another width, dtype or type."""
    N = data.draw(st.integers(0, 5), label="N")
    width = data.draw(st.sampled_from([dim] * 4 + [dim - 1, dim + 1, 1 << 12]), label="width")
    dtype = data.draw(st.sampled_from([torch.float32] * 3 + [torch.float64, torch.float16, torch.int64]),
                      label="dtype")
    H = tensor(data, (N, width), torch.float64, "H").to(dtype)
    how = data.draw(st.sampled_from([None] * 6 + ["ndim", "type", "meta"]), label="mutation")
    return (H if how is None else mutate(data, H, how, "H")), how


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(40)
@given(data=st.data())
def test_fuzz_constraint_set_violations_and_score(poly, backend, data):
    poly.backend = backend
    H, how = draw_states(data, poly.input_dim)
    V = run(lambda: poly.violations(H))
    if V is not None:
        assert how is None and H.shape[1] == poly.input_dim and H.dtype == torch.float32
        assert V.shape == (H.shape[0], poly.num_constraints)
        W, b, Phi, xi = (t.detach().double() for t in poly.kernel_operands())
        assert close(V.detach(), ref.violations(H.double(), W, b, Phi, xi), V.dtype)
    s = run(lambda: poly.score(H))  # score also takes arrays and lists, and any real dtype
    if s is not None:
        assert how in (None, "type") and s.shape == (len(H),) and torch.isfinite(s).all()  # it refuses NaN rows


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(15)
@given(data=st.data())
def test_fuzz_fit_is_valid_or_refused_and_transactional(poly, backend, data):
    cs = sf.PolytopeConstraints(8, num_facets=3, num_features=70, backend=backend)
    cs.load_state_dict(poly.state_dict())
    before = {k: v.clone() for k, v in cs.state_dict().items()}
    H, how = draw_states(data, 8)
    n = len(H) if hasattr(H, "__len__") else 0
    labels = data.draw(st.sampled_from(["alternating", "one class", "wrong length", "text", "fractional"]),
                       label="labels")
    y = {"alternating": np.arange(n) % 2, "one class": np.zeros(n), "wrong length": np.arange(n + 1) % 2,
         "text": np.array(["unsafe"] * n), "fractional": np.full(n, 0.5)}[labels]
    options = data.draw(st.sampled_from([{}, {"lr": -1.0}, {"batch_size": 0}, {"assignment": "magic"},
                                         {"margin": math.inf}]), label="options")
    out = run(lambda: cs.fit(H, y, epochs=1, progress=False, **options))
    if out is None:
        now = cs.state_dict()
        assert all(torch.equal(now[k], v) for k, v in before.items())  # a failed fit changes nothing
        return
    assert how in (None, "type") and labels == "alternating" and not options  # fit takes arrays and lists too
    assert bool(cs.fitted) and all(torch.isfinite(t).all() for t in cs.state_dict().values() if t.is_floating_point())


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(20)
@given(data=st.data())
def test_fuzz_steer(poly, backend, data):
    poly.backend = backend
    steerer = data.draw(st.sampled_from([sf.SafeFlowSteerer(margin=0.0, max_steps=5, backend=backend),
                                         sf.ProjectionSteerer(margin=0.0, solver="native")]), label="steerer")
    H, how = draw_states(data, poly.input_dim)
    result = run(lambda: steerer.steer(H, poly))
    if result is None:
        return
    assert how is None and H.shape[1] == poly.input_dim
    assert result.hidden.shape == H.shape and result.hidden.dtype == H.dtype
    untouched = ~result.steered
    # rows left alone come back as they were, up to a round trip through the set's float32 (steer
    # writes every row back from its float32 copy when any row moved)
    assert torch.equal(result.hidden[untouched].float().nan_to_num(), H[untouched].float().nan_to_num())
    finite_in = torch.isfinite(H).all(1)
    assert torch.equal(result.nonfinite, ~finite_in | ~torch.isfinite(result.violations_before).all(1))
