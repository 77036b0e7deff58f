"""Steerers: the interface, the SafeFlow gradient steerer, the projection steerer, and the peers
(activation addition along a refusal direction, null-space constrained steering)."""

from .base import SteerResult, Steerer, SteeringData
from .direction import DirectionSteerer
from .fitted import FittedSteerer
from .line import LineSteerer
from .nullspace import NullSpaceSteerer
from .projection import Projection, ProjectionSteerer, project
from .safeflow import SafeFlowSteerer

__all__ = ["DirectionSteerer", "FittedSteerer", "LineSteerer", "NullSpaceSteerer", "Projection", "ProjectionSteerer",
           "SafeFlowSteerer", "SteerResult", "Steerer", "SteeringData", "project"]
