"""A trial in which every request failed measured nothing: it is a failed trial of class
``requests_failed`` (an environment failure: retried), not a candidate scoring 0. What tells
such a trial, and its one-line message, for :mod:`tuner.search.trial`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tuner.engine.log import FailureClass
from tuner.measure.ratesearch import RatePoint

# The failure class of a trial in which every request failed (an environment failure: retried).
REQUESTS_FAILED = FailureClass.REQUESTS_FAILED.value


class RequestsFailed(Exception):
    """Every request of the trial failed; ``str()`` says how (the status seen, the counts)."""


def client_errors(errors: Mapping[str, int]) -> bool:
    """Whether every error is an HTTP client error (4xx): the server refuses these requests
    as they are (no key, wrong model or path), whatever the load."""
    return bool(errors) and all(kind.startswith("HTTP 4") for kind in errors)


def all_failed(points: Sequence[RatePoint]) -> str:
    """``every request failed: HTTP 401 Unauthorized (24 of 24)``: the most common error (its
    status line, without the body) and the counts over ``points``."""
    counts: dict[str, int] = {}
    for point in points:
        for kind, n in point.summary.errors.items():
            head = kind.split(": ", 1)[0] if kind.startswith("HTTP ") else kind
            counts[head] = counts.get(head, 0) + n
    failed = sum(p.summary.failed for p in points)
    total = failed + sum(p.summary.completed for p in points)
    seen = max(counts, key=lambda k: counts[k]) if counts else "no reply"
    return f"every request failed: {seen} ({failed} of {total})"
