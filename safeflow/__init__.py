"""safeflow: learned safety polytopes over LLM hidden states (Chen, As & Krause, ICML 2025).

Labels everywhere: 1 = unsafe, 0 = safe. "Layer L" is the output of decoder block L.
"""

from . import kernels
from .attacks import Attack, AttackPrompt
from .constraints import ConstraintSet, LinearConstraint, MLPConstraint, PolytopeConstraints
from .data import PromptSet, load_prompts, source_split, stratified_split
from .decoding import generate_responses
from .errors import AssetError, ConfigError, CorruptFileError, DataError, SafeflowError
from .evaluation import RefusalJudge, detection_metrics, evaluate_steering
from .extractors import Extractor, HFExtractor
from .features import FeatureDataset
from .models import DEFAULT_MODEL, load_model
from .provenance import describe_source
from .responses import ResponseStates, response_states
from .steering import SteerEvent, SteeringLog, SteeringSpec, steering
from .steerers import (ConditionalSteerer, DirectionSteerer, FittedSteerer, LineSteerer, NullSpaceSteerer, Projection, ProjectionSteerer, SafeFlowSteerer,
                       SteerResult, Steerer, SteeringData, project)

__version__ = "0.1.0"


def available() -> dict[str, list[str]]:
    """Every registry and its registered names (``"kernel"``: the kernel backends that loaded here)."""
    return {"extractor": Extractor.available(), "constraint": ConstraintSet.available(), "steerer": Steerer.available(),
            "attack": Attack.available(), "kernel": kernels.available()}


__all__ = [
    "AssetError", "Attack", "AttackPrompt", "ConditionalSteerer", "ConfigError", "ConstraintSet", "CorruptFileError", "DEFAULT_MODEL",
    "DataError", "DirectionSteerer", "Extractor", "FeatureDataset", "FittedSteerer", "HFExtractor", "LineSteerer", "LinearConstraint", "MLPConstraint",
    "NullSpaceSteerer", "PolytopeConstraints", "Projection", "ProjectionSteerer", "PromptSet", "RefusalJudge",
    "ResponseStates", "SafeFlowSteerer", "SafeflowError", "SteerEvent", "SteerResult", "Steerer", "SteeringData", "SteeringLog",
    "available", "describe_source", "detection_metrics", "evaluate_steering", "generate_responses", "kernels", "load_model",
    "load_prompts", "project", "response_states", "source_split", "steering", "SteeringSpec", "stratified_split",
]
