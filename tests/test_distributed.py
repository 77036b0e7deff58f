"""Extraction across processes: real process groups (gloo, CPU) of two ranks on tiny from-config models.

Each test launches two fresh processes with :func:`safeflow.distributed.launch` (a few seconds of
start-up each); a worker writes what its rank saw to ``out/rank<r>.safetensors`` or ``.err``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import safeflow as sf
from safeflow import distributed
from safeflow.cache import HiddenStateCache
from safeflow.errors import ConfigError, DataError, SafeflowError
from safeflow.io import load_tensors, save_tensors
from safeflow.recipes import layer_sweep
from safeflow.splits import Splits

from conftest import make_model, make_tokenizer

WORDS = "how do i make a bomb bake cookies write poem about the sea tell me steal car hack bank explain rain".split()
TEXTS = [" ".join(WORDS[(5 * i + 3 * j) % len(WORDS)] for j in range(1 + i % 5)) for i in range(22)]  # 22 distinct
HARM, SAFE = TEXTS[:6], TEXTS[6:12]
LAYER = 2


def extractor(cache_dir=None, layer=LAYER, batch_size=3):
    tok = make_tokenizer()
    model = make_model("qwen2", vocab_size=len(tok), seed=4)
    return sf.HFExtractor(model, tok, layer=layer, batch_size=batch_size, cache_dir=cache_dir, progress=False)


def counting(ext):
    """Count the rows the extractor computes (prompt rows through _forward)."""
    ext.rows_computed = 0
    original = ext._forward

    def forward(prompts, layers):
        ext.rows_computed += len(prompts)
        return original(prompts, layers)

    ext._forward = forward
    return ext


def prompt_splits() -> Splits:
    ps = lambda texts: sf.PromptSet(texts, [1] * (len(texts) // 2) + [0] * (len(texts) - len(texts) // 2))
    return Splits(train=ps(TEXTS[:12]), test_id=ps(TEXTS[12:18]), val_ood=ps(TEXTS[18:22]), test_ood=ps(TEXTS[:4]))


@pytest.fixture(autouse=True)
def one_thread():
    """The reference runs with one thread, as each rank does: on CPU a matrix product's rounding
    depends on how many threads split it, so "identical" holds for equal thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- workers (module level: the spawned processes import them) ------------------------------
def work(out: str, cache: str, scenario: str, model_dir: str = "") -> int:
    """One rank of a test run. ``everything``: prompt states, response states, a layer sweep, then
    three kinds of bad input; ``die``: rank 1 dies hard in its second batch (model from ``model_dir``)."""
    torch.set_num_threads(1)
    world = distributed.current()
    result: dict[str, torch.Tensor] = {}
    header: dict[str, object] = {}
    if scenario == "die":
        model, tok = sf.load_model(model_dir, progress=False)
        ext = counting(sf.HFExtractor(model, tok, layer=LAYER, batch_size=3, cache_dir=cache, progress=False))
        forward = ext._forward

        def dying(prompts, layers):
            if world.rank == 1 and ext.rows_computed >= 3:
                os._exit(17)
            return forward(prompts, layers)

        ext._forward = dying
        ext.extract(TEXTS)
        return 0
    ext = counting(extractor(cache))
    result["H"] = ext.extract(TEXTS)
    states = sf.response_states(ext, HARM, SAFE, max_tokens=3, batch_size=4)
    result.update(R=states.H, Ry=states.y)
    rows = layer_sweep(ext, prompt_splits(), [0, 1, 3], progress=False)
    result["sweep"] = torch.tensor([[r["val_ood_auroc"], r["test_id_f1"]] for r in rows], dtype=torch.float64)
    header["computed"] = ext.rows_computed
    # bad input: every rank must raise the same error, and the group stays usable afterwards
    other_layer = extractor(cache, layer=1 if world.rank == 1 else LAYER)
    private = extractor(Path(cache) / "private" if world.rank == 1 else cache, layer=3)  # like a node-local disk
    for name, call in (("fingerprint", lambda: other_layer.extract(TEXTS[:4])),
                       ("texts", lambda: ext.extract(TEXTS[:4] if world.rank == 0 else TEXTS[1:5])),
                       ("private", lambda: private.extract(TEXTS[:8]))):
        try:
            call()
            header[name] = "no error"
        except SafeflowError as exc:
            header[name] = f"{type(exc).__name__}: {exc}"
    save_tensors(Path(out, f"rank{world.rank}.safetensors"), result, header)
    return 0


def cached_rows(cache_dir: Path) -> int:
    return sum(len(load_tensors(p)[1]["keys"]) for p in cache_dir.rglob("chunk-*.safetensors"))


# --- tests ------------------------------------------------------------------------------------
def test_two_processes_equal_one_process_and_refuse_bad_input(tmp_path):
    one = extractor()
    reference = one.extract(TEXTS)
    states = sf.response_states(one, HARM, SAFE, max_tokens=3, batch_size=4)
    sweep = layer_sweep(one, prompt_splits(), [0, 1, 3], progress=False)
    assert distributed.launch(work, 2, str(tmp_path), str(tmp_path / "cache"), "everything", cpu=True) == 0
    computed = []
    for rank in (0, 1):  # every rank returns every row, in input order, identical to one process
        got, header = load_tensors(tmp_path / f"rank{rank}.safetensors")
        assert torch.equal(got["H"], reference)
        assert torch.equal(got["R"], states.H) and torch.equal(got["Ry"], states.y)
        assert got["sweep"].tolist() == [[r["val_ood_auroc"], r["test_id_f1"]] for r in sweep]
        computed.append(header["computed"])
        assert header["fingerprint"].startswith("ConfigError: ranks disagree")
        assert "layers: '[2]' on rank 0, '[1]' on rank 1" in header["fingerprint"]
        assert header["texts"].startswith("DataError: rank 1 was given other texts than rank 0")
        assert header["private"].startswith("DataError: after every rank finished")
        assert "should have written" in header["private"] and "filesystem every process sees" in header["private"]
    # each prompt row was computed once, by one rank: 22 for extract, 22 more for the sweep's layers
    assert sum(computed) == 2 * len(TEXTS) and min(computed) > 0
    writers = {p.name.split("-")[1] for p in (tmp_path / "cache").rglob("chunk-*.safetensors")}
    assert writers == {"r0000", "r0001"}  # both ranks wrote chunks, tagged with their rank
    assert torch.equal(extractor(tmp_path / "cache").cached(TEXTS), reference)


def test_killed_rank_costs_only_its_unfinished_chunk_and_the_cli_resumes(tmp_path, capsys):
    """Rank 1 dies hard mid-run; ``safeflow extract --processes 2`` then computes only the missing
    rows and writes the same file as a single-process run."""
    from safeflow.cli import main

    tok = make_tokenizer()
    model_dir = tmp_path / "tiny"
    make_model("qwen2", vocab_size=len(tok), seed=4).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cache = tmp_path / "cache"
    assert distributed.launch(work, 2, str(tmp_path), str(cache), "die", str(model_dir), cpu=True) == 17
    before = set(cache.rglob("chunk-*.safetensors"))
    kept = cached_rows(cache)
    assert 3 <= kept < len(TEXTS)  # rank 1's finished batch (and whatever rank 0 finished) survived

    data = tmp_path / "prompts.csv"
    data.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(TEXTS)))
    common = ["extract", "--model", str(model_dir), "--data", str(data), "--layer", str(LAYER), "--batch-size", "3",
              "--cpu"]
    assert main([*common, "--out", str(tmp_path / "two.safetensors"), "--processes", "2"]) == 2
    assert "pass --cache DIR" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "two.safetensors"), "--processes", "2", "--cache", str(cache)]) == 0
    new = set(cache.rglob("chunk-*.safetensors")) - before
    assert sum(len(load_tensors(p)[1]["keys"]) for p in new) == len(TEXTS) - kept  # only the missing rows
    assert main([*common, "--out", str(tmp_path / "one.safetensors")]) == 0
    one, one_header = load_tensors(tmp_path / "one.safetensors")
    two, two_header = load_tensors(tmp_path / "two.safetensors")
    # the resumed rows were batched differently from a fresh run: equal up to float rounding
    torch.testing.assert_close(two["hidden"], one["hidden"], rtol=1e-5, atol=1e-6)
    assert torch.equal(one["labels"], two["labels"]) and one_header == two_header


# --- the cache on its own (one process) -------------------------------------------------------
def test_cache_refuses_chunks_of_another_extraction(tmp_path):
    extractor(tmp_path, layer=1).extract(TEXTS[:6])
    extractor(tmp_path, layer=2).extract(TEXTS[:6])
    layer1, layer2 = sorted((p for p in tmp_path.iterdir()), key=lambda p: "[2]" in (p / "fingerprint.json").read_text())
    chunk = next(layer1.glob("chunk-*.safetensors"))
    shutil.copy(chunk, layer2 / "chunk-r0009-copied.safetensors")
    with pytest.raises(DataError, match=r"another extraction \(layers: '\[1\]' here, '\[2\]' wanted\)"):
        extractor(tmp_path, layer=2).extract(TEXTS[:6])
    # a whole cache directory of another extraction moved under this one's name
    (layer2 / "chunk-r0009-copied.safetensors").unlink()
    shutil.rmtree(layer2)
    shutil.copytree(layer1, layer2)
    with pytest.raises(DataError, match="belongs to another extraction"):
        extractor(tmp_path, layer=2).extract(TEXTS[:6])


def test_cache_recomputes_a_truncated_chunk(tmp_path, caplog):
    reference = extractor(tmp_path).extract(TEXTS[:6])
    chunk = next(tmp_path.rglob("chunk-*.safetensors"))
    chunk.write_bytes(chunk.read_bytes()[:-40])  # a crash mid-copy
    ext = counting(extractor(tmp_path))
    again = ext.extract(TEXTS[:6])
    assert ext.rows_computed == 3  # one batch of 3 rows, recomputed
    assert torch.equal(again, reference)
    assert "unreadable" in caplog.text and chunk.with_name(chunk.name + ".corrupt").is_file()


def test_cache_indexes_headers_and_reads_rows_lazily(tmp_path):
    cache = HiddenStateCache(tmp_path, {"model": "m"})
    rows = torch.randn(5, 2, 4)
    cache.add(["a", "b"], list(rows[:2]))
    cache.add(["c", "d", "e"], list(rows[2:]))
    reopened = HiddenStateCache(tmp_path, {"model": "m"})
    assert len(reopened) == 5 and reopened.missing(["e", "x", "a", "x"]) == ["x"]
    assert torch.equal(torch.stack(reopened.read(["e", "a", "c"])), rows[[4, 0, 2]])
    with pytest.raises(DataError, match="1 of 2 rows are not in the cache"):
        reopened.read(["a", "x"])
    ragged = HiddenStateCache(tmp_path, {"model": "m", "rows": "responses"}, ragged=True)
    ragged.add(["p", "q"], [torch.ones(3, 4), torch.zeros(1, 4)])
    p, q = HiddenStateCache(tmp_path, {"model": "m", "rows": "responses"}, ragged=True).read(["p", "q"])
    assert p.shape == (3, 4) and q.shape == (1, 4) and torch.equal(p, torch.ones(3, 4))


def test_assign_balances_and_is_deterministic():
    owners = distributed.assign([5, 1, 4, 2, 3, 3], 2)
    loads = [sum(c for c, o in zip([5, 1, 4, 2, 3, 3], owners) if o == r) for r in (0, 1)]
    assert loads == [9, 9] and owners == distributed.assign([5, 1, 4, 2, 3, 3], 2)
    assert distributed.assign([1, 1, 1], 1) == [0, 0, 0]
    assert distributed.gpu_share(1, 2, 8) == [4, 5, 6, 7] and distributed.gpu_share(3, 4, 2) == [1]


def test_extraction_without_a_cache_cannot_span_processes():
    with pytest.raises(ConfigError, match="must be >= 1"):
        distributed.launch(work, 0)
    with pytest.raises(ConfigError, match="cache_dir, which is None"):
        extractor().fill_cache(TEXTS[:2])
