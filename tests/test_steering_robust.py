"""Steering under hostile conditions: NaN/inf hidden states from upstream, half-precision models
whose steered values overflow or round outside, inputs_embeds, bad arguments at context entry,
extraction inside a steering context."""

from contextlib import contextmanager

import pytest
import torch

import safeflow as sf
from safeflow.errors import ConfigError, DataError
from safeflow.layers import block_output, find_decoder_layers, replace_block_output
from safeflow.steering import steering_active

from conftest import make_model, separable
from test_steering import LAYER, PROMPTS, always_inside, always_outside, chat, gen, polytope_over


class Jump(sf.Steerer):
    """A steerer that sets coordinate 0 to ``value`` (unregistered; exercises the base contract)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def _move(self, h, constraints):
        out = h.clone()
        out[:, 0] = self.value
        return out, torch.ones(h.shape[0], dtype=torch.long)


def threshold_on_first_coordinate(d, threshold):
    """v(h) = h_0 − threshold: inside iff h_0 <= threshold."""
    c = always_inside(d)
    with torch.no_grad():
        c.net[0].weight.zero_()
        c.net[0].weight[0, 0] = 1.0
        c.net[0].bias.fill_(-threshold)
    return c


@contextmanager
def poisoned(model, layer, row, value=float("nan")):
    """Make block ``layer`` output ``value`` for batch row ``row`` (a broken upstream layer)."""
    def hook(_module, _inputs, output):
        hidden = block_output(output).clone()
        hidden[row] = value
        return replace_block_output(output, hidden)

    handle = find_decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --- the steerer's contract ----------------------------------------------------------------
def test_non_finite_rows_are_marked_and_left_untouched():
    H, y = separable(300, 8, gap=6.0)
    poly = sf.PolytopeConstraints(8, 3, 64).fit(H, y, progress=False, margin=1.0, feature_l1=0.01, epochs=40)
    rows = H[y == 1][:5].clone()
    rows[1, 2] = float("nan")
    rows[2, 0] = float("inf")
    rows[3, :] = float("-inf")
    r = sf.SafeFlowSteerer(lambda_unsafe=4.0, lr=0.05).steer(rows, poly)
    assert r.nonfinite.tolist() == [False, True, True, True, False]
    assert not r.steered[1:4].any() and not r.inside[1:4].any() and (r.shift[1:4] == 0).all()
    torch.testing.assert_close(r.hidden[1:4], rows[1:4], equal_nan=True)
    assert r.steered[0] and r.steered[4] and r.inside[[0, 4]].all()
    huge = always_inside(8)
    with torch.no_grad():
        huge.net[0].weight.fill_(1e30)
    h = torch.tensor([[1e10] * 8, [-1.0] * 8])  # finite rows; the first one's violation overflows to inf
    r = sf.SafeFlowSteerer().steer(h, huge)
    assert r.nonfinite.tolist() == [True, False] and not r.steered.any() and torch.equal(r.hidden, h)


def test_value_written_to_a_bfloat16_model_is_what_inside_describes():
    """float32 result 1.005 is inside v = h_0 − 1.006; bfloat16 rounds it to 1.0078: outside."""
    c = threshold_on_first_coordinate(4, 1.006)
    h = torch.tensor([[2.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    r = Jump(1.005).steer(h, c)
    assert r.steered.all() and not r.rejected.any()
    assert r.hidden[0, 0].item() == pytest.approx(1.0078125)
    assert not r.inside.any() and r.violations_after.item() == pytest.approx(1.0078125 - 1.006, abs=1e-6)
    torch.testing.assert_close(r.violations_after, c.violations(r.hidden.float()))
    assert Jump(1.0).steer(h, c).inside.all()  # exactly representable: inside after the cast too


@pytest.mark.parametrize("steerer", [Jump(1e5), sf.SafeFlowSteerer(lambda_unsafe=1.0, lr=1e5, max_steps=1)])
def test_result_overflowing_float16_is_rejected_not_written_as_inf(steerer):
    c = always_outside(4)
    with torch.no_grad():
        c.net[0].weight.fill_(1.0)
        c.net[0].bias.fill_(1e9)
    h = torch.randn(3, 4).half()
    r = steerer.steer(h, c)
    assert r.rejected.all() and not r.steered.any() and not r.inside.any()
    assert torch.equal(r.hidden, h) and torch.isfinite(r.hidden).all()
    assert torch.equal(r.violations_after, r.violations_before)


def test_float16_model_never_receives_inf_from_steering(tokenizer):
    model = make_model("llama").half()
    c = always_outside(32)
    with torch.no_grad():
        c.net[0].weight.fill_(1.0)
        c.net[0].bias.fill_(1e9)
    plain, plain_ids, _ = gen(model, tokenizer, PROMPTS[:2])
    _, ids, log = gen(model, tokenizer, PROMPTS[:2], steer=sf.SteeringSpec(
        constraints=c, steerer=sf.SafeFlowSteerer(lambda_unsafe=1.0, lr=1e5, max_steps=1), layer=LAYER, gate="token"))
    assert log.events and all(e.rejected and not e.steered for e in log.events)
    assert ids == plain_ids


# --- NaN from upstream during generate ------------------------------------------------------
@pytest.mark.parametrize("gate", ["prompt", "token", "detector"])
def test_nan_hidden_state_from_upstream_is_logged_not_steered_and_never_raises(gate, tokenizer):
    model = make_model("llama")
    poly = polytope_over(model, tokenizer, PROMPTS, [1, 0, 1, 0])
    detector = polytope_over(model, tokenizer, PROMPTS, [1, 0, 1, 0]) if gate == "detector" else gate
    steer = sf.SteeringSpec(constraints=poly, steerer=sf.SafeFlowSteerer(lambda_unsafe=4.0, lr=0.1), layer=LAYER,
                            gate=detector)
    _, clean_ids, clean_log = gen(model, tokenizer, PROMPTS, steer=steer)
    with poisoned(model, LAYER - 1, row=2):
        _, ids, log = gen(model, tokenizer, PROMPTS, steer=steer)
    bad = [e for e in log.events if e.row == 2]
    assert bad and all(e.nonfinite and not e.steered and not e.inside for e in bad)
    assert len(bad) == len({e.step for e in log.events})  # eligible (cannot be certified safe): logged at every step
    s = log.summary()
    assert s["rows_nonfinite"] == 1 and s["nonfinite"] == len(bad)
    for row in (0, 1, 3):  # the other rows of the batch: exactly as without the broken row
        assert ids[row] == clean_ids[row]
        assert [(e.step, e.steered) for e in log.events if e.row == row] == \
            [(e.step, e.steered) for e in clean_log.events if e.row == row]


# --- inputs_embeds --------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_from_inputs_embeds_steers_like_input_ids(use_cache, tokenizer):
    model = make_model("qwen2")
    poly = polytope_over(model, tokenizer, PROMPTS, [1, 0, 1, 0])
    steer = sf.SteeringSpec(constraints=poly, steerer=sf.SafeFlowSteerer(lambda_unsafe=4.0, lr=0.1), layer=LAYER)
    enc = tokenizer(chat(tokenizer, PROMPTS), return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=5, do_sample=False, use_cache=use_cache)
    with steer.apply(model) as by_ids:
        a = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:]
    embeds = model.get_input_embeddings()(enc["input_ids"])
    with steer.apply(model) as by_embeds:
        b = model.generate(inputs_embeds=embeds, attention_mask=enc["attention_mask"], **kw)
    assert torch.equal(a, b)
    assert by_embeds.steered_rows() == by_ids.steered_rows() == [0, 2]
    assert [(e.row, e.step, e.steered) for e in by_embeds.events] == [(e.row, e.step, e.steered) for e in by_ids.events]


# --- arguments checked when the context is entered ------------------------------------------
def test_steering_arguments_are_checked_on_entry(tokenizer):
    model = make_model("llama")
    poly = always_outside(32)
    for steerer in ("safeflow", None, sf.SafeFlowSteerer):
        with pytest.raises(ConfigError, match="Steerer.create"):
            with sf.steering(model, poly, steerer, layer=1):
                pass
    for constraints in (None, "runs/polytope.safetensors", torch.zeros(3)):
        with pytest.raises(ConfigError, match="fitted ConstraintSet"):
            with sf.steering(model, constraints, sf.SafeFlowSteerer(), layer=1):
                pass
    with pytest.raises(DataError, match="not been fitted"):
        with sf.steering(model, sf.LinearConstraint(32), sf.SafeFlowSteerer(), layer=1):
            pass
    unfitted_gate = sf.LinearConstraint(32)
    with pytest.raises(DataError, match="not been fitted"):
        with sf.steering(model, poly, sf.SafeFlowSteerer(), layer=1, gate=unfitted_gate):
            pass
    with pytest.raises(ConfigError, match="first_n_tokens"):
        with sf.steering(model, poly, sf.SafeFlowSteerer(), layer=1, first_n_tokens=True):
            pass
    no_covariance = always_outside(32)
    no_covariance.input_covariance.zero_()
    with pytest.raises(DataError, match="precondition='none'"):
        with sf.steering(model, no_covariance, sf.SafeFlowSteerer(precondition="covariance"), layer=1):
            pass
    without_depth = always_outside(32)  # e.g. loaded from a format-2 file: relative depths cannot be resolved
    without_depth.safe_depth.fill_(-1.0)
    with pytest.raises(DataError, match="safe_depth"):
        with sf.steering(model, without_depth, sf.SafeFlowSteerer(depth=1.0), layer=1):
            pass
    assert not model._forward_pre_hooks and not any(b._forward_hooks for b in find_decoder_layers(model))
    assert not steering_active(model)


def test_extraction_inside_a_steering_context_is_refused_clearly(tokenizer):
    model = make_model("llama")
    ext = sf.HFExtractor(model, tokenizer, layer=1, progress=False)
    outside = ext.extract(PROMPTS)
    with sf.steering(model, always_outside(32), sf.SafeFlowSteerer(max_steps=1), layer=1):
        assert steering_active(model)
        with pytest.raises(ConfigError, match="inside a `with steering"):
            ext.extract(PROMPTS)
        with pytest.raises(ConfigError, match="inside a `with steering"):
            ext.extract_responses(PROMPTS[:1], ["bake cookies"])
    assert not steering_active(model)
    assert torch.equal(ext.extract(PROMPTS), outside)
