"""The projection steerer: the dual QP solvers against direct cvxpy solves, KKT, gradients,
the steerer's certificate and bad input, and steered generation on tiny models."""

import numpy as np
import pytest
import torch

import safeflow as sf
from safeflow.constraints.base import ConstraintSet
from safeflow.errors import ConfigError, DataError
from safeflow.steerers.dual_qp import Status, _NativeDual, active_set, solve_dual
from safeflow.steerers.projection import affine_at

from conftest import make_model, separable
from test_steering import LAYER, PROMPTS, gen, polytope_over

cp = pytest.importorskip("cvxpy", reason="cvxpy is a core dependency; the reference solves need it")
pytest.importorskip("cvxpylayers", reason="cvxpylayers is a core dependency (the default projection solver)")
SOLVERS = ("native", "cvxpylayers")


def problem(B=5, K=6, d=12, seed=0, duplicate=False):
    """Random linear constraints with h0 outside some of them (float64)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, K, d, generator=g, dtype=torch.float64)
    if duplicate:  # linearly dependent facets: A M Aᵀ singular, still feasible
        A[:, -1] = A[:, 0]
    c = torch.randn(B, K, generator=g, dtype=torch.float64)
    h0 = 3 * torch.randn(B, d, generator=g, dtype=torch.float64)
    X = torch.randn(4 * d, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    return h0, A, c, torch.cov(X.T)


def primal(h0, A, c, margin, M):
    """min ½ (h − h0)ᵀ M⁻¹ (h − h0) s.t. A h <= c − m, solved directly by cvxpy (Clarabel, tight)."""
    h = cp.Variable(h0.shape[0])
    Minv = np.linalg.inv(M.numpy()) if M is not None else np.eye(h0.shape[0])
    Minv = (Minv + Minv.T) / 2
    cp.Problem(cp.Minimize(0.5 * cp.quad_form(h - h0.numpy(), cp.psd_wrap(Minv))),
               [A.numpy() @ h <= c.numpy() - margin]).solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12,
                                                              tol_feas=1e-12)
    return torch.from_numpy(h.value)


# --- the functional projection -------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("metric", ["euclidean", "covariance"])
@pytest.mark.parametrize("shape", [dict(K=6, d=12), dict(K=1, d=8), dict(K=20, d=24), dict(K=6, d=12, duplicate=True)])
def test_both_solvers_match_a_direct_primal_solve(solver, metric, shape):
    h0, A, c, cov = problem(**shape)
    M = cov if metric == "covariance" else None
    p = sf.project(h0, A, c, margin=0.5, metric=M, solver=solver)
    assert (p.status == Status.OK).all()
    for i in range(len(h0)):
        ref = primal(h0[i], A[i], c[i], 0.5, M)
        edit = max(float((ref - h0[i]).norm()), 1e-12)
        assert float((p.hidden[i] - ref).norm()) <= 1e-5 * max(edit, 1.0), (i, edit)


@pytest.mark.parametrize("solver", SOLVERS)
def test_kkt_conditions_hold(solver):
    h0, A, c, M = problem(B=8, K=10, d=16, seed=3)
    p = sf.project(h0, A, c, margin=0.25, metric=M, solver=solver)
    lam = p.multipliers
    slack = (A @ p.hidden[..., None])[..., 0] - c + 0.25  # <= 0
    scale = float(c.abs().max() + 1)
    assert (lam >= 0).all()
    assert slack.max() <= 1e-7 * scale
    assert (lam * slack).abs().max() <= 1e-6 * scale  # complementary slackness
    torch.testing.assert_close(p.hidden, h0 - (lam[:, None, :] @ A @ M)[:, 0])  # stationarity: h* = h0 − M Aᵀ λ
    assert ((lam > 0).sum(1) >= 1).all() and ((lam == 0).sum(1) >= 1).any()  # active and inactive facets occur


@pytest.mark.parametrize("pdas_steps", [8, 0], ids=["pdas", "lawson-hanson"])
def test_active_set_is_the_exact_dual_minimiser(pdas_steps):
    h0, A, c, _ = problem(B=6, K=14, d=40, seed=5)
    Q, r = A @ A.mT, (A @ h0[..., None])[..., 0] - c
    lam, ok = active_set(Q, r, pdas_steps=pdas_steps)
    assert ok.all()
    for i in range(6):
        x = cp.Variable(14)
        cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(Q[i].numpy())) - r[i].numpy() @ x), [x >= 0]).solve(
            solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        torch.testing.assert_close(lam[i], torch.from_numpy(x.value), rtol=1e-6, atol=1e-8)


def test_rows_already_deep_enough_come_back_bit_for_bit():
    h0, A, c, M = problem(B=4, K=5, d=10, seed=1)
    c = c + (A @ h0[..., None])[..., 0].abs() + 10  # every row satisfies A h0 <= c − 1
    for solver in SOLVERS:
        p = sf.project(h0.float(), A, c, margin=1.0, metric=M, solver=solver)
        assert torch.equal(p.hidden, h0.float()) and (p.multipliers == 0).all()


def test_native_backward_passes_gradcheck():
    h0, A, c, M = problem(B=3, K=5, d=9, seed=2)
    S = torch.linalg.cholesky(M).requires_grad_()
    args = (h0.requires_grad_(), A.requires_grad_(), c.requires_grad_(), S)
    f = lambda h0, A, c, S: sf.project(h0, A, c, margin=0.5, metric=S @ S.T, solver="native").hidden  # noqa: E731
    assert torch.autograd.gradcheck(f, args)
    Bm = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda Bm, r: _NativeDual.apply(Bm @ Bm.mT, r)[0], (Bm, r))


def test_cvxpylayers_and_native_gradients_agree():
    h0, A, c, M = problem(B=4, K=6, d=12, seed=4)
    inputs = [t.clone().requires_grad_() for t in (h0, A, c, M)]
    w = torch.randn_like(h0)
    grads = []
    for solver in SOLVERS:
        out = sf.project(*inputs[:3], margin=0.5, metric=inputs[3], solver=solver).hidden
        grads.append(torch.autograd.grad((out * w).sum(), inputs))
    for native, layer in zip(*grads):
        assert native.abs().max() > 0
        torch.testing.assert_close(layer, native, rtol=1e-6, atol=1e-7 * float(native.abs().max()))


# --- bad input ------------------------------------------------------------------------------
def test_infeasible_nonfinite_and_failed_rows_keep_the_input():
    h0, A, c, _ = problem(B=3, K=2, d=6, seed=6)
    A[0, 1] = -A[0, 0]  # a·h <= c0 and a·h >= 1 + c0 + ...: contradictory
    c[0, 1] = -c[0, 0] - 1.0
    h0[2, 0] = torch.nan
    for solver in SOLVERS:
        p = sf.project(h0, A, c, margin=0.0, solver=solver)
        # the ridge keeps the dual bounded (λ ~ 1/ε): native solves it and the residual shows the
        # infeasibility; SCS inside cvxpylayers gives up on it
        infeasible = Status.INFEASIBLE if solver == "native" else Status.SOLVER_FAILED
        assert p.status.tolist() == [infeasible, Status.OK, Status.NONFINITE]
        assert torch.equal(p.hidden[0], h0[0]) and torch.isnan(p.hidden[2, 0]) and (p.multipliers[[0, 2]] == 0).all()
    # a real solver failure: SCS (inside cvxpylayers) cannot handle this scaling; native solves it exactly
    Q = torch.diag(torch.tensor([1e-20, 1.0, 1.0], dtype=torch.float64))[None]
    r = torch.tensor([[1e20, 1e12, -1.0]], dtype=torch.float64)
    lam, status = solve_dual(Q, r, "cvxpylayers")
    assert status.tolist() == [Status.SOLVER_FAILED] and (lam == 0).all()
    lam, status = solve_dual(Q, r, "native")
    assert status.tolist() == [Status.OK] and torch.allclose(lam, torch.tensor([[1e40, 1e12, 0.0]], dtype=torch.float64))
    with pytest.raises(ConfigError, match="solver"):
        solve_dual(Q, r, "gurobi")


class Contradictory(ConstraintSet):
    """v(h) = (a·h + 1, −a·h + 1): no h satisfies both (their sum is 2)."""

    num_constraints = 2

    def __init__(self, input_dim: int) -> None:
        super().__init__(input_dim)
        self.a = torch.nn.Parameter(torch.ones(input_dim))
        self.fitted.fill_(True)

    def violations(self, H):
        return torch.stack([H @ self.a + 1, -(H @ self.a) + 1], dim=1)

    def fit(self, H, y, **options):
        return self

    def config(self):
        return {"input_dim": self.input_dim}


@pytest.mark.parametrize("solver", SOLVERS)
def test_steerer_rejects_what_it_cannot_project_and_never_raises(solver):
    h = torch.randn(3, 8)
    r = sf.ProjectionSteerer(solver=solver, margin=0.0, metric="euclidean").steer(h, Contradictory(8))
    assert r.rejected.all() and not r.steered.any() and not r.inside.any()
    assert torch.equal(r.hidden, h)
    H, y = separable(200, 8, gap=6.0)
    poly = sf.PolytopeConstraints(8, 3, 64).fit(H, y, progress=False, margin=1.0, feature_l1=0.01, epochs=30)
    rows = H[y == 1][:3].clone()
    rows[1] = torch.nan
    r = sf.ProjectionSteerer(solver=solver, margin=0.1).steer(rows, poly)
    assert r.nonfinite.tolist() == [False, True, False] and not r.rejected.any()
    assert r.inside.tolist() == [True, False, True] and r.steered.tolist() == [True, False, True]
    assert torch.isnan(r.hidden[1]).all()


def test_configuration_errors():
    with pytest.raises(ConfigError, match="metric"):
        sf.ProjectionSteerer(metric="manhattan")
    with pytest.raises(ConfigError, match="solver"):
        sf.ProjectionSteerer(solver="gurobi")
    with pytest.raises(ConfigError, match="margin"):
        sf.ProjectionSteerer(margin=-1.0)
    with pytest.raises(DataError, match="A \\[B, K, d\\]"):
        sf.project(torch.zeros(2, 3), torch.zeros(2, 4, 5), torch.zeros(2, 4))
    assert "projection" in sf.available()["steerer"]
    with pytest.raises(ConfigError, match="exactly one"):
        sf.ProjectionSteerer(margin=1.0, depth=1.0)
    with pytest.raises(ConfigError, match="max_rounds"):
        sf.ProjectionSteerer(max_rounds=0)
    s = sf.Steerer.create("projection", preset="qwen2-1.5b")
    assert (s.metric, s.depth, s.margin, s.solver) == ("euclidean", 0.0, None, "cvxpylayers")
    s = sf.Steerer.create("projection")
    assert (s.metric, s.depth, s.margin) == ("covariance", sf.presets.preset("default").settings["projection"].depth, None)


# --- the steerer ------------------------------------------------------------------------------
def fitted_polytope(d=16, K=4):
    H, y = separable(300, d, gap=6.0)
    H = H * torch.linspace(0.3, 2.0, d)
    return H, y, sf.PolytopeConstraints(d, K, 128).fit(H, y, progress=False, margin=1.0, feature_l1=0.01, epochs=60)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("metric", ["euclidean", "covariance"])
def test_steered_rows_end_inside_and_inside_rows_are_untouched(solver, metric):
    H, y, poly = fitted_polytope()
    rows = H[:40]
    r = sf.ProjectionSteerer(solver=solver, metric=metric, margin=0.5).steer(rows, poly)
    outside = poly.violations(rows).max(1).values > 0
    assert outside.sum() >= 10 and (~outside).sum() >= 10
    assert torch.equal(r.steered, outside) and not r.rejected.any()
    assert torch.equal(r.hidden[~outside], rows[~outside])
    after = poly.violations(r.hidden)
    torch.testing.assert_close(r.violations_after, after)
    assert torch.equal(r.inside, after.max(1).values <= 0)
    assert r.inside.all() and (after[outside].max(1).values <= -0.5).all()  # reached the target depth
    assert (r.iterations[outside] >= 1).all() and (r.iterations[~outside] == 0).all()


def test_one_round_reports_rows_it_could_not_finish():
    H, y, poly = fitted_polytope()
    rows = H[:40]
    one = sf.ProjectionSteerer(solver="native", metric="euclidean", margin=0.5, max_rounds=1).steer(rows, poly)
    torch.testing.assert_close(one.violations_after, poly.violations(one.hidden))
    assert torch.equal(one.inside, one.violations_after.max(1).values <= 0)
    assert (one.iterations <= 1).all()
    assert (~one.inside[one.steered]).any()  # one linear model does not finish every row: hence the rounds
    full = sf.ProjectionSteerer(solver="native", metric="euclidean", margin=0.5).steer(rows, poly)
    assert full.inside.all() and (full.violations_after[full.steered].max(1).values <= -0.5).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_batched_equals_row_by_row_and_the_solvers_agree(solver):
    H, y, poly = fitted_polytope()
    rows = H[y == 1][:12]
    steerer = sf.ProjectionSteerer(solver=solver, metric="covariance", margin=0.3)
    batched = steerer.steer(rows, poly)
    single = [steerer.steer(rows[i : i + 1], poly) for i in range(len(rows))]
    torch.testing.assert_close(batched.hidden, torch.cat([s.hidden for s in single]), rtol=1e-5, atol=1e-5)
    assert torch.equal(batched.iterations, torch.cat([s.iterations for s in single]))
    assert torch.equal(batched.inside, torch.cat([s.inside for s in single]))
    other = sf.ProjectionSteerer(solver="native" if solver == "cvxpylayers" else "cvxpylayers", metric="covariance",
                                 margin=0.3).steer(rows, poly)
    torch.testing.assert_close(other.hidden, batched.hidden, rtol=1e-5, atol=1e-4)


def test_single_constraint_and_a_smaller_edit_than_safeflow():
    H, y = separable(300, 16, gap=6.0)
    lin = sf.LinearConstraint(16).fit(H, y, progress=False, epochs=20)  # K = 1, autograd local_affine
    rows = H[lin.predict(H) == 1][:8]
    r = sf.ProjectionSteerer(solver="native", metric="euclidean", margin=0.0).steer(rows, lin)
    assert r.steered.all() and r.inside.all()
    # the Euclidean projection onto one hyperplane: h0 − (v(h0) + slack) a / ‖a‖²
    a, v = lin.net[0].weight[0].detach(), lin.violations(rows)[:, 0].detach()
    torch.testing.assert_close(r.shift, v / a.norm(), rtol=1e-3, atol=1e-4)
    s = sf.SafeFlowSteerer(lambda_unsafe=4.0, lr=0.05, precondition="none").steer(rows, lin)
    assert s.inside.all() and (r.shift <= s.shift).all()


def test_affine_at_is_differentiable_in_the_parameters_and_matches_local_affine():
    H, y, poly = fitted_polytope(d=8, K=3)
    A, c = affine_at(poly, H[:5])
    assert A.requires_grad and c.requires_grad
    A0, c0 = poly.local_affine(H[:5])
    torch.testing.assert_close(A.detach(), A0)
    torch.testing.assert_close(c.detach(), c0, rtol=1e-5, atol=1e-4)
    (g,) = torch.autograd.grad(c.sum(), poly.thresholds)
    torch.testing.assert_close(g, torch.full_like(g, 5.0))  # c = ξ − Φ D b: ∂Σc/∂ξ_k = N
    with torch.no_grad():
        assert not affine_at(poly, H[:5])[0].requires_grad


# --- steered generation ------------------------------------------------------------------------
def test_projection_generation_ends_inside(tokenizer):
    """(KV-cache and batch parity on every architecture: test_conformance.py.)"""
    model = make_model("llama")
    poly = polytope_over(model, tokenizer, PROMPTS, [1, 0, 1, 0])
    # Euclidean: these polytopes are fitted on 4 prompts, so their covariance has rank ~3 and the
    # covariance metric cannot reach the inside (the steerer reports such rows as rejected)
    steer = sf.SteeringSpec(constraints=poly, layer=LAYER,
                            steerer=sf.ProjectionSteerer(solver="native", metric="euclidean", margin=0.5))
    _, _, log = gen(model, tokenizer, PROMPTS, steer=steer)
    assert log.steered_rows() == [0, 2]
    assert all(e.inside for e in log.steered()) and log.summary()["rejected"] == 0


def test_projection_generation_with_the_default_solver_and_a_gate(tokenizer):
    model = make_model("llama")
    detector = polytope_over(model, tokenizer, PROMPTS, [1, 0, 1, 0])
    steerer = sf.Steerer.create("projection", metric="euclidean", margin=0.5)
    steer = sf.SteeringSpec(constraints=detector, steerer=steerer, layer=LAYER, gate=detector)
    _, ids, log = gen(model, tokenizer, PROMPTS, steer=steer)
    _, single_ids, _ = gen(model, tokenizer, PROMPTS, steer=steer, batch_size=1)
    assert log.steered_rows() == [0, 2] and single_ids == ids
    assert all(e.inside for e in log.steered())


@pytest.mark.parametrize("solver", SOLVERS)
def test_infeasible_constraints_in_generation_keep_the_states_and_say_so(solver, tokenizer):
    model = make_model("gemma")
    plain, plain_ids, _ = gen(model, tokenizer, PROMPTS[:2])
    steer = sf.SteeringSpec(constraints=Contradictory(32), layer=LAYER, gate="token", first_n_tokens=3,
                            steerer=sf.ProjectionSteerer(solver=solver, metric="euclidean", margin=0.0))
    _, ids, log = gen(model, tokenizer, PROMPTS[:2], steer=steer)
    assert ids == plain_ids and not log.steered()
    assert log.summary()["rejected"] == len(log.events) == 6 and not any(e.inside for e in log.events)


def test_cli_generate_with_the_projection_steerer(tmp_path, tokenizer, capsys):
    from safeflow.cli import main

    model = make_model("llama", vocab_size=len(tokenizer), seed=4)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    polytope_over(model, tokenizer, PROMPTS, [1, 0, 1, 0]).save(tmp_path / "poly.safetensors")
    assert main(["generate", PROMPTS[0], "--model", str(tmp_path / "tiny"), "--layer", str(LAYER), "--steerer",
                 "projection", "--constraints", str(tmp_path / "poly.safetensors"), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "--- unsteered:" in out and '"checks"' in out


# --- gradients through the projection, end to end ------------------------------------------------
REFUSAL = "i help please"  # words of the tiny tokenizer


def test_refusal_nll_gradient_matches_finite_differences(tokenizer):
    from safeflow.tuning import refusal_nll

    model = make_model("gpt2")  # GPT-2 runs fully in float64 (Llama's RMSNorm computes in float32)
    poly = polytope_over(model, tokenizer, PROMPTS, [1, 0, 1, 0]).double()
    model.double()
    steerer = sf.ProjectionSteerer(solver="native", metric="euclidean", margin=0.5)
    prompts = [PROMPTS[0], PROMPTS[2]]
    loss = refusal_nll(model, tokenizer, poly, steerer, prompts, LAYER, refusal=REFUSAL)
    (grad,) = torch.autograd.grad(loss, poly.thresholds)
    assert grad.abs().max() > 0
    eps = 1e-5
    for k in range(poly.num_constraints):
        with torch.no_grad():
            poly.thresholds[k] += eps
            up = refusal_nll(model, tokenizer, poly, steerer, prompts, LAYER, refusal=REFUSAL)
            poly.thresholds[k] -= 2 * eps
            down = refusal_nll(model, tokenizer, poly, steerer, prompts, LAYER, refusal=REFUSAL)
            poly.thresholds[k] += eps
        assert abs(float(up - down) / (2 * eps) - float(grad[k])) <= 1e-6 * abs(float(grad[k])) + 1e-9


def test_tuning_thresholds_raises_the_refusal_likelihood(tokenizer):
    from safeflow.tuning import refusal_nll, tune_thresholds

    model = make_model("qwen2")
    poly = polytope_over(model, tokenizer, PROMPTS, [1, 0, 1, 0])
    steerer = sf.ProjectionSteerer(solver="native", metric="euclidean", margin=0.5)
    prompts = [PROMPTS[0], PROMPTS[2]]
    before = poly.thresholds.detach().clone()
    losses = tune_thresholds(model, tokenizer, poly, steerer, prompts, LAYER, refusal=REFUSAL, steps=15, lr=0.2)
    assert losses[-1] < losses[0] and not torch.equal(poly.thresholds.detach(), before)
    assert all(p.requires_grad for p in [*model.parameters(), *poly.parameters()])  # flags restored
    with torch.no_grad():
        assert float(refusal_nll(model, tokenizer, poly, steerer, prompts, LAYER, refusal=REFUSAL)) < losses[0]


# --- the compiled CPU projection (safeflow.kernels.project / projection_steer) ----------------------
COMPILED = pytest.mark.skipif("cpu" not in sf.kernels.available(), reason="the C++ kernel is not built here")


@COMPILED
@pytest.mark.parametrize("metric", ["euclidean", "covariance"])
@pytest.mark.parametrize("shape", [dict(K=6, d=12), dict(K=1, d=8), dict(K=20, d=24), dict(K=6, d=12, duplicate=True)])
def test_compiled_project_equals_the_eager_one(metric, shape):
    h0, A, c, cov = problem(**shape)
    M = cov if metric == "covariance" else None
    margin = torch.rand(len(h0), 1, dtype=torch.float64)
    fast = sf.project(h0, A, c, margin=margin, metric=M, backend="cpu")
    ref = sf.project(h0, A, c, margin=margin, metric=M, backend="torch")
    assert torch.equal(fast.status, ref.status)
    # float64 throughout; the two differ only in the order of their sums
    torch.testing.assert_close(fast.multipliers, ref.multipliers, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast.hidden, ref.hidden, rtol=1e-12, atol=1e-12)


@COMPILED
def test_compiled_project_reports_bad_rows_as_the_eager_one():
    h0, A, c, _ = problem(B=4, K=2, d=6, seed=6)
    A[0, 1] = -A[0, 0]  # contradictory
    c[0, 1] = -c[0, 0] - 1.0
    h0[2, 0] = torch.nan
    c[3] = (A[3] @ h0[3]).abs().max() + 10  # already deep enough: comes back bit for bit
    fast = sf.project(h0, A, c, margin=0.0, backend="cpu")
    ref = sf.project(h0, A, c, margin=0.0, backend="torch")
    assert fast.status.tolist() == ref.status.tolist() == [Status.INFEASIBLE, Status.OK, Status.NONFINITE, Status.OK]
    assert torch.equal(fast.hidden[[0, 3]], h0[[0, 3]]) and torch.isnan(fast.hidden[2, 0])
    assert (fast.multipliers[[0, 2, 3]] == 0).all()


@COMPILED
@pytest.mark.parametrize("metric", ["euclidean", "covariance"])
@pytest.mark.parametrize("case", ["margin 0.5", "margin 0.3 unsafe rows", "one round", "relative depth"])
def test_compiled_steer_makes_the_eager_steers_decisions(metric, case):
    """The compiled rounds against the eager ones on the problems of the tests above: the same rows
    steered, inside and rejected after the same number of rounds; the states equal up to float32
    rounding (the bisection judges each point by violations whose sums run in another order)."""
    H, y, poly = fitted_polytope()
    kw = dict(margin=0.3) if case.startswith("margin 0.3") else dict(margin=0.5)
    if case == "one round":
        kw["max_rounds"] = 1
    if case == "relative depth":
        poly.calibrate_depth(H[y == 0])
        kw = dict(depth=0.5)
    rows = H[y == 1][:12] if "unsafe" in case else H[:40]
    eager = sf.ProjectionSteerer(solver="native", metric=metric, backend="torch", **kw).steer(rows, poly)
    fast = sf.ProjectionSteerer(solver="native", metric=metric, **kw).steer(rows, poly)
    for field in ("steered", "inside", "rejected", "nonfinite", "iterations"):
        assert torch.equal(getattr(fast, field), getattr(eager, field)), field
    assert fast.steered.sum() >= 10
    torch.testing.assert_close(fast.hidden, eager.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.violations_after, poly.violations(fast.hidden))


@COMPILED
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_steer_with_the_rows_of_W_M_equals_multiplying_by_M(dtype):
    """With the cached rows of W M each round forms A M = Φ D (W M) over the active features; without
    them it multiplies A by M: the same decisions, the states equal up to the dtype's rounding."""
    H, y, poly = fitted_polytope()
    poly, rows = poly.to(dtype), H[:40].to(dtype)
    steerer = sf.ProjectionSteerer(solver="native", metric="covariance", margin=0.5)
    W, b, Phi, xi = (t.detach() for t in poly.kernel_operands())
    M, m = steerer.metric_matrix(poly), steerer.target(poly)
    rows = rows[poly.violations(rows).amax(1) > 0]
    kw = dict(M=M, margin=m, max_rounds=steerer.max_rounds, ramp_rounds=steerer.ramp_rounds, backend="cpu")
    by_rows = sf.kernels.projection_steer(rows, W, b, Phi, xi, WM=sf.kernels.metric_rows(W, M, dtype), **kw)
    by_matrix = sf.kernels.projection_steer(rows, W, b, Phi, xi, **kw)
    assert len(rows) >= 10 and torch.isfinite(by_rows[0]).all()
    assert torch.equal(by_rows[1], by_matrix[1]) and torch.equal(by_rows[2], by_matrix[2])  # rounds, status
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(by_rows[0], by_matrix[0], rtol=tol, atol=tol)
    assert not torch.equal(sf.kernels.metric_rows(W, M, dtype), W)  # a real metric, not the identity


@COMPILED
def test_compiled_steer_in_float64_and_its_failures():
    H, y, poly = fitted_polytope()
    poly = poly.double()
    rows = H[:40].double()
    eager = sf.ProjectionSteerer(solver="native", metric="covariance", backend="torch", margin=0.5).steer(rows, poly)
    fast = sf.ProjectionSteerer(solver="native", metric="covariance", margin=0.5).steer(rows, poly)
    assert torch.equal(fast.iterations, eager.iterations) and torch.equal(fast.inside, eager.inside)
    torch.testing.assert_close(fast.hidden, eager.hidden, rtol=1e-10, atol=1e-10)
    # a metric that cannot reach the inside: rank 1, along a direction that none of the facets sees
    with torch.no_grad():
        poly.input_covariance.zero_()
        poly.input_covariance[0, 0] = 1.0
        poly.feature_map.weight[:, 0] = 0.0
    outside = rows[poly.violations(rows).amax(1) > 0][:5]
    for steerer in (sf.ProjectionSteerer(solver="native", metric="covariance", margin=0.5, backend=b) for b in ("torch", "cpu")):
        r = steerer.steer(outside, poly)
        assert r.rejected.all() and torch.equal(r.hidden, outside) and (r.iterations == 0).all()
