"""Scale-out: extraction in 2 processes × 1 thread vs 1 process × 1 thread on the default model.

Target (issue 13): >= 1.7x the throughput with the same rows. Both runs start fresh processes
(:func:`safeflow.distributed.launch`) and time only the extraction itself, between two barriers,
after a warm-up batch; start-up (imports, model load, process group) is reported separately.
The machine's load average is recorded: other jobs on the same cores lower the 2-process figure.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

import safeflow as sf
from safeflow import distributed

from conftest import LAYER, MEDIANS

PROMPTS = 64
BATCH = 8


def extraction_worker(out: str, cache: str, texts: list[str], started: float) -> int:
    """Load the default model, warm up, then time ``fill_cache(texts)`` between barriers."""
    torch.set_num_threads(1)
    world = distributed.current()
    model, tok = sf.load_model(progress=False)
    sf.HFExtractor(model, tok, layer=LAYER, batch_size=BATCH, progress=False, distributed=False).extract(texts[:BATCH])
    ext = sf.HFExtractor(model, tok, layer=LAYER, batch_size=BATCH, cache_dir=cache, progress=False)
    world.barrier()
    t0 = time.time()
    ext.fill_cache(texts)
    world.barrier()
    t1 = time.time()
    if world.is_main:
        Path(out).write_text(json.dumps({"startup_s": t0 - started, "extract_s": t1 - t0}))
    return 0


def _run(tmp_path: Path, nprocs: int, texts: list[str], tag: str) -> dict[str, float]:
    out, cache = tmp_path / f"{tag}.json", tmp_path / f"cache-{tag}"
    assert distributed.launch(extraction_worker, nprocs, str(out), str(cache), texts, time.time()) == 0
    return json.loads(out.read_text())


def test_extraction_two_processes_vs_one(benchmark, default_model, prompts, tmp_path):
    model, tok = default_model
    texts = prompts.texts[::17][:PROMPTS]
    rounds: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    load = [os.getloadavg()[0]]

    def pair() -> None:
        i = len(rounds[1])
        for n in (1, 2):
            rounds[n].append(_run(tmp_path, n, texts, f"p{n}-r{i}"))
        load.append(os.getloadavg()[0])

    benchmark.pedantic(pair, rounds=3, iterations=1)
    # same rows: both caches hold exactly the single-process rows
    one = sf.HFExtractor(model, tok, layer=LAYER, cache_dir=tmp_path / "cache-p1-r0", progress=False).cached(texts)
    two = sf.HFExtractor(model, tok, layer=LAYER, cache_dir=tmp_path / "cache-p2-r0", progress=False).cached(texts)
    assert torch.equal(one, two)
    t1 = statistics.median(r["extract_s"] for r in rounds[1])
    t2 = statistics.median(r["extract_s"] for r in rounds[2])
    MEDIANS["extract 64 prompts, 1 process x 1 thread"] = t1
    MEDIANS["extract 64 prompts, 2 processes x 1 thread"] = t2
    MEDIANS["process start-up (2 processes, median)"] = statistics.median(r["startup_s"] for r in rounds[2])
    benchmark.extra_info.update(speedup=t1 / t2, prompts_per_s_1=len(texts) / t1, prompts_per_s_2=len(texts) / t2,
                                load_average=load, rounds={str(k): v for k, v in rounds.items()})
    print(f"\nextraction speed-up, 2 processes vs 1: {t1 / t2:.2f}x ({len(texts) / t1:.1f} vs {len(texts) / t2:.1f} "
          f"prompts/s); 1-min load average over the run: {load}")
