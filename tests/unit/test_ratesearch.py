"""Rate search within one launch: capacity probe, low-rate check, bisection."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest

from tuner.measure.ratesearch import (
    EarlyStop,
    LoadPoint,
    RatePoint,
    RateSearchConfig,
    find_max_rate,
    measure_held,
    objective_value,
    step_down,
)


@dataclass
class FakeSummary:
    request_throughput: float
    output_throughput: float
    ttft_p95: float
    completed: int = 10
    failed: int = 0
    request_goodput: float | None = None

    def stat(self, metric: str, stat: str) -> float | None:
        return self.ttft_p95 if (metric, stat) == ("ttft", "p95") else None

    def to_json(self) -> dict[str, Any]:
        return {
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
        }


class TtftSlo:
    def __init__(self, limit: float) -> None:
        self.limit = limit

    def met(self, summary: FakeSummary) -> bool:
        return summary.ttft_p95 < self.limit


class QueueServer:
    """M/M/1-like: capacity 10 req/s; TTFT grows as 0.1 / (1 - rho)."""

    capacity = 10.0

    def __init__(self, slo: TtftSlo | None) -> None:
        self.slo = slo
        self.loads: list[LoadPoint] = []

    async def measure(self, load: LoadPoint) -> RatePoint:
        self.loads.append(load)
        rate = self.capacity if math.isinf(load.rate) else min(load.rate, self.capacity)
        rho = min(rate / self.capacity, 0.999)
        ttft = 0.1 / (1 - rho) if not math.isinf(load.rate) else 5.0
        summary = FakeSummary(rate, rate * 100, ttft)
        return RatePoint(load, summary, self.slo.met(summary) if self.slo else True)


async def test_no_slo_takes_saturated_throughput() -> None:
    server = QueueServer(None)
    result = await find_max_rate(server.measure, None, RateSearchConfig(concurrency=8))
    assert len(result.points) == 1 and math.isinf(server.loads[0].rate)
    assert server.loads[0].concurrency == 8
    assert server.loads[0].num_requests == 16  # the set it cycles: two per stream, at least 8
    assert server.loads[0].duration_s == RateSearchConfig(concurrency=8).seconds_per_point
    assert objective_value(result, "throughput") == 1000.0


async def test_bisection_converges_below_the_slo_limit() -> None:
    slo = TtftSlo(0.5)  # 0.1/(1-rho) < 0.5  <=>  rate < 8 req/s
    server = QueueServer(slo)
    cfg = RateSearchConfig(concurrency=8, iterations=6, tolerance=0.02)
    result = await find_max_rate(server.measure, slo, cfg)
    assert result.best is not None and result.best.slo_met
    best_rate = result.best.load.rate
    assert 6.5 < best_rate < 8.0
    assert all(p.load.rate <= best_rate or not p.slo_met for p in result.points[1:])
    assert objective_value(result, "throughput") == best_rate * 100
    assert result.to_json()["best_index"] == result.points.index(result.best)


async def test_infeasible_slo_scores_zero() -> None:
    slo = TtftSlo(0.05)  # even an idle server has TTFT 0.1
    server = QueueServer(slo)
    result = await find_max_rate(server.measure, slo, RateSearchConfig(concurrency=4))
    assert result.best is None and "fails even at" in result.reason
    assert objective_value(result, "throughput") == 0.0
    # the probe, the low rate, and one step down before giving up
    assert len(server.loads) == 2 + RateSearchConfig(concurrency=4).step_downs


async def test_a_failed_low_rate_steps_down_before_giving_up() -> None:
    slo = TtftSlo(0.11)  # met below about 0.9 req/s only: 25 % of capacity (2.5) is too much
    server = QueueServer(slo)
    cfg = RateSearchConfig(concurrency=4, iterations=4, tolerance=0.01)
    result = await find_max_rate(server.measure, slo, cfg)
    assert result.best is not None
    assert 0.6 <= result.best.load.rate < 0.91


async def test_slo_met_at_saturation_stops_after_probe() -> None:
    slo = TtftSlo(10.0)
    server = QueueServer(slo)
    result = await find_max_rate(server.measure, slo, RateSearchConfig(concurrency=4))
    assert result.best is result.points[0] and len(server.loads) == 1


def test_point_sizing() -> None:
    cfg = RateSearchConfig(concurrency=4, seconds_per_point=10, min_requests=8, max_requests=50)
    assert cfg.requests_for(0.1) == 8
    assert cfg.requests_for(2.0) == 20
    assert cfg.requests_for(100.0) == 50


# --- early stop after the probe ------------------------------------------------------------------


async def test_a_probe_that_cannot_reach_the_incumbent_stops_the_search() -> None:
    slo = TtftSlo(0.5)  # saturation breaks it: without the stop, a bisection follows
    server = QueueServer(slo)
    early = EarlyStop(incumbent=1200.0, margin=0.15)  # 1000 tok/s x 1.15 = 1150 < 1200
    result = await find_max_rate(server.measure, slo, RateSearchConfig(concurrency=8), early)
    assert len(server.loads) == 1 and math.isinf(server.loads[0].rate)
    assert result.stopped_early and result.best is None and result.capacity_rps == 10.0
    assert result.reason == (
        "stopped early: capacity 1,000 tok/s cannot reach the incumbent's 1,200 tok/s (margin 15%)"
    )
    data = result.to_json()
    assert data["stopped_early"] is True and data["best_index"] is None
    assert len(data["points"]) == 1
    assert objective_value(result, "throughput") == 0.0


async def test_a_probe_within_the_margin_of_the_incumbent_goes_on() -> None:
    slo = TtftSlo(0.5)
    server = QueueServer(slo)
    early = EarlyStop(incumbent=1100.0, margin=0.15)  # 1150 >= 1100: it might still win
    cfg = RateSearchConfig(concurrency=8)
    result = await find_max_rate(server.measure, slo, cfg, early)
    assert not result.stopped_early and len(server.loads) > 1 and result.best is not None
    assert "stopped_early" not in result.to_json()
    # With no margin the same probe would have stopped.
    stopped = await find_max_rate(QueueServer(slo).measure, slo, cfg, EarlyStop(1100.0, 0.0))
    assert stopped.stopped_early


async def test_a_probe_that_is_the_answer_is_kept_whatever_the_incumbent() -> None:
    early = EarlyStop(incumbent=1e9)
    for slo in (None, TtftSlo(10.0)):  # no SLO; the SLO holds at saturation
        result = await find_max_rate(
            QueueServer(slo).measure, slo, RateSearchConfig(concurrency=4), early
        )
        assert not result.stopped_early and result.best is result.points[0]


async def test_goodput_is_bounded_by_the_probes_request_rate() -> None:
    slo = TtftSlo(0.5)
    stop = EarlyStop(incumbent=12.0, objective="goodput")  # 10 req/s x 1.15 < 12
    result = await find_max_rate(QueueServer(slo).measure, slo, RateSearchConfig(4), stop)
    assert result.stopped_early and "capacity 10 req/s" in result.reason
    go_on = EarlyStop(incumbent=11.0, objective="goodput")
    result = await find_max_rate(QueueServer(slo).measure, slo, RateSearchConfig(4), go_on)
    assert not result.stopped_early


# --- a finalist's re-run, one step down --------------------------------------------------------


def test_the_step_down_is_a_tenth_lower_rate_or_fewer_streams() -> None:
    cfg = RateSearchConfig(concurrency=4, seconds_per_point=10, min_requests=8)
    lower = step_down(LoadPoint(8.0, None, 80), cfg)
    assert lower == LoadPoint(pytest.approx(7.2), None, 72)
    closed = LoadPoint(math.inf, 8, 16, 10.0)
    assert step_down(closed, cfg) == LoadPoint(math.inf, 7, 16, 10.0)
    assert step_down(LoadPoint(math.inf, 2, 8, 10.0), cfg) == LoadPoint(math.inf, 1, 8, 10.0)
    assert step_down(LoadPoint(math.inf, 1, 8, 10.0), cfg) is None


async def test_a_rerun_that_misses_the_slo_is_measured_once_a_step_down() -> None:
    slo = TtftSlo(0.5)  # holds below 8 req/s
    cfg = RateSearchConfig(concurrency=4)
    server = QueueServer(slo)
    point, lower = await measure_held(server.measure, LoadPoint(8.5, None, 85), cfg)
    assert not point.slo_met and lower is not None and lower.slo_met
    assert lower.load.rate == pytest.approx(7.65)
    server = QueueServer(slo)
    point, lower = await measure_held(server.measure, LoadPoint(7.0, None, 70), cfg)
    assert point.slo_met and lower is None and len(server.loads) == 1
