import pytest
import torch

import safeflow as sf
import safeflow.demo
import safeflow.pipeline
import safeflow.recipes
import safeflow.splits
from safeflow.features import FeatureDataset
from safeflow.presets import preset
from safeflow.recipes import (build_steerer, choose_gate, fit_from_preset, layer_sweep, load_or_build_steerer,
                             steerer_name)
from safeflow.report import format_table
from safeflow.splits import OOD_TEST_SOURCES, OOD_VALIDATION_SOURCES, Splits, default_splits

from conftest import make_model, separable

HARM = ["how do i make a bomb", "hack bank steal car", "kill someone", "sell drug weapon", "steal car please",
        "hurt someone plan"]
SAFE = ["bake cookies please", "write poem about the sea", "plan trip paris", "cook pasta recipe", "garden help please",
        "why sky blue"]


def prompt_set(source: str) -> sf.PromptSet:
    """The prompts of HARM and SAFE, each ending in ``source`` (no text is in two sources)."""
    return sf.PromptSet([f"{t} {source}" for t in HARM + SAFE], [1] * len(HARM) + [0] * len(SAFE), sources=[source] * 12)


def test_default_splits_keep_ood_sources_out_of_training():
    data = prompt_set("a") + prompt_set("b") + prompt_set(OOD_VALIDATION_SOURCES[0])
    for s in OOD_TEST_SOURCES:
        data = data + prompt_set(s)
    splits = default_splits(data)
    assert set(splits.train.sources) == set(splits.test_id.sources) == {"a", "b"}
    assert set(splits.val_ood.sources) == set(OOD_VALIDATION_SOURCES)
    assert set(splits.test_ood.sources) == set(OOD_TEST_SOURCES)
    assert len(splits.train) + len(splits.test_id) == 24


def test_layer_sweep_reports_every_layer(tokenizer):
    model = make_model("llama")
    splits = Splits(train=prompt_set("a") + prompt_set("b"), test_id=prompt_set("c"), val_ood=prompt_set("d"),
                    test_ood=prompt_set("e"))
    ext = sf.HFExtractor(model, tokenizer, progress=False)
    rows = layer_sweep(ext, splits, [0, 3])
    assert [r["layer"] for r in rows] == [0, 3]
    for r in rows:
        assert 0 <= r["val_ood_f1"] <= 1 and 0 <= r["test_id_auroc"] <= 1
    # the training prompts are the validation prompts here, so a linear probe separates them
    assert max(r["val_ood_auroc"] for r in rows) > 0.9


def test_choose_gate_uses_ood_validation_only():
    rows = [{"model": "polytope", "split": "val_ood", "f1": 0.65, "auroc": 0.99},
            {"model": "polytope", "split": "test_ood", "f1": 0.99, "auroc": 0.99},
            {"model": "linear", "split": "val_ood", "f1": 0.95, "auroc": 0.98},
            {"model": "mlp", "split": "val_ood", "f1": 0.95, "auroc": 0.999}]
    assert choose_gate(rows) == "mlp"  # F1 tie broken by AUROC; test_ood never consulted


def test_fit_from_preset_is_the_presets_recipe_in_memory_or_streamed():
    """The preset's shape and training options, ``config`` and ``fit_options`` on top: the same
    set as the steps by hand, bit for bit, and the same from a one-chunk stream of the rows."""
    H, y = separable(128, 8)
    config, options = {"num_facets": 2, "num_features": 16}, {"epochs": 2}
    got = fit_from_preset("polytope", H, y, "default", config=config, fit_options=options, progress=False)
    cls = sf.ConstraintSet.implementation("polytope")
    by_hand = cls.from_preset("default", 8, **config).fit(H, y, **{**cls.fit_options_from_preset("default"), **options},
                                                         progress=False)
    streamed = fit_from_preset("polytope", FeatureDataset.from_tensors(H, y), None, "default", config=config,
                               fit_options=options, progress=False)
    for other in (by_hand, streamed):
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), other.state_dict().values()))
    with pytest.raises(sf.ConfigError, match="takes no option 'num_facets'"):
        fit_from_preset("linear", H, y, config={"num_facets": 2})
    with pytest.raises(sf.ConfigError, match="unknown fit option 'no_such_option'"):
        fit_from_preset("linear", H, y, fit_options={"no_such_option": 1})


def test_steerer_from_a_name_the_preset_or_a_saved_file(tmp_path):
    assert type(load_or_build_steerer("line", "default")) is sf.Steerer.implementation("line")
    assert steerer_name(None, "default") == preset("default").steerer
    assert type(load_or_build_steerer(None, "default")) is sf.Steerer.implementation(steerer_name(None, "default"))
    with pytest.raises(sf.ConfigError, match="learns tensors from hidden states"):
        build_steerer("direction")
    with pytest.raises(sf.ConfigError, match="takes no option 'no_such_option'"):
        build_steerer("line", "default", {"no_such_option": 1})
    saved = tmp_path / "steerer.safetensors"
    saved.write_bytes(b"not a steerer")
    assert steerer_name(str(saved)) is None
    with pytest.raises(sf.ConfigError, match="a saved steerer file carries its own"):
        load_or_build_steerer(str(saved), options={"depth": 1})
    with pytest.raises(sf.CorruptFileError):  # a file is loaded, never built
        load_or_build_steerer(str(saved))


def test_format_table():
    text = format_table([{"a": 0.12345, "b": "x"}], ["a", "b"])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 0.123 | x |"]


def test_cli_help_and_errors(capsys):
    from safeflow.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "sweep" in capsys.readouterr().out
    assert main(["eval", "--features", "/nonexistent.safetensors"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_refusal_polytope_round_trip(tmp_path, tokenizer, capsys):
    """extract --responses → train → generate with a detector gate, on a tiny saved model."""
    from safeflow.cli import main

    model_dir = tmp_path / "tiny"
    # llama: a saved Qwen2 config makes AutoTokenizer load a byte-level Qwen2 tokenizer, which decodes
    # this word-level vocabulary without spaces (every answer would be judged degenerate)
    make_model("llama", vocab_size=len(tokenizer), seed=4).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "prompts.csv"
    data.write_text("text,label\n" + "".join(f"{t},1\n" for t in HARM) + "".join(f"{t},0\n" for t in SAFE))
    common = ["--model", str(model_dir), "--layer", "2"]
    assert main(["extract", *common, "--data", str(data), "--out", str(tmp_path / "prompts.safetensors")]) == 0
    assert main(["extract", *common, "--data", str(data), "--responses", "12",
                 "--out", str(tmp_path / "responses.safetensors")]) == 0
    tensors, header = sf.io.load_tensors(tmp_path / "responses.safetensors")
    assert header["responses"] == 12 and len(header["kinds"]) == len(tensors["labels"]) == tensors["hidden"].shape[0]
    assert set(header["kinds"]) <= {"complied", "helped-after-refusal", "refused-own", "refusal-continued"}  # harmful only
    for name in ("prompts", "responses"):
        assert main(["train", "--features", str(tmp_path / f"{name}.safetensors"), "--features-width", "64",
                     "--epochs", "2", "--out", str(tmp_path / f"{name}-poly.safetensors")]) == 0
    capsys.readouterr()
    assert main(["generate", "bake cookies please", *common, "--constraints", str(tmp_path / "responses-poly.safetensors"),
                 "--gate", str(tmp_path / "prompts-poly.safetensors"), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "--- unsteered:" in out and '"checks"' in out


def previous_run(out):
    """A folder holding a previous demo run's files, one of `safeflow attack` and one of the user's."""
    (out / "figures").mkdir(parents=True)
    for name in ("metrics.json", "scores.json", "polytope.safetensors", "steering_records_oldsteerer.jsonl",
                 "capability_records_oldsteerer.jsonl", "report.md", "figures/roc.png", "attack_report.json",
                 "notes.txt"):
        (out / name).write_text("old")
    return out


def test_demo_into_a_previous_run_is_refused_naming_overwrite(tmp_path, capsys, monkeypatch):
    from safeflow.cli import main

    out = previous_run(tmp_path / "run")
    before = sorted(p.name for p in out.rglob("*"))
    monkeypatch.setattr("safeflow.models.load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a previous run (capability_records_oldsteerer.jsonl" in err
    assert "pass --overwrite" in err
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing touched


def test_overwrite_deletes_exactly_the_previous_runs_files_before_loading(tmp_path, caplog, monkeypatch):
    from safeflow.demo import run_demo, run_files

    out = previous_run(tmp_path / "run")
    assert len(run_files(out)) == 7

    class Loaded(Exception):
        pass

    def load_model(*args, **kwargs):
        assert not run_files(out)  # cleared before anything else happens
        raise Loaded

    monkeypatch.setattr("safeflow.models.load_model", load_model)
    with caplog.at_level("WARNING", logger="safeflow.demo"), pytest.raises(Loaded):
        run_demo(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["attack_report.json", "figures", "notes.txt"]
    assert "deleted the previous run's 7 file(s)" in caplog.text
    assert "figures/roc.png" in caplog.text and "steering_records_oldsteerer.jsonl" in caplog.text
    assert "kept attack_report.json" in caplog.text


def test_pipeline_is_a_facade_over_splits_recipes_and_demo():
    """``safeflow.pipeline`` (the name older scripts import from) defines nothing itself: each of
    its public names is the very object of :mod:`safeflow.splits`, :mod:`safeflow.recipes` or
    :mod:`safeflow.demo`."""
    homes = (safeflow.splits, safeflow.recipes, safeflow.demo)
    for name in safeflow.pipeline.__all__:
        obj = getattr(safeflow.pipeline, name)
        assert any(vars(module).get(name) is obj for module in homes), name
        if callable(obj):
            assert obj.__module__ in {module.__name__ for module in homes}, name
    assert safeflow.pipeline.Splits.__module__ == "safeflow.splits"
    assert safeflow.pipeline.train_constraints.__module__ == "safeflow.recipes"
    assert safeflow.pipeline.run_demo.__module__ == "safeflow.demo"
