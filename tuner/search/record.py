"""The search record: typed trial results and the JSON written beside every profile.

This is the contract between the search (which writes it), the report and the exporter (which
read it), and anyone analysing a study later. ``SCHEMA`` changes when a field changes meaning.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = "vtune.search/1"

STATE_COMPLETE = "complete"  # the server ran and the load was measured
STATE_FAILED = "failed"  # the server failed (class in ``failure``) or the load broke
STATE_PRUNED = "pruned"  # a sampled candidate the bounds rule out: never launched


@dataclass(frozen=True)
class TrialRecord:
    """One candidate's trial.

    ``rate_search`` holds every measured load point (``RateSearchResult.to_json()``): its
    summary in ``vllm bench serve`` field names, whether the SLO held, and the server's own
    figures scraped from /metrics (``server``: peak KV usage, preemptions, max running/waiting,
    and the sampled time series under ``series``). ``best`` is the chosen point's summary with
    its ``rate`` (None for closed loop). ``estimate`` holds the figures that ranked the
    candidate (predicted_tokens_per_s, kv_capacity_tokens, max_concurrency,
    roofline_knee_batch, weight_bytes). ``server_info`` is what vLLM reported at start
    (kv_cache_size_tokens, max_concurrency, vllm_version, startup_s).
    """

    name: str
    knobs: dict[str, Any]
    state: str
    objective: float | None = None
    number: int | None = None
    baseline: bool = False
    variant: str = "none"
    vllm_args: list[str] = field(default_factory=list)
    estimate: dict[str, Any] = field(default_factory=dict)
    server_info: dict[str, Any] | None = None
    rate_search: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    engine_time_s: float = 0.0
    log_path: str | None = None
    started_at: str | None = None
    finished_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Finalist:
    """A finalist re-measured ``n`` times (its first trial included): mean and a 95 % CI."""

    name: str
    samples: tuple[float, ...]
    mean: float
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, name: str, samples: list[float]) -> Finalist:
        mean, half = mean_ci(samples)
        return cls(name, tuple(samples), mean, mean - half, mean + half)

    def overlaps(self, other: Finalist) -> bool:
        return self.ci_low <= other.ci_high and other.ci_low <= self.ci_high

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples"] = list(self.samples)
        return data


# Two-sided 95 % Student t quantiles by degrees of freedom (scipy-free).
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
    if len(samples) < 2:
        return mean, math.inf
    dof = len(samples) - 1
    t = _T95.get(dof) or next((v for k, v in sorted(_T95.items()) if k >= dof), 1.96)
    return mean, t * statistics.stdev(samples) / math.sqrt(len(samples))


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
