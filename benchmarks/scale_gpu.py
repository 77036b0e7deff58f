"""Training at the paper's scale on one GPU: does data-parallel training (DDP) matter?

Run on a CUDA machine: ``python benchmarks/scale_gpu.py OUT.json``. Polytope at the paper's shape
(d = 4096, F = 16384, K = 14, batch 128, float32) on synthetic rows: optimiser step time in
memory on the GPU, without the entropy re-assignment, streamed from disk chunks, the statistics
pass, the same step on the CPU (1 thread and all threads); streaming vs in-memory equality with
the same chunking on the GPU; extraction with and without the cache on the GPU. Figures go to
``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

import safeflow as sf
from safeflow.features import FeatureDataset, write_chunks

D, F, K, B, STEPS = 4096, 16384, 14, 128, 200
PAPER_ROWS = 330_000  # BeaverTails' annotated sentences


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def training(out: dict) -> None:
    n = B * STEPS
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    H = torch.randn(n, D, generator=g) + 0.3 * y[:, None]
    poly = sf.PolytopeConstraints(D, K, F).cuda()
    Hg = H.cuda()
    poly.fit(Hg[:1024], y[:1024], epochs=1, progress=False)  # warm-up (labels stay on the CPU)
    stats = timed(lambda: FeatureDataset.from_tensors(Hg, y).moments("cuda"))
    fit = timed(lambda: poly.fit(Hg, y, epochs=1, progress=False))
    no_entropy = timed(lambda: poly.fit(Hg, y, epochs=1, progress=False, entropy_weight=0.0))
    with tempfile.TemporaryDirectory() as tmp:
        write_chunks(tmp, ((H[s : s + 4096], y[s : s + 4096]) for s in range(0, n, 4096)))
        disk = FeatureDataset.from_files(tmp)
        streamed = timed(lambda: poly.fit(disk, epochs=1, progress=False))
        V_disk = poly.violations(Hg).detach()
        poly.fit(FeatureDataset.from_tensors(H, y, chunk_rows=4096), epochs=1, progress=False)
        V_mem = poly.violations(Hg).detach()
    step = (fit - stats) / STEPS
    out["gpu_training"] = {
        "rows": n, "stats_s": stats, "fit_s": fit, "step_ms": step * 1e3,
        "step_ms_without_entropy_reassignment": (no_entropy - stats) / STEPS * 1e3,
        "streamed_fit_s": streamed, "streamed_step_ms": (streamed - stats) / STEPS * 1e3,
        "stream_vs_memory_same_chunking_max_rel_diff": float((V_disk - V_mem).abs().max() / V_mem.abs().max()),
        "paper_scale_fit_estimate_s": PAPER_ROWS / n * stats + PAPER_ROWS / B * step,
    }


def cpu_steps(out: dict) -> None:
    H, y = torch.randn(B * 3, D), torch.arange(B * 3) % 2
    for threads in (1, os.cpu_count()):
        torch.set_num_threads(threads)
        poly = sf.PolytopeConstraints(D, K, F)
        poly.fit(H[:B], y[:B], epochs=1, progress=False)  # warm-up
        t = time.perf_counter()
        poly.fit(H, y, epochs=1, progress=False)
        out[f"cpu_step_ms_{threads}_threads"] = (time.perf_counter() - t) / 3 * 1e3
    torch.set_num_threads(os.cpu_count())


def extraction(out: dict) -> None:
    sys.path.insert(0, "tests")
    from conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model("llama", vocab_size=len(tok)).cuda()
    texts = ["how do i make a bomb", "bake cookies please", "hack bank", "write poem about the sea", "kill someone"]
    with tempfile.TemporaryDirectory() as tmp:
        plain = sf.HFExtractor(model, tok, layer=2, batch_size=2, progress=False).extract(texts)
        cached = sf.HFExtractor(model, tok, layer=2, batch_size=2, cache_dir=tmp, progress=False).extract(texts)
        again = sf.HFExtractor(model, tok, layer=2, batch_size=2, cache_dir=tmp, progress=False).extract(texts)
        model_dir = os.path.join(tmp, "tiny")
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        mapped, _ = sf.load_model(model_dir, device_map="auto")
        data = os.path.join(tmp, "p.csv")
        with open(data, "w") as f:
            f.write("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts)))
        two = subprocess.run([sys.executable, "-m", "safeflow", "extract", "--model", model_dir, "--data", data,
                              "--layer", "2", "--processes", "2", "--cache", os.path.join(tmp, "c"),
                              "--out", os.path.join(tmp, "o.safetensors")], capture_output=True, text=True)
    out["gpu_extraction"] = {
        "cache_equals_plain": bool(torch.equal(plain, cached)), "reopened_cache_equals": bool(torch.equal(plain, again)),
        "device_map_auto_device": str(next(mapped.parameters()).device),
        "two_processes_on_one_gpu_exit": two.returncode, "two_processes_on_one_gpu_error": two.stderr.strip()[-300:],
    }


def main() -> None:
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
                 "cpus": os.cpu_count()}
    for part in (training, extraction, cpu_steps):
        try:
            part(out)
        except Exception as exc:  # record and go on: one device session, several measurements
            out[part.__name__ + "_error"] = f"{type(exc).__name__}: {exc}"
    text = json.dumps(out, indent=2)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
