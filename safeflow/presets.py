"""Per-model settings: the paper's, ours for the default model, and a relative default for any model.

Every value is either unit-free or expressed relative to what it acts on, so that a preset carries
over to models it was not tuned on:

* ``margin`` κ and the L1 weights act on *standardised* hidden states (training standardises its
  inputs); ``feature_l1`` and ``facet_l1`` are per training example — the reference code sums the
  hinge terms over a batch of 128 and averages the regularisers, so its λ equals ours × 128;
* ``steer_depth`` is the SafeFlow target depth in units of the steering constraint set's
  ``safe_depth`` (the typical depth of its safe training states), not in violation units;
* ``layer`` is a block index for a known model, or ``None``: :func:`default_layer` — the paper's
  layer 20 of 32 blocks as a fraction of the model's depth.

The paper's entries reproduce the reference code's training (``PolytopeConstraints.fit`` with the
reference normalisation rescaled as above, its unsafe weights and facet counts) and its SafeFlow
weights; they steer with plain gradients into the polytope's boundary (``steer_depth`` 0), with
SafeFlow as their steerer.

The SmolLM2 entry (and the relative default) steer with line steering (``steerer="line"``, depth
``line_depth``), which beat SafeFlow, the projection and the peers on the validation source (the
docs' results page has the comparison). The SmolLM2 entry was chosen on an out-of-distribution
validation source (``rho-refusal-50``)
that is neither trained on nor used as the test set; the study behind it is in the docs
(concepts, "Choosing the settings").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError

#: The paper steers and detects at layer 20 of 32-block models.
LAYER_FRACTION = 20 / 32
#: The reference code sums its hinge terms over batches of 128; safeflow averages, so the
#: paper presets divide their regularisers by this.
REFERENCE_BATCH = 128


@dataclass(frozen=True)
class ModelPreset:
    """Training settings of a detection polytope and SafeFlow's settings for one model."""

    layer: int | None  #: decoder block; None: :func:`default_layer` of the model's depth
    margin: float  #: κ, on standardised inputs
    feature_l1: float  #: λ_f per example
    facet_l1: float  #: λ_Φ per example
    unsafe_weight: float  #: w_u
    num_facets: int  #: K
    num_features: int  #: F, the width of the feature map
    lambda_unsafe: float  #: SafeFlow λ_unsafe
    lambda_safe: float  #: SafeFlow λ_safe
    steer_depth: float = 0.0  #: SafeFlow target depth, in units of the steering set's safe depth
    line_depth: float = 3.0  #: line steering's target depth, in units of the steering set's safe depth
    steerer: str = "line"  #: the default steerer (a registry name): what ``safeflow generate`` steers with
    precondition: str = "none"  #: SafeFlow preconditioner
    schedule: str = "constant"  #: learning-rate schedule of the polytope's training
    average: float = 0.0  #: fraction of final training steps whose parameters are averaged

    def fit_options(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`PolytopeConstraints.fit` from this preset."""
        return {"margin": self.margin, "feature_l1": self.feature_l1, "facet_l1": self.facet_l1,
                "unsafe_weight": self.unsafe_weight, "schedule": self.schedule, "average": self.average}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reference(layer: int, margin: float, num_facets: int, unsafe_weight: float, lambda_unsafe: float,
               lambda_safe: float) -> ModelPreset:
    """A paper preset: the reference code's λ_f = 1 and λ_Φ = 1e-4 rescaled to per-example."""
    return ModelPreset(layer=layer, margin=margin, feature_l1=1.0 / REFERENCE_BATCH, facet_l1=1e-4 / REFERENCE_BATCH,
                       unsafe_weight=unsafe_weight, num_facets=num_facets, num_features=16384, lambda_unsafe=lambda_unsafe,
                       lambda_safe=lambda_safe, steerer="safeflow")


PRESETS: dict[str, ModelPreset] = {
    "llama-2-7b": _reference(20, 60.0, 50, 2.0, 4.0, 1e-4),
    "ministral-8b": _reference(20, 5.0, 30, 3.0, 0.25, 0.0),
    "qwen2-1.5b": _reference(20, 30.0, 50, 5.0, 10.0, 5000.0),
    "smollm2-135m-instruct": ModelPreset(layer=20, margin=20.0, feature_l1=0.01, facet_l1=1e-3, unsafe_weight=3.0,
                                         num_facets=14, num_features=4096, lambda_unsafe=4.0, lambda_safe=0.0, steer_depth=3.0,
                                         precondition="covariance", schedule="cosine", average=0.5),
}
#: The preset of a model without an entry: the default model's settings with the layer chosen by depth.
RELATIVE_DEFAULT = ModelPreset(**{**PRESETS["smollm2-135m-instruct"].to_dict(), "layer": None})
#: Names ``preset()`` accepts besides the entries of :data:`PRESETS`.
SPECIAL = ("auto", "default")


def default_layer(num_layers: int) -> int:
    """The paper's layer 20 of 32 as a fraction of ``num_layers`` decoder blocks."""
    if num_layers < 1:
        raise ConfigError(f"a model needs at least one decoder block, got {num_layers}")
    return min(num_layers - 1, round(LAYER_FRACTION * num_layers))


def match_preset(model_name: str) -> str | None:
    """The :data:`PRESETS` entry whose name appears in ``model_name`` (case and ``_``/``-``/``.``
    insensitive: ``meta-llama/Llama-2-7b-chat-hf`` → ``llama-2-7b``), or None."""
    def norm(s: str) -> str:
        return "".join(ch for ch in s.lower() if ch.isalnum())

    key = norm(model_name)
    hits = [name for name in PRESETS if norm(name) in key]
    return max(hits, key=len) if hits else None


def model_name(model: Any) -> str:
    """The name a Hugging Face model was loaded from (``config._name_or_path``), or ''."""
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def preset(name: str | None = "auto", model: Any = None) -> ModelPreset:
    """Resolve a preset.

    ``name``: an entry of :data:`PRESETS`; ``"default"`` — the relative default; ``"auto"`` (or
    None) — the entry matching ``model``'s name if there is one (:func:`match_preset`), else the
    relative default. The returned preset's ``layer`` may be None (see :func:`resolve_layer`).
    """
    if name in (None, "auto"):
        found = match_preset(model_name(model)) if model is not None else None
        return PRESETS[found] if found else RELATIVE_DEFAULT
    if name == "default":
        return RELATIVE_DEFAULT
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join((*SPECIAL, *PRESETS))}")
    return PRESETS[name]


def resolve_layer(p: ModelPreset, num_layers: int) -> int:
    """The preset's layer, or :func:`default_layer` for a relative preset (or one deeper than the model)."""
    return p.layer if p.layer is not None and p.layer < num_layers else default_layer(num_layers)
