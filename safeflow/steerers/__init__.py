"""Steerers: the interface and the SafeFlow gradient steerer."""

from .base import SteerResult, Steerer
from .safeflow import SafeFlowSteerer

__all__ = ["SafeFlowSteerer", "SteerResult", "Steerer"]
