"""Errors a user can cause.

Every subclass of :class:`VtuneError` is mapped to one clear line on stderr and exit code 2
by ``tuner.cli``; nothing else in the package turns errors into exit codes.
"""

from __future__ import annotations

import signal


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


class EnvironmentFailedError(VtuneError):
    """The machine, not the candidate, failed a trial (vLLM not found, a start-up timeout, a
    port in use, memory taken by another process, the guard killed, every request refused):
    the search stops, keeping every finished trial, so that a rerun after the fix goes on."""


class Interrupted(BaseException):
    """A stop request (SIGTERM, or SIGINT) ended the run. Not an error: the CLI prints one
    line and exits with 128 + ``signum``. A BaseException, so that ``except Exception``
    (a trial's own error handling) lets it through. ``hint`` is what the CLI adds to its
    line (what was kept, how to resume)."""

    def __init__(self, signum: int, hint: str = "") -> None:
        try:
            self.name = signal.Signals(signum).name
        except ValueError:
            self.name = f"signal {signum}"
        super().__init__(f"interrupted by {self.name}")
        self.signum = signum
        self.hint = hint
