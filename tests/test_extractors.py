import pytest
import torch

import safeflow as sf
from safeflow.errors import ConfigError, DataError
from safeflow.extractors import last_token_index

from conftest import make_model, make_tokenizer

TEXTS = ["how do i make a bomb", "bake cookies please", "write poem about the sea tell me why sky blue", "hack bank"]


def reference_states(model, tok, texts, layer):
    """Unbatched hidden_states[layer + 1] at the last token, from HF's own output."""
    rows = []
    for t in texts:
        prompt = tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
        rows.append(out.hidden_states[layer + 1][0, -1])
    return torch.stack(rows)


def test_layer_l_is_hidden_states_l_plus_1(tiny_model, tokenizer):
    ext = sf.Extractor.create("hf", model=tiny_model, tokenizer=tokenizer, layer=1, batch_size=3, progress=False)
    H = ext.extract(TEXTS)
    assert H.shape == (4, 32) and H.dtype == torch.float32
    torch.testing.assert_close(H, reference_states(tiny_model, tokenizer, TEXTS, 1), rtol=1e-4, atol=1e-5)


def test_several_layers_in_one_pass_match_single_layers(tokenizer):
    model = make_model("llama")
    ext = sf.HFExtractor(model, tokenizer, layer=0, progress=False)
    multi = ext.extract_layers(TEXTS, [0, 2, -1])
    for j, layer in enumerate([0, 2, 3]):
        torch.testing.assert_close(multi[:, j], sf.HFExtractor(model, tokenizer, layer=layer, progress=False).extract(TEXTS))


def test_mean_pooling_ignores_padding(tokenizer):
    model = make_model("qwen2")
    batched = sf.HFExtractor(model, tokenizer, layer=1, pooling="mean", batch_size=4, progress=False).extract(TEXTS)
    single = sf.HFExtractor(model, tokenizer, layer=1, pooling="mean", batch_size=1, progress=False).extract(TEXTS)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [1, 3]
    assert last_token_index(left).tolist() == [3, 3]


def test_cache_resumes_and_matches(tmp_path, tokenizer, monkeypatch):
    model = make_model("gpt2")
    ext = sf.HFExtractor(model, tokenizer, layer=2, batch_size=2, cache_dir=tmp_path, progress=False)
    first = ext.extract(TEXTS[:2])  # an "interrupted" run that finished only the first batch
    calls = []
    original = ext._forward
    monkeypatch.setattr(ext, "_forward", lambda prompts, layers: calls.append(len(prompts)) or original(prompts, layers))
    full = ext.extract(TEXTS)
    assert calls == [2]  # only the two missing texts were computed
    assert torch.equal(full[:2], first)
    torch.testing.assert_close(full, sf.HFExtractor(model, tokenizer, layer=2, progress=False).extract(TEXTS))
    chunk = next(tmp_path.rglob("chunk-*.safetensors"))
    chunk.write_bytes(b"garbage")  # a corrupted chunk is recomputed, not fatal
    again = sf.HFExtractor(model, tokenizer, layer=2, batch_size=2, cache_dir=tmp_path, progress=False).extract(TEXTS)
    torch.testing.assert_close(again, full)


def test_bad_inputs(tokenizer):
    model = make_model("llama")
    with pytest.raises(ConfigError, match="out of range.*0..3"):
        sf.HFExtractor(model, tokenizer, layer=4)
    ext = sf.HFExtractor(model, tokenizer, layer=1, progress=False)
    with pytest.raises(DataError, match="no texts"):
        ext.extract([])
    with pytest.raises(DataError, match="non-empty"):
        ext.extract(["hack bank", "  "])
    with pytest.raises(ConfigError, match="no chat template"):
        sf.HFExtractor(model, make_tokenizer(chat_template=False), layer=1, chat_template=True).extract(["hack bank"])
    with pytest.raises(ConfigError, match="layers="):
        sf.HFExtractor(torch.nn.Linear(2, 2), tokenizer)


def final_norm(model):
    return model.model.norm if hasattr(model, "model") else model.transformer.ln_f


def test_last_layer_is_the_block_output_before_the_final_norm(tiny_model, tokenizer):
    """hidden_states[L + 1] is block L's output for every block but the last: Hugging Face reports
    the last entry after the model's final norm. Layer -1 here is the raw output of the last block."""
    blocks = sf.layers.find_decoder_layers(tiny_model)
    seen = {}
    handles = [b.register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(k, sf.layers.block_output(out)))
               for k, b in enumerate(blocks)]
    enc = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            out = tiny_model(**enc, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    last = len(blocks) - 1
    for layer in range(last):
        assert torch.equal(seen[layer], out.hidden_states[layer + 1])
    assert not torch.allclose(seen[last], out.hidden_states[-1])
    with torch.no_grad():
        torch.testing.assert_close(final_norm(tiny_model)(seen[last]), out.hidden_states[-1])
    # extraction at layer -1 reads the raw block output (row 0 is the longest text: no padding in it)
    H = sf.HFExtractor(tiny_model, tokenizer, layer=-1, chat_template=False, progress=False).extract(TEXTS[:1])
    torch.testing.assert_close(H[0], seen[last][0, -1], rtol=1e-4, atol=1e-5)
