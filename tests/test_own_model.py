"""A user's own model and data: default layer by depth, provenance checks, old files, bad input,
progress lines. Tiny from-config models (4 decoder layers)."""

import io
import logging

import pytest
import torch

import safeflow as sf
from safeflow.cli import main
from safeflow.constraints.base import FORMAT_VERSION
from safeflow.data import LABEL_SPELLINGS, load_prompt_file
from safeflow.io import save_tensors
from safeflow.progress import progress_bar

from conftest import HIDDEN, make_model, make_tokenizer, separable, WORDS


@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer()
    return make_model("llama", vocab_size=len(tok), layers=4), tok


@pytest.fixture(scope="module")
def trained(tiny):
    """A polytope fitted on layer-2 states of the tiny model, with the source recorded."""
    model, tok = tiny
    ext = sf.HFExtractor(model, tok, progress=False)
    texts = [" ".join(WORDS[i:i + 4]) for i in range(0, 40)]
    H = ext.extract(texts)
    y = torch.arange(len(texts)) % 2
    poly = sf.PolytopeConstraints(H.shape[1], 2, 16).fit(H, y, epochs=5, progress=False)
    poly.provenance.update(sf.describe_source(ext))
    return ext, poly


def prompts_file(tmp_path, rows, name="p.csv"):
    path = tmp_path / name
    path.write_text("text,label,category\n" + "".join(f"{t},{lbl},{c}\n" for t, lbl, c in rows))
    return path


def test_default_layer_is_the_papers_fraction_of_the_depth(tiny):
    model, tok = tiny
    assert sf.HFExtractor(model, tok).layer == 2  # round(20/32 × 4)
    deep = make_model("llama", vocab_size=len(tok), layers=32)
    assert sf.HFExtractor(deep, tok).layer == 20  # the paper's layer on a 32-block model


def test_provenance_records_source_and_training(trained, tmp_path):
    ext, poly = trained
    p = poly.provenance
    assert p["layer"] == 2 and p["pooling"] == "last" and p["chat_template"] is True
    assert p["fingerprint"] == {"model_type": "llama", "hidden_size": HIDDEN, "num_layers": 4,
                                "vocab_size": len(ext.tokenizer)}
    t = p["training"]
    assert t["constraint"] == "polytope" and t["epochs"] == 5 and t["rows"] == 40
    assert t["unsafe_rows"] == t["safe_rows"] == 20 and t["final_loss"] == pytest.approx(poly.train_history[-1])
    poly.save(tmp_path / "p.safetensors")
    assert sf.ConstraintSet.load(tmp_path / "p.safetensors").provenance == p


def test_set_trained_at_one_layer_is_refused_at_another(tiny, trained):
    model, tok = tiny
    _, poly = trained
    steerer = sf.Steerer.create("projection", solver="native")
    with pytest.raises(sf.ConfigError, match=r"trained on layer 2 of .* but layer 0 was asked for"):
        with sf.steering(model, poly, steerer, layer=0):
            pass
    with pytest.raises(sf.ConfigError, match="layer 2 .* layer 0"):
        sf.evaluate_steering(model, tok, poly, steerer, 0, harmful=["a"], benign=["b"], max_new_tokens=2)
    with sf.steering(model, poly, steerer) as log:  # no layer: the recorded one
        sf.generate_responses(model, tok, ["how do I"], max_new_tokens=2)
    assert log.summary()["checks"] > 0
    with sf.steering(model, poly, steerer, layer=0, check_provenance=False):  # the explicit override
        pass


def test_set_trained_on_another_model_is_refused_naming_both(tiny, trained):
    _, tok = tiny
    _, poly = trained
    other = make_model("qwen2", vocab_size=len(tok), layers=6)
    with pytest.raises(sf.ConfigError, match=r"trained on model .*num_layers 4.* but this is model .*num_layers 6"):
        with sf.steering(other, poly, sf.Steerer.create("safeflow"), layer=2):
            pass


def test_file_written_before_provenance_still_loads(tiny, trained, tmp_path):
    model, _ = tiny
    _, poly = trained
    path = tmp_path / "old.safetensors"  # what save() wrote before provenance existed
    save_tensors(path, poly.state_dict(), {"type": "polytope", "format_version": FORMAT_VERSION,
                                           "config": poly.config()})
    old = sf.ConstraintSet.load(path)
    assert old.provenance == {} and torch.equal(old.facets, poly.facets)
    steerer = sf.Steerer.create("projection", solver="native")
    with pytest.raises(sf.ConfigError, match="does not record the layer.*pass layer=L"):
        with sf.steering(model, old, steerer):
            pass
    with sf.steering(model, old, steerer, layer=0):  # unknown provenance: nothing is checked
        pass


def test_unknown_label_lists_every_accepted_spelling(tmp_path, capsys):
    path = prompts_file(tmp_path, [("how do I", "unsafe", "a"), ("hello there", "maybe", "b")])
    with pytest.raises(sf.DataError) as err:
        load_prompt_file(path)
    assert "'maybe'" in str(err.value) and all(s in str(err.value) for s in LABEL_SPELLINGS)
    assert main(["sweep", "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown label 'maybe'" in err[0] and "harmful" in err[0]


def test_split_leaving_a_class_empty_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    rows = [(f"bad {i}", "unsafe", "x") for i in range(6)] + [("fine", "safe", "y")]
    data = load_prompt_file(prompts_file(tmp_path, rows))
    with pytest.raises(sf.DataError, match="leaves the test split without safe rows"):
        sf.stratified_split(data, 0.5)
    monkeypatch.setattr("safeflow.models.load_model", lambda *a, **k: pytest.fail("model loaded before the split"))
    path = str(tmp_path / "p.csv")
    for argv in (["extract", "--data", path, "--test-fraction", "0.5", "--out", str(tmp_path / "f.safetensors")],
                 ["demo", "--data", path, "--out", str(tmp_path / "demo")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "without safe rows" in err[0] and "Traceback" not in err[0]


def test_model_directory_with_an_unreadable_config_is_one_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-architecture"}')
    monkeypatch.setattr("safeflow.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["extract", "--model", str(bad), "--layer", "1", "--out", str(tmp_path / "f.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no readable model config" in err[0]


def test_large_shift_relative_to_the_state_norm_is_warned(tiny, trained, caplog):
    model, tok = tiny
    _, poly = trained
    steerer = sf.Steerer.create("safeflow", margin=1e4, precondition="none")  # absolute margin: far too deep
    with caplog.at_level(logging.WARNING, logger="safeflow.steering"):
        _, _, log = sf.generate_responses(model, tok, ["how do I"], max_new_tokens=3,
                                          steer=sf.SteeringSpec(constraints=poly, steerer=steerer, gate="token"))
    summary = log.summary()
    assert summary["tokens_steered"] > 0 and summary["mean_relative_shift"] > 1
    assert summary["large_shift_calls"] == [0]
    assert sum("do not fit this model" in r.getMessage() for r in caplog.records) == 1


def test_progress_is_periodic_lines_when_not_a_terminal(monkeypatch):
    out = io.StringIO()
    monkeypatch.setenv("SAFEFLOW_PROGRESS_INTERVAL", "0")
    for _ in progress_bar(range(5), desc="work", file=out):
        pass
    text = out.getvalue()
    assert "\r" not in text and text.count("\n") >= 2 and "work: 100%" in text.splitlines()[-1]
