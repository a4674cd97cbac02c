"""The little statistics a search needs: a mean with its 95 % confidence interval (scipy-free)
and the Pareto front of (throughput, latency) points."""

from __future__ import annotations

import math
import statistics

# Two-sided 95 % Student t quantiles by degrees of freedom.
_T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def mean_ci(samples: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (t distribution); half-width
    inf for a single sample, since one run says nothing about noise."""
    if not samples:
        return math.nan, math.inf
    mean = statistics.fmean(samples)
    if len(samples) < 2 or not all(math.isfinite(s) for s in samples):
        return mean, math.inf  # one run, or an endless one (a latency never met): no interval
    dof = len(samples) - 1
    t = _T95.get(dof) or next((v for k, v in sorted(_T95.items()) if k >= dof), 1.96)
    return mean, t * statistics.stdev(samples) / math.sqrt(len(samples))


def mean_interval(samples: list[float]) -> tuple[float, float, float]:
    """Mean and its 95 % confidence interval (low, high), the low end clipped at zero: every
    objective here (tokens/s, requests/s, milliseconds) is non-negative, and an interval
    reaching below zero (a 0 among three samples) only says "we do not know" badly.

    Why the t interval, clipped, and not a log-normal or bootstrap one for positive samples:
    with the two or three samples a finalist has, the log-normal interval's high end grows
    with exp(t * s) (t = 4.3 at two degrees of freedom) and it is centred on a mean other
    than the arithmetic one the finalists are ranked by; three samples have ten distinct
    bootstrap resamples. Clipping changes no overlap verdict: an interval of positive values
    overlaps one whose low end went below zero exactly when it overlaps the clipped one."""
    mean, half = mean_ci(samples)
    low, high = mean - half, mean + half
    if low < 0.0:  # a NaN (an endless latency) is left as it is
        low = 0.0
    return mean, low, high


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names on the front of (throughput: higher is better, latency: lower is better)."""
    front = []
    for name, thr, lat in points:
        dominated = any(
            (t2 >= thr and l2 <= lat) and (t2 > thr or l2 < lat) for _, t2, l2 in points
        )
        if not dominated:
            front.append(name)
    return front
