"""Capability retention on tiny from-config models, the task checkers and the registered tasks."""

from __future__ import annotations

import doctest

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import safeflow as sf
from safeflow import capability
from safeflow.capability import (CapabilityTask, capability_retention, check_numeric, check_truefalse,
                                 load_capability_task)

from conftest import CHAT_TEMPLATE, WORDS, make_model
from test_steering import always_inside


def pushing(d: int) -> sf.LinearConstraint:
    """A halfspace every state violates by far, along a fixed direction: SafeFlow moves every state."""
    c = always_inside(d)
    with torch.no_grad():
        c.net[0].weight.copy_(torch.randn(1, d, generator=torch.Generator().manual_seed(0)))
        c.net[0].bias.fill_(1e3)
    return c

LAYER = 2
PROMPTS = ["bake cookies please", "tell me why sky blue", "plan trip paris", "cook pasta", "explain rain",
           "write poem about the sea"]


def tokenizer_with_numbers() -> PreTrainedTokenizerFast:
    """conftest's word-level ChatML tokenizer plus digits and true/false, so answers can be graded."""
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for w in WORDS + ["1", "2", "3", "7", "true", "false"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


@pytest.fixture(scope="module")
def setup():
    model, tok = make_model("llama", vocab_size=80, seed=1), tokenizer_with_numbers()  # seed 1 answers with digits
    plain, ids, _ = sf.generate_responses(model, tok, PROMPTS, max_new_tokens=8)
    return model, tok, plain


def last_number(text: str) -> str:
    nums = [w for w in text.split() if w.isdigit()]
    return nums[-1] if nums else "999"


def test_nothing_steered_inside_the_set(setup):
    model, tok, plain = setup
    targets = [last_number(t) for t in plain]
    r = capability_retention(model, tok, always_inside(32), sf.SafeFlowSteerer(), LAYER, PROMPTS, targets=targets,
                             gate="token", max_new_tokens=8)
    assert r.n == 6 and r.rows_steered == 0.0 and r.unchanged == 1.0
    expected = sum(check_numeric(t, g) for t, g in zip(plain, targets)) / 6
    assert expected > 0  # the planted targets make some answers correct
    assert r.accuracy_unsteered == r.accuracy_steered == pytest.approx(expected)
    assert r.perplexity_unsteered == pytest.approx(r.perplexity_steered)
    assert [rec["unsteered"] for rec in r.records] == plain


def test_every_row_steered_outside_the_set(setup):
    model, tok, plain = setup
    targets = [last_number(t) for t in plain]
    r = capability_retention(model, tok, pushing(32), sf.SafeFlowSteerer(lambda_unsafe=50.0, lr=0.5), LAYER,
                             PROMPTS, targets=targets, gate="token", first_n_tokens=None, max_new_tokens=8)
    assert r.rows_steered == 1.0
    assert all(rec["steered_tokens"] > 0 for rec in r.records)
    assert r.unchanged == pytest.approx(sum(rec["unchanged"] for rec in r.records) / 6)
    assert r.unchanged < 1.0  # a steer this strong changes some answer
    assert r.accuracy_steered == pytest.approx(
        sum(check_numeric(rec["steered"], g) for rec, g in zip(r.records, targets)) / 6)
    # reusing the unsteered answers gives the same result without generating them again
    again = capability_retention(model, tok, pushing(32), sf.SafeFlowSteerer(lambda_unsafe=50.0, lr=0.5),
                                 LAYER, PROMPTS, targets=targets, gate="token", first_n_tokens=None, max_new_tokens=8,
                                 unsteered=r.unsteered)
    assert again.accuracy_unsteered == r.accuracy_unsteered and again.unchanged == r.unchanged


def test_without_targets_no_accuracy(setup):
    model, tok, _ = setup
    r = capability_retention(model, tok, always_inside(32), sf.SafeFlowSteerer(), LAYER, PROMPTS[:2], gate="token",
                             max_new_tokens=4)
    assert r.accuracy_unsteered is None and r.accuracy_steered is None and "target" not in r.records[0]


def test_checkers():
    assert check_numeric("Kim raises 750 and they raise 2,280 dollars", "2280")
    assert check_numeric("The answer is -3.5", "-3.5") and not check_numeric("no number", "3")
    assert not check_numeric("it is 12", "1")
    assert check_truefalse("TRUE, because ...", "true") and not check_truefalse("False; not true", "true")
    assert not check_truefalse("I am not sure", "false")
    assert doctest.testmod(capability, raise_on_error=True).attempted > 0


def test_registered_tasks_load_from_the_pinned_package():
    gsm = load_capability_task("rho-gsm8k")
    assert len(gsm) == 100 and gsm.checker == "numeric" and gsm.targets[0] == "2280"
    assert gsm.without(gsm.prompts[:10]).prompts == gsm.prompts[10:] and len(gsm.head(5)) == 5
    fact = load_capability_task("rho-factual")
    assert len(fact) == 60 and fact.targets[:2] == ["true", "false"]
    assert "The capital of France is Paris." in fact.prompts[0] and "Berlin" in fact.prompts[1]


def test_bad_input(setup):
    model, tok, _ = setup
    with pytest.raises(sf.ConfigError, match="unknown capability task 'mmlu'"):
        load_capability_task("mmlu")
    with pytest.raises(sf.DataError, match="targets for 2 prompts"):
        capability_retention(model, tok, always_inside(32), sf.SafeFlowSteerer(), LAYER, PROMPTS[:2], targets=["1"])
    with pytest.raises(sf.ConfigError, match="unknown checker"):
        capability_retention(model, tok, always_inside(32), sf.SafeFlowSteerer(), LAYER, PROMPTS[:2], checker="bleu")
    with pytest.raises(sf.DataError, match="no task prompts"):
        capability_retention(model, tok, always_inside(32), sf.SafeFlowSteerer(), LAYER, [])
    with pytest.raises(sf.ConfigError, match="unknown checker"):
        CapabilityTask("x", ["a"], ["1"], "exact")
