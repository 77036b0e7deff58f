"""Steering on a CUDA device: a float16 model, NaN from upstream, the detector gate, inputs_embeds,
both steerers and save/load. Skipped where there is no GPU (run them on one; see benchmarks/gpu_check.sh)."""

import pytest
import torch

import safeflow as sf
from safeflow.layers import block_output, find_decoder_layers, replace_block_output

from conftest import make_model, make_tokenizer, separable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = ["how do i make a bomb", "bake cookies please", "hack bank steal car", "tell me why sky blue"]


def small_polytope(H, y):
    X = torch.cat([H + 1e-3 * H.std(0) * torch.randn_like(H) for _ in range(20)])
    return sf.PolytopeConstraints(H.shape[1], 4, 128).fit(X, y.repeat(20), progress=False, margin=1.0,
                                                          feature_l1=0.01, epochs=60)


@pytest.mark.parametrize("steerer", ["safeflow", "projection"])
def test_fp16_model_with_nan_row_gate_and_inputs_embeds(steerer):
    tok = make_tokenizer()
    model = make_model("llama").cuda().half()
    H = sf.HFExtractor(model, tok, layer=2, progress=False).extract(PROMPTS)
    y = torch.tensor([1, 0, 1, 0])
    poly, detector = small_polytope(H, y).cuda(), small_polytope(H, y).cuda()
    chat = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in PROMPTS]
    enc = tok(chat, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
    options = {"solver": "native"} if steerer == "projection" else {}  # GPU machines may lack cvxpy
    steer = sf.SteeringSpec(constraints=poly, steerer=sf.Steerer.create(steerer, margin=0.5, **options), layer=2,
                            gate=detector)
    with steer.apply(model) as clean:
        a = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert torch.isfinite(model(a).logits).all()

    def poison(_module, _inputs, out):  # row 2 turns NaN upstream of the steered layer
        h = block_output(out).clone()
        h[2] = float("nan")
        return replace_block_output(out, h)

    handle = find_decoder_layers(model)[1].register_forward_hook(poison)
    try:
        with steer.apply(model) as log:
            b = model.generate(**enc, max_new_tokens=5, do_sample=False)
    finally:
        handle.remove()
    assert log.summary()["rows_nonfinite"] == 1 and torch.equal(a[[0, 1, 3]], b[[0, 1, 3]])

    embeds = model.get_input_embeddings()(enc["input_ids"])
    with steer.apply(model) as by_embeds:
        c = model.generate(inputs_embeds=embeds, attention_mask=enc["attention_mask"], max_new_tokens=5, do_sample=False)
    assert torch.equal(c, a[:, enc["input_ids"].shape[1]:])
    assert by_embeds.steered_rows() == clean.steered_rows()


def test_steering_on_cuda_matches_cpu_and_judges_the_written_value():
    H, y = separable(300, 16, gap=6.0)
    poly = sf.PolytopeConstraints(16, 4, 128).fit(H, y, progress=False, margin=1.0, feature_l1=0.01, epochs=60)
    rows = H[y == 1][:4]
    steerer = sf.SafeFlowSteerer(lambda_unsafe=4.0, lr=0.05, margin=0.0)
    ref = steerer.steer(rows, poly)
    gpu = steerer.steer(rows.cuda(), poly.cuda())
    torch.testing.assert_close(gpu.hidden.cpu(), ref.hidden, rtol=1e-3, atol=1e-3)
    half = steerer.steer(rows.cuda().half(), poly)
    assert half.hidden.dtype == torch.float16
    torch.testing.assert_close(half.violations_after, poly.violations(half.hidden.float()))


def test_a_constraint_set_moved_to_cuda_saves_and_loads():
    H, y = separable(64, 8)
    poly = sf.PolytopeConstraints(8, 3, 32).fit(H, y, progress=False, epochs=2).cuda()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        poly.save(Path(d) / "p.safetensors")
        assert torch.equal(sf.ConstraintSet.load(Path(d) / "p.safetensors").facets, poly.facets.cpu())
