"""User model directories that cannot be loaded safely: truncated safetensors, pickle-only
weights (never loaded, never a hint to disable ``weights_only``), and models that ship their own
code (``trust_remote_code`` is pinned off, never asked for interactively)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safeflow as sf
from safeflow.cli import main

from conftest import make_model, make_tokenizer, save_model_dir

ROOT = Path(__file__).resolve().parents[1]


def one_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("safeflow: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def model_dir(tmp_path):
    return Path(save_model_dir(tmp_path / "model", "llama", make_tokenizer(), layers=2))


def test_truncated_safetensors_is_one_clear_line(model_dir, tmp_path, capsys):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(sf.ConfigError, match="truncated or corrupted.*save the model again"):
        sf.load_model(str(model_dir))
    line = one_line(capsys, ["extract", "--model", str(model_dir), "--layer", "1", "--out", str(tmp_path / "f.st")])
    assert str(model_dir) in line and "truncated or corrupted" in line


class Payload:
    """Unpickling this would create a file: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_only_weights_are_refused_without_unpickling(model_dir, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    state = make_model("llama", vocab_size=len(make_tokenizer()), layers=2).state_dict()
    (model_dir / "model.safetensors").unlink()
    torch.save({**state, "payload": Payload(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(sf.ConfigError, match=r"only as a pickle \(pytorch_model.bin\).*convert it to safetensors") as info:
        sf.load_model(str(model_dir))
    assert "weights_only" not in str(info.value)
    line = one_line(capsys, ["extract", "--model", str(model_dir), "--layer", "1", "--out", str(tmp_path / "f.st")])
    assert "only as a pickle" in line and "weights_only" not in line
    assert not marker.exists()


@pytest.fixture
def remote_code_dir(model_dir, tmp_path):
    marker = tmp_path / "remote-code-ran"
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="my-own-llama", auto_map={"AutoConfig": "own.OwnConfig", "AutoModelForCausalLM": "own.Own"})
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "own.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return model_dir, marker


def test_model_with_its_own_code_is_refused_naming_the_opt_in(remote_code_dir, tmp_path, capsys):
    path, marker = remote_code_dir
    with pytest.raises(sf.ConfigError, match="ships its own model code.*trust_remote_code=True"):
        sf.load_model(str(path))
    line = one_line(capsys, ["extract", "--model", str(path), "--layer", "1", "--out", str(tmp_path / "f.st")])
    assert "--trust-remote-code" in line
    assert not marker.exists()


def test_model_with_its_own_code_never_prompts_on_a_terminal(remote_code_dir, tmp_path):
    path, marker = remote_code_dir
    controller, terminal = os.openpty()  # stdin is a terminal: transformers would ask there if not pinned
    try:
        result = subprocess.run([sys.executable, "-m", "safeflow", "extract", "--model", str(path), "--layer", "1",
                                 "--out", str(tmp_path / "f.st")], stdin=terminal, capture_output=True, text=True,
                                timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(terminal)
        os.close(controller)
    assert result.returncode == 2, result.stderr
    assert "custom code" not in result.stdout and "[y/N]" not in result.stdout
    assert "--trust-remote-code" in result.stderr.splitlines()[-1]
    assert not marker.exists()
