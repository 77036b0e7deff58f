"""Steerers: the interface, the SafeFlow gradient steerer, the projection steerer, and the peers
(activation addition along a refusal direction, null-space constrained steering)."""

from .base import SteerResult, Steerer, SteeringData
from .direction import ConditionalSteerer, DirectionSteerer
from .fitted import FittedSteerer
from .line import LineSettings, LineSteerer
from .nullspace import NullSpaceSteerer
from .projection import Projection, ProjectionSettings, ProjectionSteerer, project
from .safeflow import SafeFlowSettings, SafeFlowSteerer

__all__ = ["ConditionalSteerer", "DirectionSteerer", "FittedSteerer", "LineSettings", "LineSteerer", "NullSpaceSteerer", "Projection",
           "ProjectionSettings", "ProjectionSteerer", "SafeFlowSettings", "SafeFlowSteerer", "SteerResult", "Steerer", "SteeringData",
           "project"]
