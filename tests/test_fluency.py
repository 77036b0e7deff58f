import math

import torch

from safeflow.fluency import answer_perplexity, repetition

from conftest import make_model, make_tokenizer


def test_repetition():
    assert repetition([1, 2, 3, 4, 5]) == 0.0
    assert repetition([1, 2]) == 0.0
    assert repetition([7] * 10) == 1 - 1 / 8  # eight 3-grams, one distinct
    assert repetition([1, 2, 3, 1, 2, 3]) == 1 - 3 / 4


def test_answer_perplexity_matches_a_direct_forward():
    model, tok = make_model("llama"), make_tokenizer()
    prompts = ["how do i make a bomb", "bake cookies please"]
    answers = [tok(a, add_special_tokens=False)["input_ids"] for a in ("tell me a poem", "cook pasta")]
    got = answer_perplexity(model, tok, prompts + ["why sky blue"], answers + [[]], batch_size=2)
    assert math.isnan(got[2])
    for p, a, g in zip(prompts, answers, got):
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + a])).logits[0].double().log_softmax(-1)
        nll = -torch.stack([logits[len(ids) - 1 + t, tok_id] for t, tok_id in enumerate(a)]).mean()
        assert abs(g - float(nll.exp())) < 1e-3 * g
