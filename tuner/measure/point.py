"""One load point on a running server: :func:`measure` drives the load, scrapes vLLM's
``/metrics`` inside the measured window, samples telemetry and places the point on the
roofline (:mod:`tuner.measure.watch`), then summarizes. ``vtune bench`` measures once; a search
trial calls it for every rate of its rate search within one launch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuner.load.generator import (
    LoadConfig,
    LoadResult,
    Observer,
    RequestRecord,
    Window,
    auth_headers,
    run_load,
)
from tuner.load.workload import Request
from tuner.measure.metrics import BenchSummary, summarize
from tuner.measure.scrape import Scraper, ServerStats
from tuner.measure.slo import Slo
from tuner.measure.telemetry import Telemetry
from tuner.measure.watch import PointRoofline, Watch, telemetry_json


@dataclass(frozen=True)
class Measurement:
    """One load run on a running server: the raw records, their summary, the server's view,
    and what was watched (:mod:`tuner.measure.watch`): the telemetry sampled inside the
    measured window, the point's roofline, notes on what could not be watched."""

    load: LoadResult
    summary: BenchSummary
    server: ServerStats | None
    telemetry: Telemetry | None = None
    roofline: PointRoofline | None = None
    watch: Watch | None = None
    notes: tuple[str, ...] = ()

    @property
    def records(self) -> tuple[RequestRecord, ...]:
        return self.load.records

    @property
    def window(self) -> Window:
        return self.load.window

    def telemetry_json(self) -> dict[str, Any] | None:
        """The point's ``telemetry`` block (None when telemetry was off)."""
        options = None if self.watch is None else self.watch.telemetry
        return telemetry_json(self.telemetry, self.notes, options)

    def roofline_json(self) -> dict[str, Any] | None:
        return None if self.roofline is None else self.roofline.to_json()


async def measure(
    url: str,
    model_name: str,
    requests: Sequence[Request],
    load_cfg: LoadConfig,
    scraper: bool = True,
    *,
    slo: Slo | None = None,
    stop: asyncio.Event | None = None,
    scrape_interval: float = 0.5,
    observer: Observer | None = None,
    watch: Watch | None = None,
) -> Measurement:
    """Drive ``url`` with ``requests`` (the first ``load_cfg.warmup`` are warm-up), scraping
    ``/metrics`` during the measured window unless ``scraper`` is False; summarize afterwards.
    With a ``watch``, telemetry is sampled through the load (the samples inside the measured
    window are kept) and the point is placed on the roofline.

    Never raises because of the server: failures are in the records (and ``stop``, set by the
    caller, ends the run early with the records so far).
    """
    sampler, notes = (None, ()) if watch is None else watch.sampler()
    if sampler is not None:
        sampler.start()
    scr = (
        Scraper(url, interval=scrape_interval, headers=_bearer_only(load_cfg.api_key))
        if scraper
        else None
    )
    try:
        # The scraper starts after warm-up, so its counter deltas cover the measured phase only.
        load = await run_load(
            url,
            model_name,
            requests,
            load_cfg,
            stop=stop,
            on_measure=None if scr is None else scr.start,
            observer=observer,
        )
        if scr is not None:  # vLLM updates its counters as it sends the last chunk
            await asyncio.sleep(0.05)
    finally:
        if scr is not None:
            await scr.stop()
        telemetry = None if sampler is None else sampler.stop()
    summary = summarize(load.records, load.window, slo)
    server = None if scr is None else scr.summary(load.window.start, load.window.end)
    if telemetry is not None:
        telemetry = telemetry.between(load.window.start, load.window.end)
    roofline = None
    if watch is not None:
        roofline = watch.roofline(load, summary.output_throughput, server)
    return Measurement(load, summary, server, telemetry, roofline, watch, tuple(notes))


def _bearer_only(api_key: str | None) -> dict[str, str]:
    headers = auth_headers(api_key)
    headers.pop("Content-Type", None)
    return headers


__all__ = ["Measurement", "measure"]
