"""Live Prometheus metrics of ``vtune bench``: request counts, requests in flight, token counts
and latency histograms (seconds, Prometheus's own bucket format) fed by :meth:`observe` with
each finished :class:`~tuner.load.generator.RequestRecord`; at the end the run's throughputs
and its telemetry and roofline gauges (``tuner.outputs.prometheus_point``: CPU percent, GPU
utilization, bandwidth and FLOP fractions, regime). Served and pushed by
``tuner.outputs.prometheus_serve``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tuner.outputs.prometheus_point import PointGauges
from tuner.outputs.prometheus_serve import Pushgateway, RegistryExporter, set_gauge

# Bucket bounds in seconds, close to vLLM's own so the two can be read side by side.
# fmt: off
TTFT_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0,
)
TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)
E2E_BUCKETS = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0,
)
# fmt: on


class BenchExporter(RegistryExporter):
    """Live metrics of one benchmark run. The load loop calls :meth:`started` when it sends a
    request (optional: it only drives the in-flight gauge) and :meth:`observe` with each
    finished :class:`~tuner.load.generator.RequestRecord`; :meth:`finish` sets the summary
    gauges and pushes. Safe to call from the event loop thread; never raises because of
    Prometheus."""

    default_job = "vtune-bench"

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        pushgateway: Pushgateway | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(registry, pushgateway, "vtune_bench", "What this vtune bench runs", info)
        r = self.registry
        self.requests = Counter(
            "vtune_bench_requests", "Requests finished, by status", ["status"], registry=r
        )
        for status in ("ok", "error"):
            self.requests.labels(status)
        self.in_flight = Gauge("vtune_bench_requests_in_flight", "Requests in flight", registry=r)
        self.output_tokens = Counter(
            "vtune_bench_output_tokens", "Output tokens received", registry=r
        )
        self.prompt_tokens = Counter("vtune_bench_prompt_tokens", "Prompt tokens sent", registry=r)
        self.ttft = Histogram(
            "vtune_bench_ttft_seconds", "Time to first token", buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "vtune_bench_tpot_seconds",
            "Time per output token (after the first)",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "vtune_bench_itl_seconds",
            "Inter-token latency (every gap)",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2el = Histogram(
            "vtune_bench_e2el_seconds",
            "End-to-end request latency",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.output_tps = Gauge(
            "vtune_bench_output_throughput", "Output tokens/s of the finished run", registry=r
        )
        self.request_tps = Gauge(
            "vtune_bench_request_throughput", "Requests/s of the finished run", registry=r
        )
        self.output_tps.set(math.nan)
        self.request_tps.set(math.nan)
        self.point = PointGauges(r)  # telemetry and roofline of the run (set by finish)
        self._flying = 0
        self._lock = threading.Lock()

    def started(self) -> None:
        with self._lock:
            self._flying += 1
            self.in_flight.set(self._flying)

    def observe(self, record: Any) -> None:
        """Count one finished request (a RequestRecord) and feed its timings to the histograms.
        Failed requests count under status="error" and feed no histogram."""
        with self._lock:
            self._flying = max(0, self._flying - 1)
            self.in_flight.set(self._flying)
        if record.error is not None:
            self.requests.labels("error").inc()
            return
        self.requests.labels("ok").inc()
        self.prompt_tokens.inc(max(0, record.prompt_len))
        self.output_tokens.inc(max(0, record.num_output))
        for hist, value in (
            (self.ttft, record.ttft),
            (self.tpot, record.tpot),
            (self.e2el, record.e2el),
        ):
            if value is not None and value >= 0:
                hist.observe(value)
        for gap in record.itl:
            self.itl.observe(gap)

    def observe_all(self, records: Iterable[Any]) -> None:
        """For a loop that has no per-request hook: feed a finished run's records at once."""
        for rec in records:
            self.observe(rec)

    def finish(
        self,
        summary: Mapping[str, Any] | None = None,
        telemetry: Mapping[str, Any] | None = None,
        roofline: Mapping[str, Any] | None = None,
    ) -> None:
        """Set the run's throughputs (a ``BenchSummary.to_json()`` dict), its telemetry and
        roofline gauges (``Measurement.telemetry_json()`` / ``roofline_json()``) and push."""
        if summary is not None:
            set_gauge(self.output_tps, summary.get("output_throughput"))
            set_gauge(self.request_tps, summary.get("request_throughput"))
        self.point.set(telemetry, roofline)
        self._push()
