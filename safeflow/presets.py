"""Per-model settings: the paper's (layer 20) and ours for the default model.

``margin`` is the polytope's training margin κ, ``feature_l1`` its λ_f; ``lambda_unsafe``,
``lambda_safe``, ``steer_margin`` and ``precondition`` are SafeFlow's (see
:class:`safeflow.steerers.safeflow.SafeFlowSteerer`). The paper's entries steer with plain
gradients into the polytope's boundary (``steer_margin`` 0).

The SmolLM2 entry was chosen on an out-of-distribution validation source (``rho-refusal-50``)
that is neither trained on nor used as the test set. Detection: ``safeflow sweep`` (linear probe
per layer) gives OOD-validation F1 0.947 for layers 18, 20 and 22 alike (0.84 at layer 12, 0.54 at
layer 8), so the paper's layer 20 is kept; κ and λ_f were then picked on the same source.
Steering (a refusal polytope gated by a detection polytope that flags 0.86 of them, 50 harmful +
50 benign validation prompts, 32 greedy tokens): harmful refusal 0.02 unsteered; steered with covariance
preconditioning 0.72 at ``steer_margin`` 60, 0.80 at 100 (0.78 with lr 0.04), **0.84 at 150**
(the gate flags 0.86 of them, so 0.86 is the ceiling); benign outputs unchanged 1.00 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class ModelPreset:
    layer: int
    margin: float
    feature_l1: float
    lambda_unsafe: float
    lambda_safe: float
    steer_margin: float = 0.0
    precondition: str = "none"


PRESETS: dict[str, ModelPreset] = {
    "llama-2-7b": ModelPreset(layer=20, margin=60.0, feature_l1=1.0, lambda_unsafe=4.0, lambda_safe=1e-4),
    "ministral-8b": ModelPreset(layer=20, margin=5.0, feature_l1=1.0, lambda_unsafe=0.25, lambda_safe=0.0),
    "qwen2-1.5b": ModelPreset(layer=20, margin=30.0, feature_l1=1.0, lambda_unsafe=10.0, lambda_safe=5000.0),
    "smollm2-135m-instruct": ModelPreset(layer=20, margin=20.0, feature_l1=0.01, lambda_unsafe=4.0, lambda_safe=0.0,
                                         steer_margin=150.0, precondition="covariance"),
}
#: The preset used for models without an entry (the default model's settings).
DEFAULT_PRESET = "smollm2-135m-instruct"


def preset(name: str | None) -> ModelPreset:
    """The preset called ``name`` (``None``: the default)."""
    key = DEFAULT_PRESET if name in (None, "default") else name
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: default, {', '.join(PRESETS)}")
    return PRESETS[key]
