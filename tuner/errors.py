"""Errors a user can cause.

Every subclass of :class:`VtuneError` is mapped to one clear line on stderr and exit code 2
by ``tuner.cli``; nothing else in the package turns errors into exit codes.
"""

from __future__ import annotations


class VtuneError(Exception):
    """A mistake in the user's input or environment; the message is the one line shown."""


class UnknownGpuError(VtuneError):
    """A GPU name that is not in the registry."""


class ModelError(VtuneError):
    """A model that cannot be found, read, or understood."""


class ParameterError(VtuneError):
    """An impossible or out-of-range parameter (lengths, utilization, unknown knob)."""


class UnsupportedError(VtuneError):
    """A method or dtype the chosen GPU (or engine) does not support."""


class SloError(VtuneError):
    """A malformed SLO string."""


class DatasetError(VtuneError):
    """A missing or malformed dataset file."""


class EngineError(VtuneError):
    """The engine could not be started or reached (unreachable URL, port in use, no vLLM)."""


class StorageError(VtuneError):
    """A study storage that cannot be opened."""
