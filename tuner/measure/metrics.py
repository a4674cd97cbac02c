"""Summaries of a load run: pure functions over request records, computed after the load.

:func:`summarize` keeps only the records that started inside the measurement window (warm-up
is before it), builds one :class:`Distribution` per metric (TTFT, TPOT, ITL, E2EL; seconds
inside, milliseconds in JSON) and the throughputs, plus goodput when an SLO is given.
:meth:`BenchSummary.to_json` uses ``vllm bench serve``'s result field names.

The SLO grammar lives in :mod:`tuner.measure.slo`, the /metrics scraper in
:mod:`tuner.measure.scrape`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuner.load.generator import RequestRecord, Window
from tuner.measure.slo import Slo

PERCENTILES = (50, 90, 95, 99)
METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True)
class Distribution:
    """Summary statistics of one metric. Every field is None when there are no values.

    Percentiles use numpy's default (linear interpolation), as vLLM's benchmark does;
    ``std`` is the population standard deviation (numpy's default, also vLLM's).
    """

    count: int = 0
    mean: float | None = None
    median: float | None = None
    std: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    min: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution:
        arr = np.fromiter(values, dtype=float)
        if arr.size == 0:
            return cls()
        p50, p90, p95, p99 = (float(v) for v in np.percentile(arr, PERCENTILES))
        return cls(
            count=int(arr.size),
            mean=float(arr.mean()),
            median=float(np.median(arr)),
            std=float(arr.std()),
            p50=p50,
            p90=p90,
            p95=p95,
            p99=p99,
            min=float(arr.min()),
            max=float(arr.max()),
        )

    def get(self, stat: str) -> float | None:
        """A statistic by name: mean, median, std, p50, p90, p95, p99, min or max."""
        if stat not in ("mean", "median", "std", "min", "max") and stat not in {
            f"p{p}" for p in PERCENTILES
        }:
            raise KeyError(stat)
        return getattr(self, stat)

    def scaled(self, factor: float) -> Distribution:
        """The same distribution in other units (e.g. factor 1000: seconds -> ms)."""
        vals = {
            k: (None if v is None else v * factor) for k, v in self.__dict__.items() if k != "count"
        }
        return Distribution(count=self.count, **vals)


@dataclass(frozen=True)
class BenchSummary:
    """What one measurement yields. Latency distributions are in seconds; throughputs per second
    of the window's duration; ``request_goodput`` is None unless an SLO was given."""

    completed: int
    failed: int
    duration: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    peak_in_flight: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    slo: str | None = None

    def stat(self, metric: str, stat: str) -> float | None:
        """One statistic of one metric, in seconds (the Slo.check protocol)."""
        if metric not in METRIC_NAMES:
            raise KeyError(metric)
        return getattr(self, metric).get(stat)

    def to_json(self) -> dict[str, Any]:
        """``vllm bench serve`` field names: completed, failed, ..., mean_ttft_ms, p99_itl_ms."""
        out: dict[str, Any] = {
            "duration": self.duration,
            "completed": self.completed,
            "failed": self.failed,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "max_output_tokens_per_s": self.max_output_tokens_per_s,
            "max_concurrent_requests": self.max_concurrent_requests,
            "peak_in_flight": self.peak_in_flight,
        }
        for name in METRIC_NAMES:
            d = getattr(self, name).scaled(1000.0)
            out[f"mean_{name}_ms"] = d.mean
            out[f"median_{name}_ms"] = d.median
            out[f"std_{name}_ms"] = d.std
            for p in PERCENTILES:
                out[f"p{p}_{name}_ms"] = getattr(d, f"p{p}")
        out["error_counts"] = dict(self.errors)
        out["slo"] = self.slo
        return out


def summarize(
    records: Sequence[RequestRecord], window: Window, slo: Slo | None = None
) -> BenchSummary:
    """Summarize the records that started inside ``window`` (pure; warm-up records drop out).

    Failed requests count in ``failed`` only; tokens and latencies come from successful ones.
    TPOT is taken over requests with at least two output tokens; ITL pools every gap.
    """
    inside = [r for r in records if r in window]
    good = [r for r in inside if r.ok]
    dur = window.duration if window.duration > 0 else float("nan")
    total_in = sum(r.prompt_len for r in good)
    total_out = sum(r.num_output for r in good)
    itls = [gap for r in good for gap in r.itl]
    goodput = None
    if slo is not None:
        goodput = sum(1 for r in good if slo.request_ok(r)) / dur
    peak_tokens, peak_conc = _peaks(good)
    errors = Counter(_error_kind(r.error) for r in inside if r.error is not None)
    return BenchSummary(
        completed=len(good),
        failed=len(inside) - len(good),
        duration=window.duration,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(good) / dur,
        request_goodput=goodput,
        output_throughput=total_out / dur,
        total_token_throughput=(total_in + total_out) / dur,
        ttft=Distribution.of(r.ttft for r in good if r.ttft is not None),
        tpot=Distribution.of(r.tpot for r in good if r.tpot is not None),
        itl=Distribution.of(itls),
        e2el=Distribution.of(r.e2el for r in good if r.e2el is not None),
        max_output_tokens_per_s=peak_tokens,
        max_concurrent_requests=peak_conc,
        peak_in_flight=_in_flight(inside),
        errors=dict(errors.most_common()),
        slo=None if slo is None else str(slo),
    )


def _error_kind(error: str) -> str:
    """Group errors by their first 80 characters (counts per kind go into the summary)."""
    return error[:80]


def _peaks(records: Sequence[RequestRecord]) -> tuple[float, int]:
    """vLLM's max_output_tokens_per_s and max_concurrent_requests: token chunks per one-second
    bucket from the first start, and requests active in each bucket."""
    if not records:
        return 0.0, 0
    t0 = min(r.start for r in records)
    t1 = max(r.end if r.end is not None else r.start for r in records)
    n = int(np.ceil(t1 - t0)) + 1
    tokens = np.zeros(n)
    active = np.zeros(n)
    for r in records:
        if r.chunk_times:
            idx = (np.asarray(r.chunk_times) - t0).astype(int)
            np.add.at(tokens, idx[(idx >= 0) & (idx < n)], 1)
        end = r.end if r.end is not None else r.start
        active[int(r.start - t0) : int(end - t0) + 1] += 1
    return float(tokens.max()), int(active.max())


def _in_flight(records: Sequence[RequestRecord]) -> int:
    """The most requests in flight at one instant (vLLM's max_concurrent_requests counts every
    request active during a one-second bucket, which overstates short requests)."""
    events = sorted(
        [(r.start, 1) for r in records]
        + [(r.end if r.end is not None else r.start, -1) for r in records],
        key=lambda e: (e[0], e[1]),  # an end before a start at the same instant
    )
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak
