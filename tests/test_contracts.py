"""Every public entry of the kernels, constraint sets, steerers and tuning checks its contract
(issue 19): a shape mistake never reaches the compiled kernel, a failed fit changes nothing, and
every refusal is a safeflow error whose message names the fix. Real compiled kernel, real tiny
models; nothing is mocked."""

import math

import pytest
import torch

import safeflow as sf
from safeflow import kernels
from safeflow.constraints.base import MAX_PARAM
from safeflow.errors import ConfigError, CorruptFileError, DataError
from safeflow.io import save_tensors
from safeflow.kernels import backends
from safeflow.kernels.compiled import IMPLS
from safeflow.provenance import fingerprint
from safeflow.tuning import refusal_nll, tune_thresholds

from conftest import HIDDEN, make_model, make_tokenizer, separable

COMPILED = [b for b in ("cpu", "cuda") if b in kernels.available()]
BACKENDS = ["torch", *[b for b in COMPILED if b == "cpu"]]  # tensors here are on the CPU
needs_cpu = pytest.mark.skipif("cpu" not in COMPILED, reason="the C++ kernel is not built here")


def operands(B=3, d=32, F=64, K=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, d, generator=g, dtype=dtype), torch.randn(F, d, generator=g, dtype=dtype) / d**0.5,
            torch.randn(F, generator=g, dtype=dtype) * 0.5, torch.randn(K, F, generator=g, dtype=dtype) / F**0.5,
            torch.randn(K, generator=g, dtype=dtype))


@pytest.fixture(scope="module")
def fitted():
    """A fitted 16-d polytope (and its training data)."""
    H, y = separable(256, 16)
    poly = sf.PolytopeConstraints(16, num_facets=4, num_features=64)
    poly.fit(H, y, epochs=4, progress=False)
    return poly, H, y


# --- kernels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_shape_mismatch_names_the_argument(backend):
    H, W, b, Phi, xi = operands()
    with pytest.raises(DataError, match=r"b has shape \(2,\) but \[F\] = \[64\] is expected; b needs one bias"):
        kernels.violations(H, W, b[:2], Phi, xi, backend=backend)
    with pytest.raises(DataError, match=r"W has shape \(64, 32\) but \[F, d\] = \[any, 31\]"):
        kernels.local_affine(H[:, :31], W, b, Phi, xi, backend=backend)
    with pytest.raises(DataError, match=r"xi has shape \(5,\) but \[K\] = \[4\]"):
        kernels.violations(H, W, b, Phi, torch.randn(5, dtype=H.dtype), backend=backend)
    with pytest.raises(DataError, match=r"Phi has shape \(4, 63\) but \[K, F\] = \[any, 64\]"):
        kernels.violations(H, W, b, Phi[:, :63], xi, backend=backend)
    with pytest.raises(DataError, match=r"H has shape \(32,\) but \[B, d\]"):
        kernels.violations(H[0], W, b, Phi, xi, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vjp_weights_of_the_wrong_shape(backend):
    H, W, b, Phi, xi = operands()
    with pytest.raises(DataError, match=r"weights has shape \(5, 4\) but \[B, K\] = \[3, 4\].*one weight per row"):
        kernels.violations_vjp(H, W, b, Phi, xi, torch.ones(5, 4, dtype=H.dtype), backend=backend)
    with pytest.raises(DataError, match=r"weights has shape \(3, 3\).*a function V -> weights"):
        kernels.violations_vjp(H, W, b, Phi, xi, lambda V: V[:, :3], backend=backend)
    with pytest.raises(DataError, match="weights must be a torch.Tensor"):
        kernels.violations_vjp(H, W, b, Phi, xi, lambda V: V.tolist(), backend=backend)
    # weights in another float dtype are converted, as before
    V, G = kernels.violations_vjp(H, W, b, Phi, xi, torch.ones(3, 4, dtype=torch.float32), backend=backend)
    assert G.shape == (3, 32) and G.dtype == H.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_wrong_types_and_degenerate_sizes(backend):
    H, W, b, Phi, xi = operands()
    with pytest.raises(DataError, match="H is on the meta device.*materialise it"):
        kernels.violations(H.to("meta"), W, b, Phi, xi, backend=backend)
    with pytest.raises(DataError, match="Phi is on the meta device"):
        kernels.violations_vjp(H, W, b, Phi.to("meta"), xi, torch.ones(3, 4, dtype=H.dtype), backend=backend)
    with pytest.raises(DataError, match=r"W must be a torch.Tensor, got list; convert it with torch.as_tensor"):
        kernels.violations(H, W.tolist(), b, Phi, xi, backend=backend)
    with pytest.raises(DataError, match=r"H is torch.int64; pass real floating-point values \(convert with .float"):
        kernels.violations(H.long(), W, b, Phi, xi, backend=backend)
    with pytest.raises(DataError, match="K \\(facets\\) is 0"):
        kernels.violations(H, W, b, Phi[:0], xi[:0], backend=backend)
    with pytest.raises(DataError, match="convert"):
        kernels.violations(H, W.float(), b, Phi, xi, backend=backend)
    assert kernels.violations(H[:0], W, b, Phi, xi, backend=backend).shape == (0, 4)  # an empty batch is fine


@needs_cpu
def test_safeflow_loop_checks_its_operands_and_settings():
    H, W, b, Phi, xi = operands()
    run = dict(lr=0.1, lambda_safe=0.0, lambda_unsafe=1.0, margin=0.0, max_steps=3, backend="cpu")
    with pytest.raises(DataError, match=r"P has shape \(3, 3\) but \[d, d\] = \[32, 32\]"):
        kernels.safeflow_loop(H, W, b, Phi, xi, P=torch.eye(3, dtype=H.dtype), **run)
    with pytest.raises(DataError, match=r"h has shape \(3, 31\)|W has shape \(64, 32\) but \[F, d\] = \[any, 31\]"):
        kernels.safeflow_loop(H[:, :31], W, b, Phi, xi, P=None, **run)
    with pytest.raises(ConfigError, match="lr must be a finite number, got nan"):
        kernels.safeflow_loop(H, W, b, Phi, xi, P=None, **{**run, "lr": math.nan})
    with pytest.raises(ConfigError, match="max_steps must be an int >= 0, got -1"):
        kernels.safeflow_loop(H, W, b, Phi, xi, P=None, **{**run, "max_steps": -1})
    x, steps = kernels.safeflow_loop(H, W, b, Phi, xi, P=torch.eye(32, dtype=H.dtype), **run)
    assert x.shape == H.shape and steps.shape == (3,)


@needs_cpu
def test_compiled_bindings_refuse_bad_sizes_and_null_buffers():
    """The C++ guards (csrc/guards.h), reached without the Python checks: ValueError from the
    module itself, DataError through compiled.py."""
    mod = backends.module("cpu")
    H, W, b, Phi, xi = operands(dtype=torch.float32)
    PhiT, V = Phi.t().contiguous(), torch.empty(3, 4)
    ptrs = [t.data_ptr() for t in (H, W, b, PhiT, xi, V)]
    with pytest.raises(ValueError, match="d, F and K must be >= 1, got d=0"):
        mod.forward(0, 0, *ptrs, 0, 0, 3, 0, 64, 4, 0, 1)
    with pytest.raises(ValueError, match="buffer H is a null address"):
        mod.forward(0, 0, 0, *ptrs[1:], 0, 0, 3, 32, 64, 4, 0, 1)
    with pytest.raises(ValueError, match="overflow a buffer; split the batch"):
        mod.forward(0, 0, *ptrs, 0, 0, 1 << 40, 1 << 40, 64, 4, 0, 1)
    with pytest.raises(ValueError, match="buffer mask is a null address"):
        mod.vjp_input(0, 0, ptrs[1], ptrs[3], 0, ptrs[5], 0, ptrs[0], 3, 32, 64, 4, 0, 1)
    wnorm = torch.ones(64)
    with pytest.raises(ValueError, match="max_steps must be >= 0"):
        mod.safeflow_loop(0, 0, *ptrs[:5], 0, wnorm.data_ptr(), 0, 0, 0, ptrs[0], V.data_ptr(), 3, 32, 64, 4, 0.1, 0.0,
                          1.0, 0.0, -1, 0, 1)
    with pytest.raises(ValueError, match="buffer wnorm is a null address"):
        mod.safeflow_loop(0, 0, *ptrs[:5], 0, 0, 0, 0, 0, ptrs[0], V.data_ptr(), 3, 32, 64, 4, 0.1, 0.0, 1.0, 0.0, 5, 0, 1)
    with pytest.raises(ValueError, match="buffer basis is a null address"):
        mod.safeflow_loop(0, 0, *ptrs[:5], 0, wnorm.data_ptr(), 0, 0, 8, ptrs[0], V.data_ptr(), 3, 32, 64, 4, 0.1, 0.0,
                          1.0, 0.0, 5, 0, 1)
    with pytest.raises(DataError, match="kernel backend 'cpu' refused forward: .*B must be >= 0.*check the operands"):
        IMPLS["cpu"]._call("forward", H.device, (1, 32, 64, 4), torch.float32, 0, 0, 0, *ptrs, 0, 0, -1, 32, 64, 4)


@needs_cpu
@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_nan_rows_agree_between_torch_and_cpu(poison):
    """One documented behaviour: a row whose violations hold a NaN gets NaN gradients and NaN A, c
    on both backends; every other row matches the float64 reference."""
    H, W, b, Phi, xi = operands(B=5)
    H[1, 3] = math.nan
    H[3, 0] = poison
    C = torch.ones(5, 4, dtype=H.dtype)
    out = {be: (*kernels.violations_vjp(H, W, b, Phi, xi, C, backend=be), *kernels.local_affine(H, W, b, Phi, xi,
                                                                                                 backend=be))
           for be in ("torch", "cpu")}
    for (t, c) in zip(out["torch"], out["cpu"]):
        rows_t, rows_c = t.reshape(5, -1).isnan().any(1), c.reshape(5, -1).isnan().any(1)
        assert torch.equal(rows_t, rows_c)
        V = out["torch"][0]
        assert torch.equal(rows_t, V.isnan().any(1))  # NaN exactly where V has one
        assert rows_t[1] and not rows_t[[0, 2, 4]].any()
        assert torch.isnan(t[rows_t]).all() and torch.isnan(c[rows_c]).all()  # the whole row, not some entries
        ok = ~rows_t
        assert torch.allclose(t[ok], c[ok], rtol=1e-10, atol=1e-10, equal_nan=False) or torch.equal(
            t[ok].isinf(), c[ok].isinf())


# --- constraint sets --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["polytope", "linear", "mlp"])
def test_violations_before_fit_raises(kind):
    cs = sf.ConstraintSet.create(kind, input_dim=16)
    with pytest.raises(DataError, match="has not been fitted; call .fit"):
        cs.violations(torch.randn(2, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_wide_and_narrow_states_never_reach_the_kernel(backend):
    p = sf.ConstraintSet.create("polytope", input_dim=32, num_facets=4, num_features=64, backend=backend)
    p.fitted.fill_(True)
    wide = torch.zeros(1, 1).expand(64, 1 << 20)  # the 64 × 2^20 input that crashed the CPU kernel (no memory)
    with pytest.raises(DataError, match=r"H has shape \(64, 1048576\) but \[N, d\] = \[any, 32\].*one row of 32"):
        p.violations(wide)
    with pytest.raises(DataError, match=r"H has shape \(2, 8\)"):
        p.violations(torch.randn(2, 8))
    with pytest.raises(DataError, match=r"H has shape \(2, 8\)"):
        p.violations_vjp(torch.randn(2, 8), torch.ones(2, 4))
    with pytest.raises(DataError, match=r"H has shape \(2, 8\)"):
        p.local_affine(torch.randn(2, 8))
    with pytest.raises(DataError, match=r"H is torch.float64 but the constraint set computes in torch.float32; "
                                        r"convert the states with H.to"):
        p.violations(torch.randn(2, 32, dtype=torch.float64))


def test_meta_device_inputs_and_sets(fitted):
    poly, H, y = fitted
    meta = H.to("meta")
    for call in (lambda: poly.violations(meta), lambda: poly.score(meta), lambda: poly.predict(meta),
                 lambda: poly.fit(meta, y, progress=False), lambda: poly.fit(H, y.to("meta"), progress=False),
                 lambda: sf.SafeFlowSteerer(margin=0.0).steer(meta, poly)):
        with pytest.raises(DataError, match="meta device.*materialise it"):
            call()
    with torch.device("meta"):
        ghost = sf.PolytopeConstraints(16, 4, 64)
    with pytest.raises(DataError, match="meta device.*load a saved one"):
        ghost.violations(H)


def _snapshot(cs):
    return ({k: v.clone() for k, v in cs.state_dict().items()}, repr(cs.provenance), list(cs.train_history))


def _unchanged(cs, snap):
    state, provenance, history = snap
    now = cs.state_dict()
    return (set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
            and repr(cs.provenance) == provenance and cs.train_history == history and bool(cs.fitted))


@pytest.mark.parametrize("kind", ["polytope", "linear"])
def test_failed_fit_leaves_a_fitted_set_bit_for_bit_unchanged(kind):
    H, y = separable(128, 16)
    cs = sf.ConstraintSet.create(kind, input_dim=16)
    cs.fit(H, y, epochs=2, progress=False)
    cs.provenance["layer"] = 3
    snap = _snapshot(cs)
    nan_rows = H.clone()
    nan_rows[5, 2] = math.nan
    failures = [
        (DataError, "hidden size 15 but this constraint set expects 16", lambda: cs.fit(H[:, :15], y, progress=False)),
        (ConfigError, "fit option batch_size=0 is invalid", lambda: cs.fit(H, y, batch_size=0, progress=False)),
        (DataError, "NaN/inf values in 1 row.*drop or re-extract", lambda: cs.fit(nan_rows, y, progress=False)),
        (ConfigError, "fit option lr=inf is invalid", lambda: cs.fit(H, y, lr=math.inf, progress=False)),
    ]
    if kind == "polytope":
        failures.append((ConfigError, "training loss became inf; lower lr",  # a loss that diverges at once
                         lambda: cs.fit(H, y, unsafe_weight=1e38, margin=1e6, epochs=2, progress=False)))
        offset = torch.full_like(H, 1e14) + y[:, None].float()  # spread lost in float32: folding overflows
        failures.append((ConfigError, r"beyond ±1e\+12 .*in \['feature_map.bias'\]; lower lr or the margin, or "
                         "rescale", lambda: cs.fit(offset, y, epochs=2, progress=False)))
    for error, message, call in failures:
        with pytest.raises(error, match=message):
            call()
        assert _unchanged(cs, snap), message
    cs.score(H)  # still usable


def test_successful_fit_swaps_into_the_same_tensors():
    H, y = separable(128, 16)
    poly = sf.PolytopeConstraints(16, 4, 32)
    facets = poly.facets
    poly.fit(H, y, epochs=2, progress=False)
    assert poly.facets is facets and bool(poly.fitted) and poly.provenance["training"]["epochs"] == 2
    again = sf.PolytopeConstraints(16, 4, 32).fit(H, y, epochs=2, progress=False)
    assert torch.equal(again.facets, poly.facets)  # the copy trains exactly as the set itself did


def test_overflowing_weights_are_refused_at_load(tmp_path, fitted):
    poly, H, _ = fitted
    path = tmp_path / "huge.safetensors"
    huge = sf.PolytopeConstraints(16, 4, 64)
    huge.load_state_dict(poly.state_dict())
    with torch.no_grad():
        huge.facets.fill_(3e38)  # finite, but the violations become inf
    assert torch.isinf(huge.violations(H)).any()
    huge.save(path)
    with pytest.raises(CorruptFileError, match=r"parameters \['facets'\] hold values beyond ±1e\+12.*re-train it"):
        sf.ConstraintSet.load(path)
    with torch.no_grad():
        huge.facets.copy_(poly.facets)
        huge.facets[0, 0] = MAX_PARAM / 2
    huge.save(path)
    assert sf.ConstraintSet.load(path).num_constraints == 4  # below the bound loads


@pytest.mark.parametrize("provenance, problem", [
    ({"layer": 3.5}, r"provenance\['layer'\] must be an int .*got 3.5"),
    ({"layer": "3"}, r"provenance\['layer'\] must be an int .*got '3'"),
    ({"layer": True}, r"provenance\['layer'\] must be an int .*got True"),
    ({"model": object()}, "JSON values"),
    ({"loss": math.nan}, "JSON values"),
])
def test_save_refuses_what_load_would_refuse(tmp_path, fitted, provenance, problem):
    poly, _, _ = fitted
    before = dict(poly.provenance)
    poly.provenance.update(provenance)
    try:
        with pytest.raises(ConfigError, match=problem + ".*fix .provenance before saving"):
            poly.save(tmp_path / "p.safetensors")
    finally:
        poly.provenance = before
    assert not (tmp_path / "p.safetensors").exists()
    poly.provenance = []  # not a dict at all
    try:
        with pytest.raises(ConfigError, match="provenance must be a dict"):
            poly.save(tmp_path / "p.safetensors")
    finally:
        poly.provenance = before


@pytest.mark.parametrize("extra", [{"backend": "cuda"}, {"weight_dtype": "float16"}, {"backend": "cpu", "foo": 1}])
def test_load_refuses_unknown_constructor_arguments(tmp_path, fitted, extra):
    poly, H, _ = fitted
    path = tmp_path / "extra.safetensors"
    header = {"type": "polytope", "format_version": 3, "config": {**poly.config(), **extra}, "provenance": {}}
    save_tensors(path, poly.state_dict(), header)
    with pytest.raises(CorruptFileError, match=r"unknown constructor arguments " + repr(sorted(extra)).replace(
            "[", r"\[").replace("]", r"\]") + r".*re-create it with .save\(\)"):
        sf.ConstraintSet.load(path)
    save_tensors(path, poly.state_dict(), {**header, "config": poly.config()})
    assert torch.equal(sf.ConstraintSet.load(path).score(H), poly.score(H))


# --- steerers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("steerer", [sf.SafeFlowSteerer(margin=0.0), sf.ProjectionSteerer(margin=0.0)])
def test_steer_checks_its_input(fitted, steerer):
    poly, H, _ = fitted
    with pytest.raises(DataError, match="hidden must be a torch.Tensor, got list"):
        steerer.steer(H.tolist(), poly)
    with pytest.raises(DataError, match="hidden is on the meta device"):
        steerer.steer(H.to("meta"), poly)
    with pytest.raises(DataError, match=r"hidden is torch.int64; pass real floating-point values"):
        steerer.steer(H.long(), poly)
    with pytest.raises(DataError, match=r"do not match the constraint set's input size 16"):
        steerer.steer(H[:, :8], poly)
    result = steerer.steer(H[:4].double(), poly)  # another float dtype is converted, as before
    assert result.hidden.shape == (4, 16) and result.hidden.dtype == torch.float64


# --- tuning -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    tok = make_tokenizer()
    return make_model("llama", vocab_size=len(tok), layers=2).eval(), tok


def _tuning_set(dim):
    H, y = separable(96, dim)
    return sf.PolytopeConstraints(dim, 4, 32).fit(H, y, epochs=2, progress=False)


def test_tuning_refuses_another_hidden_size(tiny_model):
    model, tok = tiny_model
    wide = _tuning_set(2 * HIDDEN)
    steerer = sf.ProjectionSteerer(margin=0.0, solver="native")
    for call in (lambda: refusal_nll(model, tok, wide, steerer, ["how do i make a bomb"], 1),
                 lambda: tune_thresholds(model, tok, wide, steerer, ["how do i make a bomb"], 1, steps=1)):
        with pytest.raises(ConfigError, match=f"takes {2 * HIDDEN}-d hidden states but the model's hidden size is "
                                              f"{HIDDEN}; use a constraint set trained on this model's layer 1"):
            call()


def test_tuning_refuses_another_model_or_layer(tiny_model):
    model, tok = tiny_model
    poly = _tuning_set(HIDDEN)
    steerer = sf.ProjectionSteerer(margin=0.0, solver="native")
    prompts = ["how do i make a bomb"]
    poly.provenance.update(model="other", fingerprint={"model_type": "gpt2", "hidden_size": HIDDEN}, layer=1)
    with pytest.raises(ConfigError, match="trained on model 'other'.*use the model it was trained on.*"
                                          "check_provenance=False"):
        refusal_nll(model, tok, poly, steerer, prompts, 1)
    poly.provenance["fingerprint"] = fingerprint(model)
    with pytest.raises(ConfigError, match="trained on layer 1 of 'other' but layer 0 was asked for"):
        tune_thresholds(model, tok, poly, steerer, prompts, 0, steps=1)
    with pytest.raises(ConfigError, match="trained on layer 1 .* but layer 0"):
        refusal_nll(model, tok, poly, steerer, prompts, -2)  # -2 is block 0 of this 2-block model
    loss = refusal_nll(model, tok, poly, steerer, prompts, -1)  # block 1: matches
    assert torch.isfinite(loss)
    assert torch.isfinite(refusal_nll(model, tok, poly, steerer, prompts, 0, check_provenance=False))
