"""The objectives a search can optimise and which way each one goes: the one place that knows.

Everything that compares objective values (Optuna's study direction, the ranking and the
finalists in :mod:`tuner.search.runner`, the gain in the record, the exporter's "best so far")
asks here instead of testing ``objective == "latency"`` itself.
"""

from __future__ import annotations

import math

from tuner.errors import ParameterError

MAXIMIZE = "maximize"
MINIMIZE = "minimize"

# Objective -> Optuna direction. throughput: output tokens/s at the best point meeting the SLO;
# goodput: requests/s meeting the SLO; latency: the SLO's latency at a fixed rate (lower wins).
OBJECTIVES: dict[str, str] = {"throughput": MAXIMIZE, "goodput": MAXIMIZE, "latency": MINIMIZE}


def direction(objective: str) -> str:
    """``"maximize"`` or ``"minimize"``; ParameterError (one line) for an unknown objective."""
    try:
        return OBJECTIVES[objective]
    except KeyError:
        raise ParameterError(
            f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}"
        ) from None


def minimized(objective: str) -> bool:
    """Whether lower values of ``objective`` are better."""
    return direction(objective) == MINIMIZE


def worst(objective: str | None) -> float:
    """The worst value ``objective`` can take, for a value that is missing or was written as
    null (not finite): +inf when it is minimised (an endless latency), else 0 (nothing
    served). An unknown or missing objective counts as maximised."""
    return math.inf if objective in OBJECTIVES and minimized(objective) else 0.0


def is_better(objective: str, a: float | None, b: float | None) -> bool:
    """Whether value ``a`` is strictly better than ``b`` for ``objective``. A missing or NaN
    value (nothing measured) is never better, and any measured value beats a missing one."""
    if a is None or math.isnan(a):
        return False
    if b is None or math.isnan(b):
        return True
    return a < b if minimized(objective) else a > b


def gain_ratio(objective: str, best: float | None, baseline: float | None) -> float | None:
    """How many times better ``best`` is than ``baseline`` (above 1: better), whichever way
    the objective goes; None when either is missing or the divisor is zero."""
    if best is None or baseline is None:
        return None
    num, den = (baseline, best) if minimized(objective) else (best, baseline)
    return num / den if den else None
