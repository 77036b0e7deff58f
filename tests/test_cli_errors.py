"""Every user error of the command line is one line ``safeflow: error: ...`` naming the fix, exit
status 2, no traceback — checked before any model is loaded where possible."""

import errno
import json
import os

import pytest
import torch

import safeflow as sf
from safeflow.cli import main
from safeflow.io import save_tensors

from conftest import make_model, separable


@pytest.fixture
def files(tmp_path):
    """A features file, a trained polytope file, a regular file and an empty directory."""
    H, y = separable(64, 8)
    features = tmp_path / "features.safetensors"
    save_tensors(features, {"hidden": H, "labels": y}, {"model": "m", "layer": 1, "sources": ["a"] * 64})
    poly = tmp_path / "poly.safetensors"
    sf.PolytopeConstraints(8, 2, 16).fit(H, y, progress=False, epochs=1).save(poly)
    plain = tmp_path / "plain.txt"
    plain.write_text("hello\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    return {"F": str(features), "P": str(poly), "file": str(plain), "dir": str(empty), "tmp": tmp_path}


def one_line_error(capsys, argv, status=2):
    assert main(argv) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert [line for line in lines if line.startswith("safeflow: error:")] == lines[-1:], err
    return lines[-1]


ARGUMENT_ERRORS = [
    (["train", "--features", "{F}", "--epochs", "-1", "--out", "{tmp}/o.safetensors"], "--epochs"),
    (["train", "--features", "{F}", "--epochs", "0", "--out", "{tmp}/o.safetensors"], "--epochs"),
    (["train", "--features", "{F}", "--margin", "nan", "--out", "{tmp}/o.safetensors"], "--margin"),
    (["train", "--features", "{F}", "--facets", "0", "--out", "{tmp}/o.safetensors"], "--facets"),
    (["train", "--features", "{F}", "--out", "{dir}"], "is a directory"),
    (["train", "--features", "{F}", "--out", "{file}/sub/o.safetensors"], "is a file"),
    (["train", "--features", "{dir}"], "is a directory"),
    (["train", "--features", "{F}", "--constraint", "hypercube"], "unknown constraint 'hypercube'"),
    (["eval", "--features", "{F}", "--constraints", "{dir}"], "is a directory"),
    (["eval", "--features", "{tmp}/missing.safetensors"], "does not exist"),
    (["extract", "--model", "/nonexistent/model", "--out", "{tmp}/f.safetensors"], "does not exist"),
    (["extract", "--model", "{dir}", "--out", "{tmp}/f.safetensors"], "not a model directory"),
    (["extract", "--model", "smollm2", "--out", "{tmp}/f.safetensors"], "did you mean"),
    (["extract", "--cache", "{file}", "--out", "{tmp}/f.safetensors"], "is a file"),
    (["extract", "--data", "{tmp}/missing.csv", "--out", "{tmp}/f.safetensors"], "does not exist"),
    (["extract", "--data", "{tmp}/latin1.csv", "--out", "{tmp}/f.safetensors"], "not UTF-8"),
    (["extract", "--out", "{dir}"], "is a directory"),
    (["extract", "--data", "{tmp}/object.jsonl", "--out", "{tmp}/f.safetensors"], "row 2: 'text' holds a dict"),
    (["extract", "--data", "{tmp}/broken.json", "--out", "{tmp}/f.safetensors"], "not a valid JSON array"),
    (["extract", "--data", "{dir}", "--out", "{tmp}/f.safetensors"], "is a directory"),
    (["extract", "--model", "{file}/model", "--out", "{tmp}/f.safetensors"], "does not exist"),
    (["extract", "--batch-size", "0"], "--batch-size"),
    (["generate", "hi", "--model", "{dir}", "--constraints", "{P}"], "not a model directory"),
    (["generate", "hi", "--constraints", "{P}", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--file", "{dir}", "--constraints", "{P}"], "is a directory"),
    (["generate", "--file", "{tmp}/latin1.txt", "--constraints", "{P}"], "not UTF-8"),
    (["generate", "hi", "--constraints", "{P}", "--steerer", "nope"], "unknown steerer 'nope'"),
    (["generate", "hi", "--constraints", "{P}", "--gate", "{dir}"], "is a directory"),
    (["sweep", "--model", "/nonexistent/model"], "does not exist"),
    (["sweep", "--model", "{dir}"], "not a model directory"),
    (["demo", "--model", "/nonexistent/model", "--out", "{tmp}/demo"], "does not exist"),
    (["demo", "--out", "{file}"], "is a file"),
    (["demo", "--out", "{tmp}/demo", "--limit", "-1"], "--limit"),
    (["frobnicate"], "invalid choice"),
    (["train", "--features", "{F}", "--bogus"], "unrecognized arguments"),
    (["train", "--features", "{F}", "--fit-opt", "lr"], "expected KEY=VALUE"),
    (["train", "--features", "{F}", "--fit-opt", "bogus=1", "--out", "{tmp}/o.safetensors"],
     "unknown fit option 'bogus' for the 'polytope' constraint set; valid: margin"),
    (["train", "--features", "{F}", "--fit-opt", "schedule=sideways", "--out", "{tmp}/o.safetensors"],
     "fit option schedule='sideways' is invalid"),
    (["train", "--features", "{F}", "--constraint", "linear", "--margin", "1", "--out", "{tmp}/o.safetensors"],
     "unknown fit option 'margin' for the 'linear' constraint set"),
    (["train", "--features", "{F}", "--constraint", "mlp", "--facets", "3", "--out", "{tmp}/o.safetensors"],
     "the constraint set 'mlp' takes no option 'num_facets'; valid: input_dim, hidden_sizes"),
    (["generate", "hi", "--constraints", "{P}", "--steerer", "safeflow", "--steerer-opt", "bogus=1"],
     "the steerer 'safeflow' takes no option 'bogus'; valid: lambda_unsafe"),
    (["generate", "hi", "--constraints", "{P}", "--steerer", "safeflow", "--steerer-opt", "line.depth=1"],
     "'line' is not a steerer of this run"),
    (["generate", "hi", "--constraints", "{P}", "--steerer", "direction"], "learns tensors from hidden states"),
    (["attack", "--steerers", "line", "--steerer-opt", "max_steps=3"], "the steerer 'line' takes no option 'max_steps'"),
    (["demo", "--out", "{tmp}/demo", "--steerers", "line", "safeflow", "--steerer-opt", "safeflow.nope=3"],
     "the steerer 'safeflow' takes no option 'nope'"),
]


@pytest.mark.parametrize("argv,expected", ARGUMENT_ERRORS, ids=[" ".join(a[:3]) for a, _ in ARGUMENT_ERRORS])
def test_argument_errors_are_one_line_before_any_model_is_loaded(argv, expected, files, capsys, monkeypatch):
    (files["tmp"] / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (files["tmp"] / "latin1.csv").write_bytes("text,label\ncaf\xe9,0\n".encode("latin-1"))
    (files["tmp"] / "object.jsonl").write_text('{"text": "hi", "label": 0}\n{"text": {"a": 1}, "label": 1}\n')
    (files["tmp"] / "broken.json").write_text('[{"text": "hi", "label": 0},')
    monkeypatch.setattr("safeflow.models.load_model", lambda *a, **k: pytest.fail("model loaded before arguments were checked"))
    line = one_line_error(capsys, [a.format(**files) for a in argv])
    assert expected in line
    assert not (files["tmp"] / "o.safetensors").exists()


@pytest.mark.parametrize("command", ["extract", "generate", "sweep", "demo"])
def test_model_that_cannot_be_loaded_is_one_line(command, files, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # fail at once instead of retrying the hub
    argv = {"extract": ["extract", "--out", f"{files['tmp']}/f.safetensors"], "sweep": ["sweep"],
            "generate": ["generate", "hi", "--constraints", files["P"]], "demo": ["demo", "--out", f"{files['tmp']}/d"]}
    line = one_line_error(capsys, argv[command] + ["--model", "no-such-model"])
    assert "cannot load model 'no-such-model'" in line and "pass a default model name" in line


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from conftest import make_tokenizer

    tok = make_tokenizer()
    path = tmp_path_factory.mktemp("tiny")
    make_model("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_layer_out_of_range_fails_before_generating(tiny_model_dir, tmp_path, capsys, monkeypatch):
    H, y = separable(64, 32)
    poly = tmp_path / "p.safetensors"
    sf.PolytopeConstraints(32, 2, 16).fit(H, y, progress=False, epochs=1).save(poly)
    monkeypatch.setattr("safeflow.decoding.generate_responses", lambda *a, **k: pytest.fail("generated first"))
    line = one_line_error(capsys, ["generate", "hi", "--model", tiny_model_dir, "--constraints", str(poly),
                                   "--layer", "99"])
    assert "out of range" in line
    assert "out of range" in one_line_error(capsys, ["extract", "--model", tiny_model_dir, "--layer", "99",
                                                     "--out", str(tmp_path / "f.safetensors")])
    small = tmp_path / "small.safetensors"
    sf.PolytopeConstraints(8, 2, 16).fit(separable(64, 8)[0], y, progress=False, epochs=1).save(small)
    assert "hidden size 8" in one_line_error(capsys, ["generate", "hi", "--model", tiny_model_dir, "--constraints",
                                                      str(small), "--layer", "1"])


def test_full_disk_and_read_only_output_are_one_line(files, capsys, monkeypatch):
    import safeflow.io

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    argv = ["train", "--features", files["F"], "--features-width", "16", "--epochs", "1", "--out",
            str(files["tmp"] / "o.safetensors")]
    with monkeypatch.context() as m:
        m.setattr(safeflow.io, "save_file", full)
        assert "No space left on device; free disk space" in one_line_error(capsys, argv)
    real_open = os.open

    def read_only(path, flags, mode=0o777, **kw):
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, mode, **kw)

    with monkeypatch.context() as m:
        m.setattr(safeflow.io.os, "open", read_only)
        assert "Read-only file system; choose a writable location" in one_line_error(capsys, argv)
    assert not (files["tmp"] / "o.safetensors").exists()
    assert not [p for p in files["tmp"].iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits, so a read-only directory is writable")
def test_read_only_directory_is_refused_before_work(files, capsys):
    locked = files["tmp"] / "locked"
    locked.mkdir(mode=0o500)
    line = one_line_error(capsys, ["train", "--features", files["F"], "--out", str(locked / "o.safetensors")])
    assert "not writable" in line


def test_hostile_or_wrong_files_are_one_line(files, capsys):
    from test_loading import rewrite

    hostile = files["tmp"] / "hostile.safetensors"
    sf.ConstraintSet.load(files["P"]).save(hostile)
    rewrite(hostile, raw_header="[" * 100_000 + "]" * 100_000)
    assert "re-create it" in one_line_error(capsys, ["eval", "--features", files["F"], "--constraints", str(hostile)])
    assert "not a saved constraint set" in one_line_error(capsys, ["eval", "--features", files["F"],
                                                                   "--constraints", files["F"]])
    assert "not a features file" in one_line_error(capsys, ["eval", "--features", files["P"], "--constraints", files["P"]])
    bad = files["tmp"] / "labels12.safetensors"
    H, y = separable(64, 8)
    save_tensors(bad, {"hidden": H, "labels": y + 1}, {"sources": ["a"] * 64})  # labels {1, 2}
    assert "labels must be 0 (safe) or 1 (unsafe)" in one_line_error(capsys, ["eval", "--features", str(bad),
                                                                              "--constraints", files["P"]])
    assert "labels must be 0 (safe) or 1 (unsafe)" in one_line_error(capsys, ["train", "--features", str(bad),
                                                                              "--out", str(files["tmp"] / "x.safetensors")])


def test_eval_writes_strict_json_with_null_for_undefined_auroc(files, capsys):
    one_class = files["tmp"] / "one.safetensors"
    H, _ = separable(16, 8)
    save_tensors(one_class, {"hidden": H, "labels": torch.ones(16, dtype=torch.long)}, {"sources": ["a"] * 16})
    assert main(["eval", "--features", str(one_class), "--constraints", files["P"]]) == 0

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    rows = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert rows["all"]["auroc"] is None and rows["sources"]["a"]["auroc"] is None and rows["all"]["n"] == 16
    assert rows["split"] == "all"


def test_prompt_beyond_the_position_limit_or_without_tokens_is_one_line(tmp_path, capsys):
    from tokenizers import Regex, normalizers

    from conftest import make_tokenizer, save_model_dir

    gpt2 = save_model_dir(tmp_path / "gpt2", "gpt2", make_tokenizer(), layers=2)  # 128 positions
    H, y = separable(64, 32)
    poly = tmp_path / "p.safetensors"
    sf.PolytopeConstraints(32, 2, 16).fit(H, y, progress=False, epochs=1).save(poly)
    line = one_line_error(capsys, ["generate", "bake cookies " * 50, "--model", gpt2, "--constraints", str(poly),
                                   "--layer", "1", "--max-new-tokens", "64"])
    assert "with max_new_tokens 64 that exceeds the model's 128 positions" in line
    tok = make_tokenizer(chat_template=False)
    tok.backend_tokenizer.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")
    dropping = save_model_dir(tmp_path / "dropping", "llama", tok, layers=2)
    data = tmp_path / "p.csv"
    data.write_text("text,label\nbake cookies,0\nsteal car,1\n")
    line = one_line_error(capsys, ["extract", "--model", dropping, "--data", str(data), "--layer", "1",
                                   "--out", str(tmp_path / "f.safetensors")])
    assert "has no tokens" in line
