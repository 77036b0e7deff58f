"""Extraction throughput on the default model, and polytope training step time at F = 16384."""

import pytest
import torch

import safeflow as sf

from conftest import LAYER, record


@pytest.mark.parametrize("batch_size", [1, 16])
def test_extraction_throughput(benchmark, default_model, prompts, batch_size):
    model, tok = default_model
    texts = prompts.texts[::60][:32]
    ext = sf.HFExtractor(model, tok, layer=LAYER, batch_size=batch_size, progress=False)
    benchmark.pedantic(ext.extract, args=(texts,), rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, f"extract per prompt, batch {batch_size:2d}", per=len(texts))
    benchmark.extra_info["prompts_per_s"] = len(texts) / benchmark.stats.stats.median


def test_polytope_training_step(benchmark):
    torch.manual_seed(0)
    d, F, K, B = 576, 16384, 14, 128
    H, y = torch.randn(4 * B, d), torch.arange(4 * B) % 2
    poly = sf.PolytopeConstraints(d, K, F)
    # one epoch of 4 Adam steps on batches of 128 (the loop the paper's settings run)
    benchmark.pedantic(lambda: poly.fit(H, y, epochs=1, progress=False), rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, "polytope train step (B=128, F=16384)", per=4)
