"""A real full disk (a small tmpfs mounted in an unprivileged user and mount namespace): `safeflow
train --out` and `safeflow extract --cache` end in one line that names the file, says what was
kept and where a retry resumes. Skipped where ``unshare -rm`` is not allowed."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import safeflow as sf
from safeflow.io import save_tensors

from conftest import make_tokenizer, save_model_dir, separable

ROOT = Path(__file__).resolve().parents[1]


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user namespaces (unshare -rm)")


def run_on_full_disk(mount: Path, argv: list[str], tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m safeflow argv`` with a 256 KiB tmpfs at ``mount``, filled up first."""
    mount.mkdir(exist_ok=True)
    script = (f"mount -t tmpfs -o size=256k tmpfs {mount} && "
              f"(dd if=/dev/zero of={mount}/filler bs=4k 2>/dev/null; true) && "
              f"{shlex.quote(sys.executable)} -m safeflow {' '.join(map(shlex.quote, argv))}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir or mount)}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("safeflow: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def features(tmp_path):
    H, y = separable(64, 8)
    path = tmp_path / "features.safetensors"
    save_tensors(path, {"hidden": H, "labels": y}, {"model": "m", "layer": 1})
    return path


def test_train_on_a_full_disk_keeps_the_trained_set_elsewhere(features, tmp_path):
    mount, rescue_dir = tmp_path / "full", tmp_path / "rescue"
    rescue_dir.mkdir()
    argv = ["train", "--features", str(features), "--features-width", "16", "--facets", "2", "--epochs", "2",
            "--out", str(mount / "poly.safetensors")]
    line = assert_one_line(run_on_full_disk(mount, argv, tmpdir=rescue_dir))
    assert f"{mount / 'poly.safetensors'}: No space left on device" in line
    assert "was not written" in line and f"was saved to {rescue_dir}" in line
    rescued = list(rescue_dir.glob("safeflow-rescued-*-poly.safetensors"))
    assert len(rescued) == 1 and str(rescued[0]) in line
    assert sf.ConstraintSet.load(rescued[0]).provenance["layer"] == 1  # a complete, loadable set


def test_train_that_can_write_nowhere_says_the_set_is_lost(features, tmp_path):
    """A file-size limit of 0 (``ulimit -f 0``; Python ignores SIGXFSZ) fails every write, the
    rescue copy in the temporary directory too."""
    out = tmp_path / "poly.safetensors"
    argv = ["train", "--features", str(features), "--features-width", "16", "--facets", "2", "--epochs", "2",
            "--out", str(out)]
    script = f"ulimit -f 0 && {shlex.quote(sys.executable)} -m safeflow {' '.join(map(shlex.quote, argv))}"
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
    line = assert_one_line(result)
    assert f"{out}: File too large" in line and "is lost" in line and "rerun `safeflow train`" in line
    assert not out.exists() and not list(tmp_path.glob("safeflow-rescued-*"))


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("disk")
    model = save_model_dir(base / "model", "llama", make_tokenizer(), layers=2)
    data = base / "p.csv"
    data.write_text("text,label\n" + "".join(f"{w} car,{i % 2}\n" for i, w in enumerate("how do i make a bomb bake "
                                                                                           "cookies".split())))
    return model, data


def test_extract_on_a_full_disk_keeps_the_cache_and_a_retry_resumes(model_and_data, tmp_path):
    model, data = model_and_data
    mount, cache = tmp_path / "full", tmp_path / "cache"
    argv = ["extract", "--model", model, "--data", str(data), "--layer", "1", "--batch-size", "2", "--cache", str(cache)]
    line = assert_one_line(run_on_full_disk(mount, argv + ["--out", str(mount / "f.safetensors")]))
    assert f"{mount / 'f.safetensors'}: No space left on device" in line
    assert f"kept in the cache {cache}" in line and "rerun the same command" in line
    chunks = sorted(cache.rglob("chunk-*.safetensors"))
    assert len(chunks) == 4  # every batch finished before the output failed
    out = tmp_path / "f.safetensors"
    retry = subprocess.run([sys.executable, "-m", "safeflow", *argv, "--out", str(out)], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert retry.returncode == 0, retry.stderr
    assert sorted(cache.rglob("chunk-*.safetensors")) == chunks  # resumed: nothing recomputed
    assert sf.io.load_tensors(out)[0]["hidden"].shape == (8, 32)


def test_extract_with_the_cache_on_a_full_disk_names_the_chunk(model_and_data, tmp_path):
    model, data = model_and_data
    mount = tmp_path / "full"
    argv = ["extract", "--model", model, "--data", str(data), "--layer", "1", "--cache", str(mount / "cache"),
            "--out", str(tmp_path / "f.safetensors")]
    line = assert_one_line(run_on_full_disk(mount, argv))
    assert str(mount / "cache") in line and "No space left on device" in line and "rerun the same command" in line
    assert not (tmp_path / "f.safetensors").exists()
    plain = assert_one_line(run_on_full_disk(mount, argv[:-4] + ["--out", str(mount / "f.safetensors")]))
    assert "no hidden states were kept" in plain and "--cache DIR" in plain
