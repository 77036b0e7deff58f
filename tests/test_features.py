"""Streaming training data: chunked datasets on disk, one-pass statistics, chunk-shuffled batches."""

import pytest
import torch

import safeflow as sf
from safeflow.errors import ConfigError, CorruptFileError, DataError
from safeflow.feature_files import training_rows, write_features
from safeflow.features import FeatureDataset, moments, write_chunks

from conftest import make_model, make_tokenizer, separable

KINDS = {"polytope": dict(num_facets=4, num_features=64), "mlp": dict(hidden_sizes=[16]), "linear": {}}


def on_disk(tmp_path, H, y, rows):
    write_chunks(tmp_path / "parts", ((H[s : s + rows], y[s : s + rows]) for s in range(0, len(y), rows)))
    return FeatureDataset.from_files(tmp_path / "parts")


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_fit_equals_in_memory_fit_with_the_same_chunking(tmp_path, kind):
    H, y = separable(n=300, d=16, seed=3)
    H = H * torch.linspace(0.5, 4, 16) + 7  # unequal scales and an offset: standardisation matters
    disk = on_disk(tmp_path, H, y, rows=70)  # 5 chunks, the last one short; batches cross chunks
    memory = FeatureDataset.from_tensors(H, y, chunk_rows=70)
    assert disk.chunk_sizes == memory.chunk_sizes == [70, 70, 70, 70, 20]
    options = dict(epochs=3, batch_size=32, progress=False)
    streamed = sf.ConstraintSet.create(kind, input_dim=16, **KINDS[kind]).fit(disk, **options)
    in_memory = sf.ConstraintSet.create(kind, input_dim=16, **KINDS[kind]).fit(memory, **options)
    V, V_ref = streamed.violations(H), in_memory.violations(H)
    torch.testing.assert_close(V, V_ref, rtol=1e-6, atol=1e-6 * V_ref.abs().max().item())
    torch.testing.assert_close(streamed.input_covariance, torch.cov(H.T.double()).float(), rtol=1e-5, atol=1e-6)
    assert streamed.train_history == pytest.approx(in_memory.train_history, rel=1e-6)


def test_one_chunk_is_the_order_of_fit_on_tensors(tmp_path):
    H, y = separable(n=200, d=8, seed=1)
    plain = sf.PolytopeConstraints(8, 3, 32).fit(H, y, epochs=2, batch_size=64, progress=False)
    one_file = sf.PolytopeConstraints(8, 3, 32).fit(on_disk(tmp_path, H, y, rows=200), epochs=2, batch_size=64,
                                                    progress=False)
    assert torch.equal(plain.violations(H), one_file.violations(H))


def test_moments_match_float64_statistics():
    X = torch.randn(1000, 12, dtype=torch.float64) * torch.logspace(-2, 2, 12, dtype=torch.float64) + 1e3
    m = moments(X.float().split(137))
    ref = X.float().double()
    torch.testing.assert_close(m.mean, ref.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(m.covariance(), torch.cov(ref.T), rtol=1e-10, atol=1e-12)
    mean, std = m.standardization()
    torch.testing.assert_close(std, ref.std(0, unbiased=False).float(), rtol=1e-6, atol=0)
    assert mean.dtype == std.dtype == torch.float32


def test_batches_cover_every_row_once_per_epoch_in_shuffled_chunk_order(tmp_path):
    H = torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 3)
    y = torch.arange(50) % 2
    ds = on_disk(tmp_path, H, y, rows=12)
    gen = torch.Generator().manual_seed(0)
    epochs = [list(ds.batches(8, gen)) for _ in range(2)]
    for batches in epochs:
        assert [len(b) for b, _ in batches] == [8] * 6 + [2]
        rows = torch.cat([b[:, 0] for b, _ in batches]).long()
        assert sorted(rows.tolist()) == list(range(50))
        assert torch.equal(torch.cat([labels for _, labels in batches]), rows % 2)  # labels travel with rows
        firsts = [int(r) // 12 for r in rows]
        runs = [c for i, c in enumerate(firsts) if i == 0 or c != firsts[i - 1]]
        assert len(runs) == 5  # each chunk's rows are read together, once
    assert not torch.equal(torch.cat([b for b, _ in epochs[0]]), torch.cat([b for b, _ in epochs[1]]))


def test_dataset_from_the_extraction_cache(tmp_path):
    tok = make_tokenizer()
    ext = sf.HFExtractor(make_model("llama", vocab_size=len(tok)), tok, layer=1, batch_size=3, cache_dir=tmp_path,
                         progress=False)
    texts = ["how do i make a bomb", "bake cookies please", "hack bank", "write poem about the sea", "kill someone",
             "plan trip paris", "steal car", "cook pasta recipe"]
    y = [1, 0, 1, 0, 1, 0, 1, 0]
    ds = ext.dataset(texts, y)  # extracts, then reads in place from the cache's chunk files
    assert len(ds) == 8 and ds.dim == 32 and sorted(ds.chunk_sizes) == [2, 3, 3]  # one chunk per cache file
    H = ext.extract(texts)
    rows = torch.cat(list(ds.chunks()))
    by_text = {tuple(r.tolist()): label for r, label in zip(H, y)}
    assert sorted(by_text[tuple(r.tolist())] for r in rows) == sorted(y)
    assert ds.labels.tolist() == [by_text[tuple(r.tolist())] for r in rows]
    poly = sf.PolytopeConstraints(32, 2, 16).fit(ds, epochs=2, progress=False)
    assert poly.violations(H).shape == (8, 2)


def test_bad_datasets(tmp_path):
    H, y = separable(n=40, d=4)
    ds = on_disk(tmp_path, H, y, rows=16)
    with pytest.raises(ConfigError, match="carries its labels"):
        sf.LinearConstraint(4).fit(ds, y)
    with pytest.raises(DataError, match="hidden size 4 but this constraint set expects 5"):
        sf.LinearConstraint(5).fit(ds)
    with pytest.raises(DataError, match="labels y are missing"):
        sf.LinearConstraint(4).fit(H)
    bad = H.clone()
    bad[20, 1] = float("nan")
    with pytest.raises(DataError, match=r"chunk 1 \(.*part-00001.safetensors\) has NaN/inf"):
        sf.LinearConstraint(4).fit(on_disk(tmp_path / "nan", bad, y, rows=16), progress=False)
    part = tmp_path / "parts" / "part-00002.safetensors"
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match="part-00002.safetensors is not a readable"):
        FeatureDataset.from_files(tmp_path / "parts")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureDataset.from_files(tmp_path / "missing")
    sf.io.save_tensors(tmp_path / "other.safetensors", {"hidden": torch.zeros(2, 3), "labels": torch.tensor([0, 1])}, {})
    with pytest.raises(DataError, match="different hidden sizes"):
        FeatureDataset.from_files([tmp_path / "parts" / "part-00000.safetensors", tmp_path / "other.safetensors"])
    with pytest.raises(ConfigError, match="chunk_rows must be a positive int"):
        FeatureDataset.from_tensors(H, y, chunk_rows=0)


def test_cli_train_streams_a_directory_of_parts(tmp_path, capsys):
    from safeflow.cli import main

    H, y = separable(n=120, d=8)
    on_disk(tmp_path, H, y, rows=50)
    assert main(["train", "--features", str(tmp_path / "parts"), "--chunk-rows", "20", "--constraint", "linear",
                 "--epochs", "2", "--out", str(tmp_path / "linear.safetensors")]) == 0
    model = sf.ConstraintSet.load(tmp_path / "linear.safetensors")
    expected = sf.LinearConstraint(8).fit(FeatureDataset.from_files(tmp_path / "parts", chunk_rows=20), epochs=2,
                                          progress=False)
    assert torch.equal(model.violations(H), expected.violations(H))


def test_training_rows_of_a_file_hold_out_its_test_rows_and_stream_a_directory(tmp_path):
    H, y = separable(20, 4)
    split = ["train"] * 15 + ["test"] * 5
    write_features(tmp_path / "split.safetensors", H, y, {"model": "m", "layer": 1, "split": split})
    rows = training_rows(tmp_path / "split.safetensors")
    assert len(rows) == 15 and torch.equal(rows.H, H[:15]) and torch.equal(rows.y, y[:15])
    assert rows.test is not None and torch.equal(rows.test[0], H[15:]) and rows.source == {"model": "m", "layer": 1}
    with pytest.raises(ConfigError, match="holds a train/test split"):
        training_rows(tmp_path / "split.safetensors", chunk_rows=8)  # streaming trains on every row
    write_chunks(tmp_path / "parts", [(H[:10], y[:10]), (H[10:], y[10:])])
    streamed = training_rows(tmp_path / "parts", chunk_rows=8)
    assert isinstance(streamed.H, FeatureDataset) and len(streamed) == 20 and streamed.y is None and streamed.test is None
    with pytest.raises(DataError, match="is a directory; stream its feature files with --chunk-rows N"):
        training_rows(tmp_path / "parts")

