"""The highest request rate that meets the SLO, within one server launch.

A capacity probe (closed loop at the candidate's max concurrency, for ``seconds_per_point``)
gives the saturated rate; if that already meets the SLO it is the answer. Otherwise a low rate
(a quarter of capacity; a quarter of that again if it fails) brackets the answer from below,
and the rates in between are bisected. ``measure`` is injected, so the search is testable
without a server.

Early stop (:class:`EarlyStop`): under an SLO the objective is at most what the capacity probe
delivered, so a probe whose figure, raised by the noise margin, is still below the incumbent's
objective ends the search there: the bisection could only confirm a loser.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol


class Summary(Protocol):
    """What the search reads of a measurement (tuner.measure.metrics.BenchSummary satisfies it)."""

    request_throughput: float
    output_throughput: float
    completed: int
    failed: int

    def stat(self, metric: str, stat: str) -> float | None: ...

    def to_json(self) -> dict[str, Any]: ...


class SloLike(Protocol):
    def met(self, summary: Any) -> bool: ...


@dataclass(frozen=True)
class LoadPoint:
    """One measurement's load: a Poisson rate (inf = closed loop) and a request count, or a
    duration (closed loop: the request set is cycled for that long)."""

    rate: float
    concurrency: int | None
    num_requests: int
    duration_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "rate": None if math.isinf(self.rate) else self.rate,
            "concurrency": self.concurrency,
            "num_requests": self.num_requests,
            "duration_s": self.duration_s,
        }


@dataclass(frozen=True)
class RatePoint:
    """A measured load point: its summary, whether the SLO held, the server's own figures,
    the telemetry sampled while it ran and its roofline (``Measurement.telemetry_json()`` and
    ``roofline_json()``; None when not watched)."""

    load: LoadPoint
    summary: Summary
    slo_met: bool
    server: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
    roofline: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "load": self.load.to_json(),
            "slo_met": self.slo_met,
            "summary": self.summary.to_json(),
            "server": self.server,
            "telemetry": self.telemetry,
            "roofline": self.roofline,
        }


@dataclass(frozen=True)
class RateSearchResult:
    """``stopped_early``: the search ended after the probe (:class:`EarlyStop`); ``best`` is
    None then, and ``reason`` says why."""

    points: tuple[RatePoint, ...]
    best: RatePoint | None  # the highest-rate point meeting the SLO; None when none did
    capacity_rps: float
    reason: str
    stopped_early: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "capacity_rps": self.capacity_rps,
            "reason": self.reason,
            "best_index": None if self.best is None else self.points.index(self.best),
            "points": [p.to_json() for p in self.points],
        }
        if self.stopped_early:  # records of searches that ran to the end stay as they were
            data["stopped_early"] = True
        return data


@dataclass(frozen=True)
class EarlyStop:
    """Stop after the capacity probe when it cannot reach ``incumbent``, the best objective
    measured so far: ``bound * (1 + margin) < incumbent``. ``bound`` is the probe's output
    tokens/s (objective ``throughput``) or its requests/s (``goodput``), an upper bound of the
    objective under an SLO (a Poisson rate below saturation delivers no more). ``margin`` is
    the run-to-run noise the probe may carry (0.15: 15 %)."""

    incumbent: float
    margin: float = 0.15
    objective: str = "throughput"

    def bound(self, summary: Summary) -> float:
        if self.objective == "goodput":
            return float(summary.request_throughput)
        return float(summary.output_throughput)

    def stops(self, summary: Summary) -> bool:
        bound = self.bound(summary)
        return math.isfinite(bound) and bound * (1 + self.margin) < self.incumbent

    def reason(self, summary: Summary) -> str:
        unit = "req/s" if self.objective == "goodput" else "tok/s"
        return (
            f"stopped early: capacity {_figure(self.bound(summary))} {unit} cannot reach the "
            f"incumbent's {_figure(self.incumbent)} {unit} (margin {self.margin:.0%})"
        )


def _figure(value: float) -> str:
    """4,413 (tokens/s), 2.47 (requests/s)."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


@dataclass(frozen=True)
class RateSearchConfig:
    """Sizing: each point runs for about ``seconds_per_point`` (at least ``min_requests``);
    bisection stops after ``iterations`` or when the bracket is within ``tolerance``."""

    concurrency: int
    seconds_per_point: float = 10.0
    min_requests: int = 8
    max_requests: int = 2000
    iterations: int = 3
    low_fraction: float = 0.25
    step_downs: int = 1
    tolerance: float = 0.1

    def requests_for(self, rate: float) -> int:
        return max(
            self.min_requests, min(self.max_requests, math.ceil(rate * self.seconds_per_point))
        )


Measure = Callable[[LoadPoint], Awaitable[RatePoint]]


async def find_max_rate(
    measure: Measure,
    slo: SloLike | None,
    cfg: RateSearchConfig,
    early_stop: EarlyStop | None = None,
) -> RateSearchResult:
    """Capacity probe, then (with an SLO that saturation breaks) bisection over Poisson rates.

    The probe's request count (at least ``min_requests``, and two per concurrent stream) only
    sizes the request set it cycles through for ``seconds_per_point``. With ``early_stop``,
    a probe that cannot reach the incumbent ends the search (``stopped_early``, ``best``
    None) where the bisection would start; a probe that is the answer (no SLO, or the SLO
    holds at saturation) is kept as the answer, since it costs nothing more.
    """
    points: list[RatePoint] = []
    probe_n = max(cfg.min_requests, 2 * cfg.concurrency)
    # The probe lasts seconds_per_point whatever the throughput turns out to be.
    probe = await measure(LoadPoint(math.inf, cfg.concurrency, probe_n, cfg.seconds_per_point))
    points.append(probe)
    capacity = probe.summary.request_throughput
    if not capacity or math.isnan(capacity) or probe.summary.completed == 0:
        return RateSearchResult(tuple(points), None, 0.0, "no request completed at saturation")
    if slo is None:
        return RateSearchResult(tuple(points), probe, capacity, "no SLO: saturated throughput")
    if probe.slo_met:
        return RateSearchResult(
            tuple(points),
            probe,
            capacity,
            "the SLO holds at saturation (closed loop at max concurrency)",
        )
    if early_stop is not None and early_stop.stops(probe.summary):
        reason = early_stop.reason(probe.summary)
        return RateSearchResult(tuple(points), None, capacity, reason, stopped_early=True)

    # A low rate that meets the SLO brackets the answer from below; when it fails, step down
    # (a fraction at a time) before calling the candidate infeasible.
    hi_rate = capacity
    lo_rate = capacity * cfg.low_fraction
    for _ in range(1 + cfg.step_downs):
        low = await measure(LoadPoint(lo_rate, None, cfg.requests_for(lo_rate)))
        points.append(low)
        if low.slo_met:
            break
        hi_rate, lo_rate = lo_rate, lo_rate * cfg.low_fraction
    else:
        return RateSearchResult(
            tuple(points),
            None,
            capacity,
            f"the SLO fails even at {hi_rate:.3g} req/s ({hi_rate / capacity:.1%} of capacity)",
        )
    best = low
    for _ in range(cfg.iterations):
        if (hi_rate - lo_rate) / hi_rate <= cfg.tolerance:
            break
        mid = (lo_rate + hi_rate) / 2
        point = await measure(LoadPoint(mid, None, cfg.requests_for(mid)))
        points.append(point)
        if point.slo_met:
            lo_rate, best = mid, point
        else:
            hi_rate = mid
    return RateSearchResult(
        tuple(points),
        best,
        capacity,
        f"bisection: SLO holds up to {lo_rate:.3g} req/s, fails by {hi_rate:.3g}",
    )


def step_down(load: LoadPoint, cfg: RateSearchConfig) -> LoadPoint | None:
    """The load one step below ``load`` (a step: ``cfg.tolerance``, the bisection's own
    resolution, 10 %): a Poisson rate that much lower (sized to the same seconds), or a closed
    loop with that many fewer streams (at least one; None when it has one already).

    A closed loop steps down by capping its concurrency rather than by switching to a Poisson
    rate of 0.9 x capacity: the load stays the kind the trial chose (the SLO held at
    saturation, closed loop), fewer streams can only shorten the queue and the batch, and the
    step needs no capacity figure, which the failed run itself measured with its noise; a
    Poisson rate at 90 % of capacity queues its bursts, and its TTFT tail is often worse than
    the closed loop's was at full concurrency."""
    if math.isinf(load.rate):
        streams = load.concurrency or 1
        fewer = max(1, math.floor(streams * (1 - cfg.tolerance)))
        return None if fewer >= streams else replace(load, concurrency=fewer)
    rate = load.rate * (1 - cfg.tolerance)
    return LoadPoint(rate, load.concurrency, cfg.requests_for(rate), load.duration_s)


async def measure_held(
    measure: Measure, load: LoadPoint, cfg: RateSearchConfig
) -> tuple[RatePoint, RatePoint | None]:
    """A finalist's re-run: ``load`` (the point its trial chose), and when that misses the SLO
    once more one step down (:func:`step_down`), so that a re-run just past the SLO's edge
    scores what its candidate holds a step lower rather than nothing. Returns the point at
    ``load`` and the step down (None when not needed or there is none)."""
    point = await measure(load)
    lower = None if point.slo_met else step_down(load, cfg)
    return point, (None if lower is None else await measure(lower))


def objective_value(result: RateSearchResult, objective: str) -> float:
    """The number the study optimises: ``throughput`` (output tokens/s at the best SLO-meeting
    rate), ``goodput`` (requests/s meeting the SLO, best over the points). 0 when nothing met
    the SLO, so infeasible configurations rank last rather than crash the study."""
    if objective == "goodput":
        values = [p.summary.to_json().get("request_goodput") or 0.0 for p in result.points]
        return max(values, default=0.0)
    if result.best is None:
        return 0.0
    return float(result.best.summary.output_throughput)
