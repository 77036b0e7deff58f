"""Deprecated alias: the steering hooks moved to :mod:`safeflow.steering`, batched decoding to
:mod:`safeflow.decoding`. Importing this module warns once."""

import warnings

from .decoding import generate_from_ids, generate_responses
from .steering import (LARGE_SHIFT, SteerEvent, SteeringLog, check_steering, steering, steering_active,
                       steering_layer)

__all__ = ["LARGE_SHIFT", "SteerEvent", "SteeringLog", "check_steering", "generate_from_ids", "generate_responses",
           "steering", "steering_active", "steering_layer"]

warnings.warn("safeflow.generation is deprecated: import steering, SteeringLog, SteerEvent, check_steering, "
              "steering_active, steering_layer and LARGE_SHIFT from safeflow.steering, and generate_responses and "
              "generate_from_ids from safeflow.decoding", DeprecationWarning, stacklevel=2)
