"""Exceptions raised by safeflow. Every message names the problem and the fix."""

from __future__ import annotations


class SafeflowError(Exception):
    """Base class of all safeflow errors."""


class ConfigError(SafeflowError, ValueError):
    """An argument or configuration value is invalid (unknown name, out-of-range layer, ...)."""


class DataError(SafeflowError, ValueError):
    """Input data is unusable (wrong shape, non-finite values, bad labels, empty input)."""


class AssetError(SafeflowError, RuntimeError):
    """A default asset could not be fetched, verified or converted."""


class CorruptFileError(SafeflowError, ValueError):
    """A saved file is truncated, corrupted or not a safeflow file."""
