"""Steerers: the interface and the SafeFlow gradient steerer."""

from .base import SteerResult, Steerer
from .safeflow import PRESETS, SafeFlowPreset, SafeFlowSteerer

__all__ = ["PRESETS", "SafeFlowPreset", "SafeFlowSteerer", "SteerResult", "Steerer"]
