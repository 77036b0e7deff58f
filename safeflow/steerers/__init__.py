"""Steerers: the interface, the SafeFlow gradient steerer and the projection steerer."""

from .base import SteerResult, Steerer
from .projection import Projection, ProjectionSteerer, project
from .safeflow import SafeFlowSteerer

__all__ = ["Projection", "ProjectionSteerer", "SafeFlowSteerer", "SteerResult", "Steerer", "project"]
