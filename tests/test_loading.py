"""Hostile and damaged files: the loader raises CorruptFileError (never anything else), checks the
config against the file's own tensor shapes before building anything, refuses NaN and non-float
parameters, and saves with the right mode, cleaning up temp files of killed saves."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import safeflow as sf
from safeflow.errors import CorruptFileError
from safeflow.io import load_tensors, read_header, save_tensors

from conftest import separable

ROOT = Path(__file__).resolve().parents[1]


def fitted_polytope(d=8, K=3, F=32):
    H, y = separable(64, d)
    return sf.PolytopeConstraints(d, K, F).fit(H, y, progress=False, epochs=2, margin=1.0, feature_l1=0.01)


def saved(tmp_path, model=None, name="c.safetensors"):
    path = tmp_path / name
    (model or fitted_polytope()).save(path)
    return path


def parts(path):
    """(tensors, safeflow header string) of a saved file."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta["safeflow"]


def rewrite(path, tensors=None, header=None, raw_header=None):
    """Write ``path`` again with replaced tensors and/or safeflow header (a dict, or raw text)."""
    old_tensors, old_header = parts(path)
    text = raw_header if raw_header is not None else json.dumps(header) if header is not None else old_header
    save_file(tensors if tensors is not None else old_tensors, str(path), metadata={"safeflow": text})


class PeakMemory:
    """Growth of the process's peak resident memory over a block (Linux: /proc/self/clear_refs)."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident memory")
        self.start = self._kb("VmRSS")
        return self

    def __exit__(self, *exc):
        self.growth = (self._kb("VmHWM") - self.start) * 1024

    @staticmethod
    def _kb(key):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1])


# --- headers ---------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [
    "[" * 100_000 + "]" * 100_000,  # RecursionError in json
    '{"a":' * 100_000 + "1" + "}" * 100_000,
    '{"type": "polytope", "format_version": 2, "config": {"input_dim": 1' + "0" * 5000 + "}}",  # int too long
    '{"type": "polytope", "format_version": 2, "config": {"input_dim": 1e999, "num_facets": 3}}',
    "not json", "[1, 2]", "",
])
def test_malformed_safeflow_headers_are_corrupt_files(tmp_path, raw):
    path = saved(tmp_path)
    rewrite(path, raw_header=raw)
    with pytest.raises(CorruptFileError) as info:
        sf.ConstraintSet.load(path)
    assert str(path) in str(info.value) and len(str(info.value)) < 600


def test_config_is_checked_against_the_file_before_anything_is_built(tmp_path):
    """A 1 KB file claiming input_dim 16000 used to build the object (1.3 GB) before comparing."""
    path = saved(tmp_path)
    tensors, header = parts(path)
    for claim in (16_000, 100_000, 10**12):
        h = json.loads(header)
        h["config"]["input_dim"] = claim
        rewrite(path, header=h)
        with PeakMemory() as peak, pytest.raises(CorruptFileError, match="needs|does not build"):
            sf.ConstraintSet.load(path)
        assert peak.growth < 32 * 2**20, peak.growth


@pytest.mark.parametrize("damage", ["nan", "inf", "int64", "bool_as_float", "bool_bytes"])
def test_non_finite_or_non_float_parameters_are_refused(tmp_path, damage):
    path = saved(tmp_path)
    tensors, _ = parts(path)
    if damage == "nan":
        tensors["facets"][0, 3] = float("nan")
    elif damage == "inf":
        tensors["input_covariance"][1, 1] = float("inf")
    elif damage == "int64":
        tensors["thresholds"] = tensors["thresholds"].round().long()
    elif damage == "bool_as_float":
        tensors["fitted"] = torch.tensor(1.0)
    else:
        tensors["fitted"] = torch.tensor(7, dtype=torch.uint8).view(torch.bool)
    rewrite(path, tensors=tensors)
    with pytest.raises(CorruptFileError, match="NaN/inf|needs|boolean"):
        sf.ConstraintSet.load(path)


def test_parameters_saved_in_half_precision_load_as_float32(tmp_path):
    model = fitted_polytope()
    path = saved(tmp_path, model.half())
    loaded = sf.ConstraintSet.load(path)
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded.facets, model.facets.float())


def test_unknown_type_names_the_file(tmp_path):
    path = saved(tmp_path)
    h = json.loads(parts(path)[1])
    h["type"] = "hypercube"
    rewrite(path, header=h)
    with pytest.raises(CorruptFileError, match="unknown constraint-set type 'hypercube'") as info:
        sf.ConstraintSet.load(path)
    assert str(path) in str(info.value)


def test_directory_is_not_reported_missing(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        sf.ConstraintSet.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sf.ConstraintSet.load(tmp_path / "nope.safetensors")


def test_features_file_loaded_as_constraint_set_gives_a_short_message(tmp_path):
    path = tmp_path / "features.safetensors"
    save_tensors(path, {"hidden": torch.randn(4, 8), "labels": torch.tensor([0, 1, 0, 1])},
                 {"model": "m", "layer": 2, "sources": ["some-long-source-name"] * 2000})  # ~48,000 characters
    with pytest.raises(CorruptFileError, match="not a saved constraint set") as info:
        sf.ConstraintSet.load(path)
    assert len(str(info.value)) < 400


def test_safetensors_layout_is_checked_before_reading_tensors(tmp_path):
    path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    doc = json.loads(data[8:8 + n])
    doc["facets"]["shape"] = [10**6, 10**6]  # claims 4 TB
    header = json.dumps(doc).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(data[8 + n:]))
    with pytest.raises(CorruptFileError, match="does not fit the file"):
        read_header(path)
    path.write_bytes((2**62).to_bytes(8, "little") + bytes(data[8:]))
    with pytest.raises(CorruptFileError, match="exceeds the file"):
        load_tensors(path)


def _mutations(base: bytes, rng: random.Random):
    """Mutated copies of a valid file: raw byte flips, truncation, header edits, tensor bits."""
    n = int.from_bytes(base[:8], "little")
    doc = json.loads(base[8:8 + n])
    data = base[8 + n:]
    hostile = [0, -1, 1, 3, 2**31, 2**63, 10**30, 1e308, float("inf"), "x", None, True, [], {}, [1] * 50, {"a": 1}]

    def pack(d, body=data):
        text = json.dumps(d).encode()
        return len(text).to_bytes(8, "little") + text + body

    for i in range(400):
        kind = i % 6
        if kind == 0:  # flip bytes anywhere
            b = bytearray(base)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            yield bytes(b)
        elif kind == 1:  # truncate or extend
            yield base[:rng.randrange(len(base))] if rng.random() < 0.7 else base + bytes(rng.randrange(1, 64))
        elif kind == 2:  # edit the safeflow header (config, type, version)
            d = json.loads(json.dumps(doc))
            sf_header = json.loads(d["__metadata__"]["safeflow"])
            target = rng.choice([sf_header, sf_header["config"], sf_header["config"]])
            key = rng.choice(list(target) + ["extra"])
            if rng.random() < 0.15:
                target.pop(key, None)
            else:
                target[key] = rng.choice(hostile)
            d["__metadata__"]["safeflow"] = json.dumps(sf_header)
            yield pack(d)
        elif kind == 3:  # edit a tensor entry of the safetensors header
            d = json.loads(json.dumps(doc))
            name = rng.choice([k for k in d if k != "__metadata__"])
            field = rng.choice(["dtype", "shape", "data_offsets", None])
            if field is None:
                del d[name]
            elif field == "dtype":
                d[name]["dtype"] = rng.choice(["F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F32", "X9", 3])
            elif field == "shape":
                d[name]["shape"] = rng.choice([[], [0], [10**9], [2**62, 4], [-1], [1.5], "ab"] + [
                    [rng.randrange(1, 70) for _ in range(rng.randint(1, 3))]])
            else:
                a, b = d[name]["data_offsets"]
                d[name]["data_offsets"] = rng.choice([[b, a], [a, a], [0, b], [a, b + 4], [a, 2**60], [-4, b]])
            yield pack(d)
        elif kind == 4:  # overwrite float32 words of the tensor data with NaN/inf/random bits
            body = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(0, len(body) - 4, 4)
                body[at:at + 4] = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", rng.randbytes(4)])
            yield pack(doc, bytes(body))
        else:  # a whole new, valid-looking safeflow header with hostile sizes
            d = json.loads(json.dumps(doc))
            sf_header = json.loads(d["__metadata__"]["safeflow"])
            for key in list(sf_header["config"]):
                if rng.random() < 0.5:
                    sf_header["config"][key] = rng.choice([10**5, 16_000, 10**9, 2**40, 0, -3])
            d["__metadata__"]["safeflow"] = json.dumps(sf_header)
            yield pack(d)


@pytest.mark.parametrize("kind", ["polytope", "mlp"])
def test_loader_fuzz_raises_only_corrupt_file_errors_with_bounded_memory(tmp_path, kind):
    """400 seeded mutations of a valid file: CorruptFileError or a finite, loaded constraint set —
    never another exception — and peak memory never grows by more than a few times the file size."""
    H, y = separable(64, 64)
    model = (sf.PolytopeConstraints(64, 4, 2048) if kind == "polytope" else sf.MLPConstraint(64, [512, 256]))
    model.fit(H, y, progress=False, epochs=1)
    path = saved(tmp_path, model)
    base = path.read_bytes()
    bound = 8 * len(base) + 48 * 2**20
    rng = random.Random(1234)
    outcomes = {"corrupt": 0, "loaded": 0}
    for i, blob in enumerate(_mutations(base, rng)):
        path.write_bytes(blob)
        with PeakMemory() as peak:
            try:
                loaded = sf.ConstraintSet.load(path)
            except CorruptFileError:
                outcomes["corrupt"] += 1
            else:
                outcomes["loaded"] += 1
                assert all(torch.isfinite(t).all() for t in loaded.state_dict().values() if t.is_floating_point())
        assert peak.growth < bound, (i, peak.growth, len(base))
    assert outcomes["corrupt"] > 250 and outcomes["loaded"] > 0, outcomes


# --- saving ----------------------------------------------------------------------------
def test_saved_files_follow_the_umask_and_keep_an_overwritten_mode(tmp_path):
    model = fitted_polytope()
    old = os.umask(0o022)
    try:
        model.save(tmp_path / "a.safetensors")
        assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o644
        os.umask(0o077)
        model.save(tmp_path / "b.safetensors")
        assert stat.S_IMODE((tmp_path / "b.safetensors").stat().st_mode) == 0o600
        os.chmod(tmp_path / "a.safetensors", 0o640)
        model.save(tmp_path / "a.safetensors")  # overwrite keeps 0640 whatever the umask
        assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o640
    finally:
        os.umask(old)


KILLED_SAVE = """
import os, signal, sys
import safeflow.io as io
def die(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)
io.save_file = die
io.save_tensors(sys.argv[1], {}, {})
"""


def test_temp_files_of_a_killed_save_are_cleaned_up_by_the_next_save(tmp_path):
    model = fitted_polytope()
    target = tmp_path / "c.safetensors"
    model.save(target)
    before = target.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    orphans = [p for p in tmp_path.iterdir() if p.name.startswith(".c.safetensors.")]
    assert len(orphans) == 1 and target.read_bytes() == before  # killed mid-save: old file intact, temp left
    live = tmp_path / f".c.safetensors.{os.getpid()}.0000.tmp"  # a save in progress in a live process
    live.write_bytes(b"")
    other = tmp_path / ".d.safetensors.1.0000.tmp"  # another target's temp file
    other.write_bytes(b"")
    model.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c.safetensors", live.name, other.name])
    assert isinstance(sf.ConstraintSet.load(target), sf.PolytopeConstraints)


def test_format_2_files_load_without_safe_depth_and_are_still_checked(tmp_path):
    from safeflow.constraints.base import UNKNOWN_DEPTH

    model = fitted_polytope()
    path = saved(tmp_path, model)
    tensors, header = parts(path)
    del tensors["safe_depth"]
    h = json.loads(header)
    h["format_version"] = 2
    rewrite(path, tensors=tensors, header=h)
    loaded = sf.ConstraintSet.load(path)
    assert float(loaded.safe_depth) == UNKNOWN_DEPTH and torch.equal(loaded.facets, model.facets)
    h["config"]["input_dim"] = 16_000
    rewrite(path, header=h)
    with pytest.raises(CorruptFileError, match="needs"):
        sf.ConstraintSet.load(path)


def test_save_under_a_path_whose_parent_is_a_file_names_the_file(tmp_path):
    H, y = separable(32, 8)
    poly = sf.PolytopeConstraints(8, 2, 16).fit(H, y, progress=False, epochs=1)
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    for target in (plain / "poly.safetensors", plain / "deeper" / "poly.safetensors"):
        with pytest.raises(NotADirectoryError, match="is a file, not a directory") as info:
            poly.save(target)
        assert info.value.filename == str(plain)
