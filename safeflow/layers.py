"""Where the decoder blocks of a causal LM live, and what "layer L" means.

**Layer L is the output of decoder block L (0-based)** — the residual stream after block L.
For every block but the last this is Hugging Face's ``hidden_states[L + 1]`` (index 0 is the
embeddings); for the last block it is *not* ``hidden_states[-1]``, which Hugging Face reports
after the model's final norm (``model.norm``, ``ln_f``): layer -1 here is the raw block output,
before that norm. Extraction reads this tensor through a forward hook on block L, and steering
modifies the very same tensor through a hook on the same block, so what the constraint set was
trained on is exactly what it acts on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .errors import ConfigError
from .presets import preset, resolve_layer

# Attribute paths of the decoder-block list for common architecture families.
KNOWN_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, SmolLM, OLMo
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava-style)
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.layers",  # Pythia, GPT-NeoX
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
)


def _resolve(model: nn.Module, path: str) -> nn.Module | None:
    obj: object = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def find_decoder_layers(model: nn.Module, layers: str | Sequence[nn.Module] | None = None) -> list[nn.Module]:
    """Return the model's decoder blocks in order.

    ``layers`` overrides discovery: an attribute path (``"model.layers"``) or the block list itself.
    """
    if layers is not None:
        if isinstance(layers, str):
            found = _resolve(model, layers)
            if not isinstance(found, (nn.ModuleList, nn.Sequential)):
                raise ConfigError(
                    f"layers={layers!r} does not name a ModuleList on {type(model).__name__}; "
                    "pass the attribute path of the decoder-block list, e.g. layers='model.layers'"
                )
            return list(found)
        return list(layers)
    for path in KNOWN_LAYER_PATHS:
        found = _resolve(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return list(found)
    raise ConfigError(
        f"could not find the decoder layers of {type(model).__name__} (tried {', '.join(KNOWN_LAYER_PATHS)}); "
        "pass them explicitly, e.g. layers='model.layers' or layers=model.model.layers"
    )


def normalize_layer(layer: int, num_layers: int) -> int:
    """Map ``layer`` (negative counts from the end) to ``0..num_layers-1`` or raise."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ConfigError(f"layer must be an int, got {layer!r}")
    if not -num_layers <= layer < num_layers:
        raise ConfigError(
            f"layer {layer} is out of range: the model has {num_layers} decoder layers, "
            f"so use 0..{num_layers - 1} (or -1 for the last)"
        )
    return layer % num_layers


def default_model_layer(model: nn.Module, preset_name: str | None = None,
                        layers: str | Sequence[nn.Module] | None = None) -> int:
    """The layer to read and steer when none is given: the preset's layer for a model with a preset
    (``preset_name``, or the entry matching the model's name), else
    :func:`~safeflow.presets.default_layer` — the paper's layer 20 of 32 as a fraction of the depth."""
    return resolve_layer(preset(preset_name, model), len(find_decoder_layers(model, layers)))


def hidden_size(model: nn.Module) -> int:
    """The residual-stream width of ``model`` from its config."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot read the hidden size of {type(model).__name__} from its config; pass input_dim explicitly")


def block_output(output: object) -> torch.Tensor:
    """The hidden-state tensor [B, T, d] inside a decoder block's output (tensor or tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]


@contextmanager
def hooked(module: nn.Module, fn: Callable[[nn.Module, tuple, object], object]) -> Iterator[None]:
    """Inside the ``with`` block, ``fn`` is a forward hook of ``module`` (``fn(module, inputs,
    output)``; a non-None return replaces the output); it is removed on exit, also on exceptions."""
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def replace_block_output(output: object, hidden: torch.Tensor) -> object:
    """``output`` with its hidden-state tensor replaced by ``hidden``."""
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])  # type: ignore[index]


#: Config attributes of rotary position encodings: such a model has no position table to overflow.
ROTARY_ATTRS = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim", "rotary_pct", "rotary_emb_base")


def position_limit(model: nn.Module) -> int | None:
    """The most token positions ``model`` can take: its config's ``max_position_embeddings``,
    ``n_positions`` or ``n_ctx`` for a model with a learned table of absolute positions (GPT-2,
    OPT, ...), where one more position fails inside the model; None for a rotary model (Llama,
    Qwen, Mistral, ...), which runs past its training length, and where the config states none."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    if any(getattr(config, name, None) is not None for name in ROTARY_ATTRS):
        return None
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
