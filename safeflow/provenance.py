"""Where a constraint set came from: the model, layer and extraction settings of its training data.

A constraint set's ``provenance`` (a dict, saved in its file header) records:

* ``model`` — the name the model was loaded from (``config._name_or_path``, or what the CLI was given);
* ``fingerprint`` — ``{"model_type", "hidden_size", "num_layers", "vocab_size"}`` of the model's config;
* ``weights`` — :func:`~safeflow.cache.weights_digest` of the weights (a fine-tune differs);
* ``layer`` — the decoder block whose output was read; ``pooling`` — ``"last"`` or ``"mean"``;
* ``chat_template`` — whether prompts went through the tokenizer's chat template;
  ``system_prompt``, ``max_length``;
* ``rows`` — ``"prompts"`` or ``"responses"`` (response states, see :mod:`safeflow.responses`);
* ``training`` — written by ``fit``: the constraint type, its config, the fit options, epochs,
  rows and the final training loss.

Callers set the source part: ``poly.provenance.update(sf.describe_source(extractor))`` (``safeflow
train`` copies it from the features file). Every key is optional: a file saved before provenance
existed loads with an empty dict, which means *unknown* — nothing is checked, and steering needs
an explicit layer. With a recorded source, :func:`safeflow.steering`, ``evaluate_steering`` and
``safeflow generate`` default to the recorded layer and refuse another model (fingerprint) or
layer (:func:`check_source`); ``check_provenance=False`` (CLI ``--ignore-provenance``) overrides.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from .cache import weights_digest
from .errors import ConfigError

log = logging.getLogger(__name__)

#: The keys of a provenance dict that describe the training data's source (not the training).
SOURCE_KEYS = ("model", "fingerprint", "weights", "layer", "pooling", "chat_template", "system_prompt", "max_length",
               "rows")
#: Config attributes read for each fingerprint entry (the first one present wins).
FINGERPRINT_ATTRS = {
    "model_type": ("model_type",),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "vocab_size": ("vocab_size",),
}
#: What ``check_provenance=False`` is called in each place, for the messages.
OVERRIDE = "pass check_provenance=False (command line: --ignore-provenance)"


def fingerprint(config: Any) -> dict[str, Any]:
    """The architecture of a Hugging Face config (or model): model type, hidden size, number of
    decoder layers and vocabulary size (``None`` where the config lacks one)."""
    config = getattr(config, "config", config)
    config = getattr(config, "get_text_config", lambda: config)()
    out: dict[str, Any] = {}
    for key, attrs in FINGERPRINT_ATTRS.items():
        value = next((getattr(config, a) for a in attrs if getattr(config, a, None) is not None), None)
        out[key] = value if isinstance(value, (int, str)) else None
    return out


def describe_source(extractor: Any, model_name: str | None = None) -> dict[str, Any]:
    """The provenance of hidden states from ``extractor`` (an :class:`~safeflow.HFExtractor`):
    model name, fingerprint, weights digest, layer, pooling, chat-template use, system prompt and
    truncation length. ``model_name`` overrides the name read from the model's config.

    Use it as ``constraints.provenance.update(sf.describe_source(ext))`` after fitting on its states.
    """
    model, tok = extractor.model, extractor.tokenizer
    template = extractor.chat_template
    used = getattr(tok, "chat_template", None) is not None if template == "auto" else bool(template)
    name = model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    return {"model": name, "fingerprint": fingerprint(model), "weights": weights_digest(model),
            "layer": extractor.layer, "pooling": extractor.pooling, "chat_template": used,
            "system_prompt": extractor.system_prompt, "max_length": extractor.max_length}


def source_of(header: Mapping[str, Any]) -> dict[str, Any]:
    """The source keys of a features file's header (``safeflow extract``), as a provenance dict;
    ``rows`` is ``"responses"`` for ``--responses`` files."""
    out = {k: header[k] for k in SOURCE_KEYS if header.get(k) is not None}
    if header.get("responses"):
        out["rows"] = "responses"
    return out


def _describe(name: Any, fp: Mapping[str, Any] | None) -> str:
    parts = ", ".join(f"{k} {v}" for k, v in (fp or {}).items() if v is not None)
    return f"{name!r}" + (f" ({parts})" if parts else "")


def check_source(provenance: Mapping[str, Any], *, model: Any = None, layer: int | None = None,
                 what: str = "the constraint set") -> None:
    """Raise :class:`ConfigError` if ``provenance`` records another model architecture than
    ``model``'s (a model, a config, or a :func:`fingerprint` dict) or another layer than ``layer``.

    Only what is recorded is compared (an empty provenance passes). A model with the same
    architecture but other weights (a fine-tune) is allowed with a logged warning.
    """
    recorded = provenance.get("fingerprint")
    name = provenance.get("model", "unknown")
    if model is not None and isinstance(recorded, Mapping):
        actual = dict(model) if isinstance(model, Mapping) else fingerprint(model)
        differ = [k for k, v in recorded.items() if v is not None and actual.get(k) is not None and actual[k] != v]
        if differ:
            this = getattr(getattr(model, "config", model), "_name_or_path", "") or "the other model"
            raise ConfigError(f"{what} was trained on model {_describe(name, recorded)} but this is model "
                              f"{_describe(this, actual)}; use the model it was trained on (or train one on this "
                              f"model), or {OVERRIDE}")
        weights = provenance.get("weights")
        if weights and isinstance(model, torch.nn.Module):
            if weights_digest(model) != weights:
                log.warning("%s was trained on %r with other weights (same architecture; a fine-tune or another "
                            "dtype?); its constraints may not fit this model", what, name)
    recorded_layer = provenance.get("layer")
    if layer is not None and isinstance(recorded_layer, int) and recorded_layer != layer:
        raise ConfigError(f"{what} was trained on layer {recorded_layer} of {name!r} but layer {layer} was asked for; "
                          f"leave the layer unset to use layer {recorded_layer}, or {OVERRIDE}")


def recorded_layer(*constraint_sets: Any) -> int | None:
    """The first layer recorded in the provenance of ``constraint_sets`` (None if none records one)."""
    for c in constraint_sets:
        layer = getattr(c, "provenance", {}).get("layer")
        if isinstance(layer, int) and not isinstance(layer, bool):
            return layer
    return None
