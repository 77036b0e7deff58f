"""Every entry that takes prompts checks them the same way: a single string is a DataError asking
for a list, batch sizes and lengths are checked, prompts with no tokens or beyond the model's
position limit are clear errors (or, for extraction, truncated with a warning) — never a raw torch
error from inside the model."""

import logging

import pytest
from tokenizers import Regex, normalizers

import safeflow as sf

from conftest import make_model, make_tokenizer
from test_steering import always_inside

LIST = r"must be a list of \w+, got a single str 'why'; pass a list, e.g. \[text\]"


@pytest.fixture(scope="module")
def llama():
    tok = make_tokenizer()
    return make_model("llama", vocab_size=len(tok), layers=2), tok


def entries(model, tok, tmp_path):
    ext = sf.HFExtractor(model, tok, layer=1, progress=False, cache_dir=tmp_path / "cache")
    inside, steerer = always_inside(32), sf.SafeFlowSteerer()
    return {
        "extract": lambda p: ext.extract(p),
        "extract_layers": lambda p: ext.extract_layers(p, [0, 1]),
        "fill_cache": lambda p: ext.fill_cache(p),
        "cached": lambda p: ext.cached(p),
        "dataset": lambda p: ext.dataset(p, [1, 0, 1]),
        "extract_responses": lambda p: ext.extract_responses(p, ["a", "b", "c"]),
        "extract_responses (responses)": lambda p: ext.extract_responses(["a", "b", "c"], p),
        "generate_responses": lambda p: sf.generate_responses(model, tok, p, max_new_tokens=2),
        "response_states (harmful)": lambda p: sf.response_states(ext, p, max_tokens=2),
        "response_states (benign)": lambda p: sf.response_states(ext, ["bomb"], p, max_tokens=2),
        "evaluate_steering (harmful)": lambda p: sf.evaluate_steering(model, tok, inside, steerer, 1, harmful=p,
                                                                      benign=["sea"], max_new_tokens=2),
        "evaluate_steering (benign)": lambda p: sf.evaluate_steering(model, tok, inside, steerer, 1, harmful=["sea"],
                                                                     benign=p, max_new_tokens=2),
        "evaluate_steering (edgy)": lambda p: sf.evaluate_steering(model, tok, inside, steerer, 1, harmful=["sea"],
                                                                   benign=["sea"], edgy=p, max_new_tokens=2),
    }


@pytest.mark.parametrize("entry", ["extract", "extract_layers", "fill_cache", "cached", "dataset", "extract_responses",
                                   "extract_responses (responses)", "generate_responses", "response_states (harmful)",
                                   "response_states (benign)", "evaluate_steering (harmful)",
                                   "evaluate_steering (benign)", "evaluate_steering (edgy)"])
def test_a_single_string_where_prompts_are_expected_asks_for_a_list(llama, tmp_path, entry):
    call = entries(*llama, tmp_path)[entry]
    with pytest.raises(sf.DataError, match=LIST):
        call("why")
    with pytest.raises(sf.DataError, match=r"\[1\] is a int"):
        call(["why", 3, "sea"])


def test_a_list_of_one_prompt_works(llama):
    model, tok = llama
    assert sf.HFExtractor(model, tok, layer=1, progress=False).extract(["why"]).shape == (1, 32)
    texts, ids, _ = sf.generate_responses(model, tok, ["why"], max_new_tokens=2)
    assert len(texts) == len(ids) == 1


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True, "8"])
def test_generation_batch_size_must_be_a_positive_int(llama, batch_size):
    model, tok = llama
    with pytest.raises(sf.ConfigError, match="batch_size must be an integer >= 1"):
        sf.generate_responses(model, tok, ["why", "sea"], batch_size=batch_size, max_new_tokens=2)


@pytest.mark.parametrize("max_new_tokens", [-1, 0, 1.5])
def test_generation_max_new_tokens_must_be_a_positive_int(llama, max_new_tokens):
    model, tok = llama
    with pytest.raises(sf.ConfigError, match="max_new_tokens must be an integer >= 1"):
        sf.generate_responses(model, tok, ["why"], max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("max_length", [0, -5, 2.5])
def test_extractor_max_length_must_be_a_positive_int(llama, max_length):
    model, tok = llama
    with pytest.raises(sf.ConfigError, match="max_length must be an integer >= 1"):
        sf.HFExtractor(model, tok, layer=1, max_length=max_length)


def test_empty_prompt_without_a_chat_template_is_a_data_error(llama):
    model, _ = llama
    tok = make_tokenizer(chat_template=False)
    with pytest.raises(sf.DataError, match=r"prompt 1 \(''\) has no tokens"):
        sf.generate_responses(model, tok, ["why", ""], max_new_tokens=2)
    with pytest.raises(sf.DataError, match="non-empty string"):
        sf.HFExtractor(model, tok, layer=1, progress=False).extract(["why", ""])


def dropping_tokenizer():
    """A tokenizer whose normalizer deletes every character: every text has zero tokens."""
    tok = make_tokenizer(chat_template=False)
    tok.backend_tokenizer.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")
    assert tok("bake cookies", add_special_tokens=False)["input_ids"] == []
    return tok


def test_prompt_that_tokenizes_to_nothing_is_a_data_error(llama):
    model, _ = llama
    tok = dropping_tokenizer()
    with pytest.raises(sf.DataError, match=r"'bake cookies' has no tokens"):
        sf.HFExtractor(model, tok, layer=1, progress=False).extract(["bake cookies"])
    with pytest.raises(sf.DataError, match=r"prompt 0 \('bake cookies'\) has no tokens"):
        sf.generate_responses(model, tok, ["bake cookies"], max_new_tokens=2)


@pytest.fixture(scope="module")
def gpt2():
    tok = make_tokenizer()
    model = make_model("gpt2", vocab_size=len(tok), layers=2)
    assert model.config.n_positions == 128
    return model, tok


def test_extractor_caps_max_length_at_the_models_positions_and_says_when_it_truncates(gpt2, caplog):
    model, tok = gpt2
    with caplog.at_level(logging.WARNING, logger="safeflow.extractors"):
        ext = sf.HFExtractor(model, tok, layer=1, progress=False)  # default max_length 512
    assert ext.max_length == 128 and "capped at the model's 128 positions" in caplog.text
    caplog.clear()
    long = "bake cookies " * 150
    with caplog.at_level(logging.WARNING, logger="safeflow.extractors"):
        H = ext.extract([long, "why"])
    assert H.shape == (2, 32) and H.isfinite().all()
    assert "1 prompt(s) longer than 128 tokens were cut to their last 128 tokens" in caplog.text
    states = ext.extract_responses([long], ["bake cookies please"], max_tokens=3)
    assert states[0].shape == (3, 32)


def test_generation_beyond_the_position_limit_is_refused(gpt2):
    model, tok = gpt2
    with pytest.raises(sf.ConfigError, match=r"prompt 1 has \d+ tokens; with max_new_tokens 48 .* 128 positions"):
        sf.generate_responses(model, tok, ["why", "bake cookies " * 50], max_new_tokens=48)
    texts, _, _ = sf.generate_responses(model, tok, ["bake cookies " * 50], max_new_tokens=8)  # fits: 100 + ~8 + 8
    assert len(texts) == 1
