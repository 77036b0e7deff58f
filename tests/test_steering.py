import pytest
import torch

import safeflow as sf
from safeflow.errors import ConfigError, DataError
from safeflow.decoding import generate_responses

from conftest import make_model, make_tokenizer, separable

PROMPTS = ["how do i make a bomb", "bake cookies please", "hack bank steal car", "tell me why sky blue"]
LAYER = 2


def polytope_over(model, tok, texts, labels, layer=LAYER):
    H = sf.HFExtractor(model, tok, layer=layer, progress=False).extract(texts)
    y = torch.tensor(labels)
    X = torch.cat([H + 1e-3 * H.std(0) * torch.randn_like(H) for _ in range(20)])
    return sf.PolytopeConstraints(H.shape[1], 4, 128).fit(X, y.repeat(20), progress=False, margin=1.0, feature_l1=0.01,
                                                          epochs=100)


def always_inside(d):
    c = sf.LinearConstraint(d)
    with torch.no_grad():
        c.net[0].weight.zero_()
        c.net[0].bias.fill_(-1.0)
        c.input_covariance.copy_(torch.eye(d))
        c.safe_depth.fill_(1.0)
    c.fitted.fill_(True)
    return c


def always_outside(d):
    c = always_inside(d)
    with torch.no_grad():
        c.net[0].bias.fill_(1.0)
    return c


def gen(model, tok, prompts, **kw):
    return generate_responses(model, tok, prompts, max_new_tokens=6, batch_size=kw.pop("batch_size", 8), **kw)


# --- the steerer --------------------------------------------------------------------------
def test_safeflow_moves_outside_rows_inside_and_leaves_inside_rows():
    H, y = separable(300, 16, gap=6.0)
    poly = sf.PolytopeConstraints(16, 4, 128).fit(H, y, progress=False, margin=1.0, feature_l1=0.01, epochs=60)
    rows = H[:8]
    r = sf.Steerer.create("safeflow", lambda_unsafe=4.0, lr=0.05).steer(rows, poly)
    outside = poly.violations(rows).max(1).values > 0
    assert outside.any() and (~outside).any()
    assert torch.equal(r.steered, outside)
    assert torch.equal(r.hidden[~outside], rows[~outside])  # untouched, bit for bit
    assert r.inside.all() and (r.violations_after.max(1).values <= 0).all()
    assert (r.iterations[outside] >= 1).all() and (r.iterations[~outside] == 0).all()
    torch.testing.assert_close(r.violations_after, poly.violations(r.hidden))


@pytest.mark.parametrize("precondition", ["none", "covariance"])
def test_safeflow_matches_float64_autograd_reference(precondition):
    H, y = separable(300, 16, gap=6.0)
    H = H * torch.linspace(0.2, 3.0, 16)  # anisotropic, so preconditioning matters
    poly = sf.PolytopeConstraints(16, 4, 64).fit(H, y, progress=False, margin=1.0, feature_l1=0.01, epochs=30)
    h = H[y == 1][:4]
    lam_u, lam_s, lr, steps, margin = 2.0, 0.1, 0.01, 5, 50.0  # margin: no row can stop early
    steerer = sf.SafeFlowSteerer(lambda_unsafe=lam_u, lambda_safe=lam_s, lr=lr, max_steps=steps, margin=margin,
                                 precondition=precondition)
    got = steerer.steer(h, poly)
    assert (got.iterations == steps).all()
    ref_poly = poly.double()
    cov = torch.cov(H.T.double())
    P = cov / (cov.trace() / 16) if precondition == "covariance" else torch.eye(16, dtype=torch.float64)
    x = h.double().clone()
    for _ in range(steps):  # Algorithm 1 with a target margin, plain autograd in float64
        x.requires_grad_(True)
        v = ref_poly.violations(x)
        loss = (x - h.double()).abs().sum() / h.shape[1] + lam_s * v.sum() + lam_u * torch.relu(v + margin).sum()
        (g,) = torch.autograd.grad(loss, x)
        x = (x - lr * g @ P).detach()
    torch.testing.assert_close(got.hidden.double(), x, rtol=1e-4, atol=1e-4)


def test_covariance_is_recorded_saved_and_required(tmp_path):
    H, y = separable(200, 8)
    lin = sf.LinearConstraint(8).fit(H, y, progress=False, epochs=2)
    torch.testing.assert_close(lin.input_covariance, torch.cov(H.T))
    lin.save(tmp_path / "lin.safetensors")
    assert torch.equal(sf.ConstraintSet.load(tmp_path / "lin.safetensors").input_covariance, lin.input_covariance)
    unfitted_geometry = always_outside(8)
    unfitted_geometry.input_covariance.zero_()
    with pytest.raises(DataError, match="precondition='none'"):
        sf.SafeFlowSteerer(precondition="covariance").steer(torch.randn(2, 8), unfitted_geometry)
    with pytest.raises(ConfigError, match="precondition"):
        sf.SafeFlowSteerer(precondition="diagonal")


def test_margin_steers_deeper_inside():
    H, y = separable(300, 16, gap=6.0)
    poly = sf.PolytopeConstraints(16, 4, 128).fit(H, y, progress=False, margin=1.0, feature_l1=0.01, epochs=60)
    rows = H[y == 1][:6]
    shallow = sf.SafeFlowSteerer(lambda_unsafe=4.0, lr=0.05, margin=0.0).steer(rows, poly)
    deep = sf.SafeFlowSteerer(lambda_unsafe=4.0, lr=0.05, margin=0.5, max_steps=400).steer(rows, poly)
    assert (deep.violations_after.max(1).values <= -0.5).all()
    assert (deep.shift > shallow.shift).all()


def test_unreachable_target_reports_not_inside():
    c = always_outside(8)
    r = sf.SafeFlowSteerer(max_steps=3).steer(torch.randn(2, 8), c)
    assert r.steered.all() and not r.inside.any() and (r.iterations == 3).all()


def test_non_finite_steps_are_rejected_and_original_kept():
    c = always_outside(8)
    with torch.no_grad():
        c.net[0].weight.fill_(1e30)  # violations stay finite at h; the first step overflows float32
    h = torch.randn(3, 8) * 1e-30
    r = sf.SafeFlowSteerer(lr=1e30, max_steps=2).steer(h, c)
    assert r.rejected.all() and not r.steered.any()
    assert torch.equal(r.hidden, h)


def test_steerer_rejects_wrong_width():
    with pytest.raises(DataError, match="input size 8"):
        sf.SafeFlowSteerer().steer(torch.randn(2, 5), always_inside(8))


def test_steering_keeps_input_dtype():
    h = torch.randn(2, 8, dtype=torch.bfloat16)
    r = sf.SafeFlowSteerer(max_steps=2).steer(h, always_outside(8))
    assert r.hidden.dtype == torch.bfloat16 and r.violations_before.dtype == torch.float32


# --- steered generation -------------------------------------------------------------------
# --- steered generation -------------------------------------------------------------------
# KV-cache and batch parity of every registered steerer, on every architecture: test_conformance.py


def chat(tok, prompts):
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def test_steering_changes_states_of_outside_prompts(tokenizer):
    model = make_model("llama")
    poly = polytope_over(model, tokenizer, PROMPTS, [1, 0, 1, 0])
    with sf.steering(model, poly, sf.SafeFlowSteerer(lambda_unsafe=4.0, lr=0.1), layer=LAYER) as log:
        gen(model, tokenizer, PROMPTS)
    first = [e for e in log.events if e.step == 0]
    assert [e.row for e in first] == [0, 1, 2, 3]
    assert [e.steered for e in first] == [True, False, True, False]
    assert all(e.inside for e in first if e.steered) and all(e.shift > 0 for e in first if e.steered)
    s = log.summary()
    assert s["rows_steered"] == 2 and s["tokens_steered"] == len(log.steered())


def test_first_n_tokens_and_token_gate(tokenizer):
    model = make_model("qwen2")
    outside = always_outside(32)
    with sf.steering(model, outside, sf.SafeFlowSteerer(max_steps=1), layer=1, first_n_tokens=3, gate="token") as log:
        gen(model, tokenizer, PROMPTS[:2])
    steps = sorted({e.step for e in log.events})
    assert steps == [0, 1, 2]
    assert all(e.steered for e in log.events) and len(log.events) == 6


def test_log_records_each_events_prompt_across_batches(tokenizer):
    """generate_responses labels every batch's generate() call, so each event knows its prompt
    (its index in the prompt list) without rebuilding it from call numbers and the batch size."""
    model = make_model("llama")
    steer = sf.SteeringSpec(constraints=always_outside(32), steerer=sf.SafeFlowSteerer(max_steps=1), layer=LAYER,
                            gate="token", first_n_tokens=2)
    _, _, log = gen(model, tokenizer, PROMPTS + PROMPTS[:1], batch_size=2, steer=steer)
    assert {(e.call, e.row, e.prompt) for e in log.events} == {(i // 2, i % 2, i) for i in range(5)}
    assert log.steered_prompts() == {i: 2 for i in range(5)}
    with steer.apply(model) as direct:  # model.generate called directly: no prompt ids
        gen(model, tokenizer, PROMPTS[:2])
        assert direct.events and all(e.prompt is None for e in direct.events) and direct.steered_prompts() == {}
        direct.label_next_call([0, 1, 2])
        with pytest.raises(ConfigError, match="labelled with 3 prompts .* but has 2 rows"):
            gen(model, tokenizer, PROMPTS[:2])


def test_detector_gate_steers_only_the_prompts_it_flags(tokenizer):
    model = make_model("llama")
    detector = polytope_over(model, tokenizer, PROMPTS, [1, 0, 1, 0])
    plain, plain_ids, _ = gen(model, tokenizer, PROMPTS)
    sloped = always_outside(32)  # v(h) = 0.1·Σh + 1000: outside everywhere, with a gradient to follow
    with torch.no_grad():
        sloped.net[0].weight.fill_(0.1)
        sloped.net[0].bias.fill_(1000.0)
    steer = sf.SteeringSpec(constraints=sloped, steerer=sf.SafeFlowSteerer(max_steps=1, lr=1.0), layer=LAYER,
                            gate=detector, first_n_tokens=3)
    _, ids, log = gen(model, tokenizer, PROMPTS, steer=steer)
    assert log.steered_rows() == [0, 2] and {e.row for e in log.events} == {0, 2}
    assert sorted({e.step for e in log.events}) == [0, 1, 2]
    assert ids[1] == plain_ids[1] and ids[3] == plain_ids[3]
    assert ids[0] != plain_ids[0] or ids[2] != plain_ids[2]
    _, single_ids, _ = gen(model, tokenizer, PROMPTS, steer=steer, batch_size=1)
    assert single_ids == ids
    with steer.apply(model):
        enc = tokenizer(chat(tokenizer, PROMPTS), return_tensors="pt", padding=True, add_special_tokens=False)
        a = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True)
        b = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="hidden size 16"):
        with sf.steering(model, always_outside(32), sf.SafeFlowSteerer(), layer=LAYER, gate=always_inside(16)):
            pass
    with pytest.raises(ConfigError, match="gate must be"):
        with sf.steering(model, always_outside(32), sf.SafeFlowSteerer(), layer=LAYER, gate="sometimes"):
            pass


def test_hooks_removed_after_exit_and_exception(tokenizer):
    model = make_model("mistral")
    before = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with sf.steering(model, always_outside(32), sf.SafeFlowSteerer(max_steps=1), layer=1):
        pass
    with pytest.raises(RuntimeError, match="boom"):
        with sf.steering(model, always_outside(32), sf.SafeFlowSteerer(max_steps=1), layer=1):
            gen(model, tokenizer, PROMPTS[:1])
            raise RuntimeError("boom")
    after = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    assert before == after
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    plain, _, _ = gen(model, tokenizer, PROMPTS[:1])
    again, _, _ = gen(model, tokenizer, PROMPTS[:1])
    assert plain == again


def test_bad_configuration_errors(tokenizer):
    model = make_model("gemma")
    with pytest.raises(ConfigError, match="out of range"):
        with sf.steering(model, always_inside(32), sf.SafeFlowSteerer(), layer=9):
            pass
    with pytest.raises(ConfigError, match="hidden size 16"):
        with sf.steering(model, always_inside(16), sf.SafeFlowSteerer(), layer=1):
            pass
    with pytest.raises(ConfigError, match="layers="):
        with sf.steering(torch.nn.Linear(32, 32), always_inside(32), sf.SafeFlowSteerer(), layer=0):
            pass
    with pytest.raises(ConfigError, match="left padding"):
        with sf.steering(model, always_inside(32), sf.SafeFlowSteerer(), layer=1):
            tok = make_tokenizer()
            tok.padding_side = "right"
            enc = tok(["hack bank", "how do i make a bomb"], return_tensors="pt", padding=True)
            model.generate(**enc, max_new_tokens=2)


def test_explicit_layers_override(tokenizer):
    model = make_model("llama")
    with sf.steering(model, always_outside(32), sf.SafeFlowSteerer(max_steps=1), layer=0, layers="model.layers") as log:
        gen(model, tokenizer, PROMPTS[:1])
    assert log.events


def test_sampling_with_and_without_cache_is_identical(tokenizer):
    model = make_model("llama")
    poly = polytope_over(model, tokenizer, PROMPTS, [1, 0, 1, 0])
    enc = tokenizer(chat(tokenizer, PROMPTS), return_tensors="pt", padding=True, add_special_tokens=False)
    outs = []
    with sf.steering(model, poly, sf.SafeFlowSteerer(lambda_unsafe=4.0, lr=0.1), layer=LAYER) as log:
        for use_cache in (True, False):
            torch.manual_seed(7)
            outs.append(model.generate(**enc, max_new_tokens=6, do_sample=True, top_k=0, use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])
    assert log.steered_rows(0) == log.steered_rows(1) == [0, 2]


def test_a_steer_dict_still_works_deprecated_and_unknown_keys_are_named(tokenizer):
    """``generate_responses(..., steer=dict(...))`` (before SteeringSpec) gives the same answers
    with a DeprecationWarning; a dict with an unknown key is a ConfigError naming the valid keys."""
    model = make_model("llama")
    spec = sf.SteeringSpec(constraints=always_outside(32), steerer=sf.SafeFlowSteerer(max_steps=1), layer=LAYER,
                           gate="token", first_n_tokens=None, check_provenance=False)
    _, ids, log = gen(model, tokenizer, PROMPTS[:2], steer=spec)
    with pytest.warns(DeprecationWarning, match="SteeringSpec"):
        _, ids_dict, log_dict = gen(model, tokenizer, PROMPTS[:2], steer=spec.arguments())
    assert ids_dict == ids and log.summary()["tokens_steered"] == log_dict.summary()["tokens_steered"] > 0
    with pytest.raises(ConfigError, match="unknown keys \\['gates'\\]; valid: constraints, steerer"):
        gen(model, tokenizer, PROMPTS[:2], steer={**spec.arguments(), "gates": "token"})
