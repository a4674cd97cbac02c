"""Scraping vLLM's Prometheus ``/metrics`` during a run.

:class:`Scraper` is an asyncio task that polls ``/metrics`` every ``interval`` seconds, keeps a
time series of the metrics in :data:`WATCHED` and never lets a failed scrape stop the load
(failures are counted). :meth:`Scraper.summary` reduces the series over a window to
:class:`ServerStats`: peak KV-cache usage, preemptions, max running / waiting, token deltas,
the server's own TTFT (from its histogram) and the prefix-cache hit rate (cached prompt tokens
over prompt tokens looked up).

:func:`parse_metrics` is pure: Prometheus text -> ``{name: value}`` summed over label sets
(engines, models), histogram buckets keyed ``name{le="x"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"  # vLLM V0's name for the same gauge
PREEMPTIONS = "vllm:num_preemptions_total"
GEN_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
TTFT = "vllm:time_to_first_token_seconds"
E2E = "vllm:e2e_request_latency_seconds"
SUCCESS = "vllm:request_success_total"
# Prefix cache, in prompt tokens: queried and found cached (vLLM V1's counters).
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"

WATCHED = (
    RUNNING,
    WAITING,
    KV_USAGE,
    KV_USAGE_OLD,
    PREEMPTIONS,
    GEN_TOKENS,
    PROMPT_TOKENS,
    SUCCESS,
    TTFT,
    E2E,
    PREFIX_QUERIES,
    PREFIX_HITS,
)
_PREFIXES = tuple(name.encode() for name in WATCHED) + tuple(
    b"# TYPE " + name.encode() for name in WATCHED
)


def parse_metrics(text: str | bytes, names: tuple[str, ...] | None = WATCHED) -> dict[str, float]:
    """Samples of the given metric names (all if None), summed over label sets.

    Histogram buckets are kept per bound as ``name_bucket{le="0.1"}``; ``_sum``/``_count``
    and counters' ``_total`` samples keep their sample names.
    """
    raw = text.encode() if isinstance(text, str) else text
    if names is not None:  # cheap pre-filter: vLLM serves hundreds of lines we do not need
        prefixes = (
            _PREFIXES
            if names is WATCHED
            else tuple(p for n in names for p in (n.encode(), b"# TYPE " + n.encode()))
        )
        raw = b"\n".join(ln for ln in raw.splitlines() if ln.startswith(prefixes)) + b"\n"
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(raw.decode("utf-8", "replace")):
        for s in family.samples:
            key = s.name
            if s.name.endswith("_bucket") and "le" in s.labels:
                key = f'{s.name}{{le="{s.labels["le"]}"}}'
            out[key] = out.get(key, 0.0) + float(s.value)
    return out


@dataclass(frozen=True)
class Sample:
    """One scrape: ``perf_counter`` time and the parsed values."""

    t: float
    values: Mapping[str, float]


@dataclass(frozen=True)
class ServerStats:
    """The server's view of a window. None where the server did not expose the metric or no
    scrape succeeded. ``server_ttft_mean`` comes from the TTFT histogram's sum/count deltas."""

    samples: int
    failures: int
    peak_kv_cache_usage: float | None
    max_running: float | None
    max_waiting: float | None
    preemptions: float | None
    generation_tokens: float | None
    prompt_tokens: float | None
    requests_finished: float | None
    server_ttft_mean: float | None
    last_error: str | None = None
    ttft_buckets: tuple[tuple[float, float], ...] = field(default=())
    # (seconds since the window's start, KV usage 0..1, running, waiting) per scrape.
    series: tuple[tuple[float, float | None, float | None, float | None], ...] = field(default=())
    # Prompt tokens looked up in / found in the prefix cache over the window; None when the
    # server does not export the counters. The rate is hits / queries (None with no query).
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        q, h = self.prefix_cache_queries, self.prefix_cache_hits
        return None if q is None or h is None or q <= 0 else h / q

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["ttft_buckets"] = [list(b) for b in self.ttft_buckets]
        out["series"] = [list(p) for p in self.series]
        out["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        return out


class Scraper:
    """Poll ``{base_url}/metrics`` every ``interval`` s while running (async context manager).

    One scrape happens on entry and one on exit, so counter deltas cover the whole run even
    when it is shorter than the interval. Never raises because of the server.
    """

    def __init__(
        self,
        base_url: str,
        interval: float = 0.5,
        timeout: float = 2.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/metrics"
        self.interval = interval
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.samples: list[Sample] = []
        self.failures = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def scrape(self) -> Sample | None:
        """One scrape, appended to ``samples``; None (and a failure counted) if it failed."""
        assert self._session is not None
        try:
            async with asyncio.timeout(self.timeout):
                async with self._session.get(self.url, headers=self.headers) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}")
                    body = await resp.read()
            sample = Sample(time.perf_counter(), parse_metrics(body))
        except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError, ValueError) as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            return None
        self.samples.append(sample)
        return sample

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.scrape()

    async def start(self) -> None:
        """First scrape, then poll in the background."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        await self.scrape()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop polling, take the last scrape, close the session (safe to call twice)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            try:
                await self.scrape()
            finally:
                await self._session.close()
                self._session = None

    async def __aenter__(self) -> Scraper:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def summary(self, start: float | None = None, end: float | None = None) -> ServerStats:
        return summarize_samples(self.samples, start, end, self.failures, self.last_error)


def summarize_samples(
    samples: list[Sample],
    start: float | None = None,
    end: float | None = None,
    failures: int = 0,
    last_error: str | None = None,
) -> ServerStats:
    """Reduce a series to ServerStats. Counter deltas run from the last sample at or before
    ``start`` (else the first) to the first sample at or after ``end`` (else the last);
    peaks are taken over every sample between those two."""
    if not samples:
        return ServerStats(0, failures, None, None, None, None, None, None, None, None, last_error)
    lo = 0
    if start is not None:
        before = [i for i, s in enumerate(samples) if s.t <= start]
        lo = before[-1] if before else 0
    hi = len(samples) - 1
    if end is not None:
        after = [i for i, s in enumerate(samples) if s.t >= end]
        hi = after[0] if after else hi
    span = samples[lo : hi + 1]
    first, last = span[0].values, span[-1].values

    def peak(*names: str) -> float | None:
        vals = [s.values[n] for s in span for n in names if n in s.values]
        return max(vals) if vals else None

    def delta(name: str) -> float | None:
        if name not in first or name not in last:
            return None
        return last[name] - first[name]

    ttft_sum, ttft_count = delta(f"{TTFT}_sum"), delta(f"{TTFT}_count")
    bucket_prefix = f'{TTFT}_bucket{{le="'
    buckets = sorted(
        (float(k[len(bucket_prefix) : -2]), last[k] - first.get(k, 0.0))
        for k in last
        if k.startswith(bucket_prefix)
    )
    return ServerStats(
        samples=len(samples),
        failures=failures,
        peak_kv_cache_usage=peak(KV_USAGE, KV_USAGE_OLD),
        max_running=peak(RUNNING),
        max_waiting=peak(WAITING),
        preemptions=delta(PREEMPTIONS),
        generation_tokens=delta(GEN_TOKENS),
        prompt_tokens=delta(PROMPT_TOKENS),
        requests_finished=delta(SUCCESS),
        server_ttft_mean=(ttft_sum / ttft_count) if ttft_sum is not None and ttft_count else None,
        last_error=last_error,
        ttft_buckets=tuple(buckets),
        series=tuple(
            (
                round(s.t - (start if start is not None else span[0].t), 3),
                s.values.get(KV_USAGE, s.values.get(KV_USAGE_OLD)),
                s.values.get(RUNNING),
                s.values.get(WAITING),
            )
            for s in span
        ),
        prefix_cache_queries=delta(PREFIX_QUERIES),
        prefix_cache_hits=delta(PREFIX_HITS),
    )
