"""Errors lowbit raises on bad input; each message names the input, the problem and the fix."""

from __future__ import annotations


class LowbitError(Exception):
    """Base of every error lowbit raises for bad input (CLI exit code 2)."""


class SpecError(LowbitError, ValueError):
    """An impossible format, granularity, range or recipe field."""


class NonFiniteError(LowbitError, ValueError):
    """A tensor holds NaN or Inf where finite numbers are required."""


class CheckpointError(LowbitError):
    """A checkpoint or tensor file is missing, corrupt, unsafe or inconsistent."""


class ModelError(LowbitError):
    """A model cannot be found, loaded or walked."""


class DataError(LowbitError):
    """Calibration or evaluation data is missing or unusable."""


class UnsupportedError(LowbitError):
    """A layer, op or export target that lowbit does not handle."""


def require(condition: bool, error: type[LowbitError], message: str) -> None:
    """Raise ``error(message)`` unless ``condition`` holds."""
    if not condition:
        raise error(message)
