"""Shared pieces of the vLLM tests: constraint sets trained on the default model, prompts, and
the Hugging Face reference (steered states recorded per row and step)."""

from __future__ import annotations

import gc
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import safeflow as sf
from safeflow.decoding import generate_from_ids
from safeflow.chat import format_prompts

LAYER = 20
#: Engine settings small enough for a shared 2-core machine; eager (compiled mode: test_vllm_compiled.py).
ENGINE = dict(dtype="float32", max_model_len=512, max_num_seqs=16, seed=0, enforce_eager=True)


def model_dir() -> str:
    """The converted default model (``safeflow assets fetch``)."""
    return str(Path(os.environ.get("SAFEFLOW_HOME", Path.home() / ".cache" / "safeflow")) / "models"
               / "smollm2-135m-instruct")


def sets_dir() -> Path:
    """Where :func:`train_sets` keeps its files: a fixed folder per version of this file and of
    safeflow, so that the engine configuration (which names the files) is the same in every run
    and vLLM's compile cache, keyed by it, is reused."""
    digest = hashlib.sha256(Path(__file__).read_bytes() + sf.__version__.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"safeflow-vllm-sets-{digest}"


def prompts(n: int) -> list[str]:
    """``n`` default prompts, half harmful and half benign, spread over the sources."""
    data = sf.load_prompts("default")
    harmful, benign = data.where(label=1).texts, data.where(label=0).texts
    return [t for pair in zip(harmful[7::37][: n // 2], benign[7::37][: n - n // 2]) for t in pair]


def train_sets(hf: Callable[[], tuple[Any, Any]], out: Path) -> dict[str, str]:
    """Constraint sets on layer-``LAYER`` states of 48 default prompts of the model ``hf()``, with
    its provenance, saved in ``out`` once (later calls with the same ``out`` reuse the files):

    * ``"prompts"``: a polytope (F = 512, K = 4) with the labels swapped — benign prompts are its
      outside — so that answers to benign prompts (most generated states) are steered: a test
      device that exercises steering at many rows and steps, not a safety set;
    * ``"detector"``: a linear detector of harmful prompts (label 1 = harmful), used as a gate;
    * ``"layer10"``: the polytope relabelled as trained on layer 10.

    Returns name → path."""
    paths = {name: str(out / name) for name in ("prompts", "detector", "layer10")}
    if (out / "done").exists():
        return paths
    out.mkdir(parents=True, exist_ok=True)
    model, tok = hf()
    data = sf.load_prompts("default")
    harmful, benign = data.where(label=1).texts[::50][:24], data.where(label=0).texts[::50][:24]
    ext = sf.HFExtractor(model, tok, layer=LAYER, progress=False)
    H = ext.extract(harmful + benign)
    y = torch.tensor([1] * len(harmful) + [0] * len(benign))
    torch.manual_seed(0)
    poly = sf.PolytopeConstraints(H.shape[1], 4, 512).fit(H, 1 - y, progress=False)
    detector = sf.LinearConstraint(H.shape[1]).fit(H, y, progress=False)
    for name, c in (("prompts", poly), ("detector", detector)):
        c.provenance.update(sf.describe_source(ext))
        c.save(paths[name])
    poly.provenance["layer"] = 10
    poly.save(paths["layer10"])
    (out / "done").touch()
    return paths


def token_ids(tok: Any, texts: list[str]) -> list[list[int]]:
    """The chat-formatted prompt token ids, exactly as :func:`safeflow.generate_responses` builds them."""
    return [tok(p, add_special_tokens=False)["input_ids"] for p in format_prompts(tok, texts, "auto", None)]


def hf_steered(model: Any, tok: Any, texts: list[str], steer: dict[str, Any], max_new_tokens: int
               ) -> tuple[list[list[int]], list[dict[int, torch.Tensor]]]:
    """Greedy steered Hugging Face answers (one prompt per batch, so no padding) and, per prompt,
    position → the layer-``LAYER`` state the model continued with (after steering)."""
    tokens, states = [], []
    block = sf.layers.find_decoder_layers(model)[LAYER]
    for ids in token_ids(tok, texts):
        seen: dict[int, torch.Tensor] = {}
        with sf.steering(model, **steer):
            def record(_m: Any, _i: Any, output: Any) -> None:
                h = sf.layers.block_output(output)
                seen[len(seen) + len(ids) - 1] = h[0, -1].detach().clone()
            handle = block.register_forward_hook(record)  # after steering's hook: sees the steered state
            try:
                _, out = generate_from_ids(model, tok, [ids], max_new_tokens=max_new_tokens)
            finally:
                handle.remove()
        tokens.append(out[0])
        states.append(seen)
    return tokens, states


def shutdown(llm: Any) -> None:
    """Stop a vLLM engine and free its memory before the next one starts."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
