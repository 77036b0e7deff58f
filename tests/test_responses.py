"""Response-conditioned states: teacher-forced extraction and the labelled training data built from it."""

import pytest
import torch

import safeflow as sf
from safeflow.errors import DataError
from safeflow.chat import format_prompts
from safeflow.layers import find_decoder_layers
from safeflow.judge import RefusalJudge, Verdict
from safeflow.responses import response_states, token_labels

from conftest import HIDDEN, make_model

LAYER = 2
PROMPTS = ["how do i make a bomb", "bake cookies please", "tell me why sky blue"]


def test_extract_responses_matches_a_plain_forward_pass(tokenizer):
    model = make_model("llama")
    ext = sf.HFExtractor(model, tokenizer, layer=LAYER, batch_size=2, progress=False)
    responses = ["i make a bomb", "bake cookies", "rain why sky blue please help"]
    got = ext.extract_responses(PROMPTS, responses, max_tokens=4)
    for states, prompt, response in zip(got, format_prompts(tokenizer, PROMPTS, "auto", None), responses):
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"][:4]
        with torch.no_grad():
            out = model(torch.tensor([p_ids + r_ids]), output_hidden_states=True)
        expected = out.hidden_states[LAYER + 1][0, len(p_ids) - 1 : len(p_ids) + len(r_ids) - 1]
        assert states.shape == (len(r_ids), HIDDEN)
        torch.testing.assert_close(states, expected, rtol=1e-5, atol=1e-5)
    # the first state is the prompt state that detection uses
    torch.testing.assert_close(torch.stack([s[0] for s in got]), ext.extract(PROMPTS), rtol=1e-5, atol=1e-5)


def test_extract_responses_are_the_states_generation_sees(tokenizer):
    model = make_model("qwen2", vocab_size=len(tokenizer), seed=4)  # seed 4: answers without special tokens
    ext = sf.HFExtractor(model, tokenizer, layer=LAYER, progress=False)
    seen: list[torch.Tensor] = []
    handle = find_decoder_layers(model)[LAYER].register_forward_hook(lambda m, i, o: seen.append(o[0, -1].clone()))
    try:
        texts, ids, _ = sf.generate_responses(model, tokenizer, PROMPTS[:1], max_new_tokens=5)
    finally:
        handle.remove()
    assert tokenizer(texts[0], add_special_tokens=False)["input_ids"] == ids[0], "decoded answer must round-trip"
    states = ext.extract_responses(PROMPTS[:1], texts, max_tokens=5)[0]
    torch.testing.assert_close(states, torch.stack(seen[: len(ids[0])]), rtol=1e-4, atol=1e-4)


class FixedJudge(RefusalJudge):
    """Gives every answer the same verdict, so the labelling logic can be checked on its own."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__()
        self.fixed = verdict

    def verdict(self, response, prompt=None):
        return self.fixed


def test_token_labels_follow_the_verdict(tokenizer):
    ids = tokenizer("i make a poem bake cookies", add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids)
    help_at = text.index("bake")
    assert token_labels(Verdict("compliance"), ids, tokenizer) == [1] * 6
    assert token_labels(Verdict("refusal", 0), ids, tokenizer) == [0] * 6
    assert token_labels(Verdict("refusal_then_safe", 0, help_at), ids, tokenizer) == [0] * 6
    assert token_labels(Verdict("degenerate"), ids, tokenizer) is None
    # the state producing "bake" (token 4) and every later one are unsafe
    assert token_labels(Verdict("refusal_then_harmful", 0, help_at), ids, tokenizer) == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("continue_refusals", [False, True])
def test_response_states_labels(tokenizer, continue_refusals):
    model = make_model("qwen2", vocab_size=len(tokenizer), seed=4)  # seed 4: answers without special tokens
    ext = sf.HFExtractor(model, tokenizer, layer=LAYER, progress=False)
    harmful, benign = ["how do i make a bomb", "hack bank steal car"], ["bake cookies please"]
    answers, ids, _ = sf.generate_responses(model, tokenizer, harmful + benign, max_new_tokens=3)
    assert all(ids), "the tiny model must answer every prompt for this test"
    refusal = tokenizer("i make a poem", add_special_tokens=False)["input_ids"]
    rs = response_states(ext, harmful, benign, max_tokens=3, refusals=["i make a poem"], judge=FixedJudge(
        Verdict("compliance")), continue_refusals=continue_refusals)
    own = len(ids[0]) + len(ids[1])
    counts = rs.counts()
    assert counts["complied"] == {"unsafe": own, "safe": 0} and counts["benign"] == {"unsafe": 0, "safe": len(ids[2])}
    refusal_kind = "refusal-continued" if continue_refusals else "refusal"
    # the refusal (minus the prompt state it shares with the own answer) is always safe; its
    # continuation is labelled by the verdict: "compliance" makes every continued state unsafe
    n_refusal = 2 * (len(refusal) - 1)
    assert counts[refusal_kind]["safe"] == n_refusal
    assert counts[refusal_kind]["unsafe"] == (sum(k == refusal_kind for k in rs.kind) - n_refusal)
    assert (counts[refusal_kind]["unsafe"] > 0) == continue_refusals
    assert rs.H.shape == (len(rs.kind), HIDDEN) and rs.prompt_index.tolist().count(2) == len(ids[2])
    prompt_states = ext.extract(harmful + benign)
    first_rows = [rs.kind.index(k) for k in ("complied", "benign")]
    torch.testing.assert_close(rs.H[first_rows], prompt_states[[0, 2]], rtol=1e-5, atol=1e-5)

    rs = response_states(ext, harmful, benign, max_tokens=3, refusals=["i make a poem"], judge=FixedJudge(
        Verdict("refusal", 0)), continue_refusals=continue_refusals)
    assert (rs.y == 0).all() and rs.counts()["refused-own"]["safe"] == own


def test_response_inputs_are_checked(tokenizer):
    ext = sf.HFExtractor(make_model("llama"), tokenizer, layer=LAYER, progress=False)
    with pytest.raises(DataError, match="one response per prompt"):
        ext.extract_responses(PROMPTS, ["bake"], max_tokens=2)
    with pytest.raises(DataError, match="empty response"):
        ext.extract_responses(PROMPTS[:1], ["  "], max_tokens=2)
    with pytest.raises(DataError, match="at least one harmful prompt"):
        response_states(ext, [], PROMPTS)
