"""One trial on the real engine: launch vLLM with a candidate, find its best SLO-meeting rate
within that launch, stop vLLM, and return a :class:`TrialRecord` (never raising for a failed
server: a failure is a record with its class and log). The server's life (start, the dead-server
watchdog, uvloop, stop) is ``tuner.measure.session``'s; a death mid-run keeps the points before it.

The load sends the API key the server requires (``--engine-arg api_key=...`` or
``VLLM_API_KEY``). A trial in which every request failed (401, 404, timeouts...) measured
nothing: it is a failed trial of class ``requests_failed`` with the status seen, not a candidate
scoring 0; a load point whose requests all got the same client error (4xx) ends it at once.

Given the incumbent (the best objective so far), a trial whose capacity probe cannot reach it
stops there: state pruned, ``failure`` ``{"rule": "early_stop", "reason": ...}``, the probe kept
(:class:`tuner.measure.ratesearch.EarlyStop`). Finalists are re-measured at their chosen load,
one step down when a run misses the SLO (:func:`tuner.measure.ratesearch.measure_held`): in
the trial's own launch right after its rate search when it contends (``in_trial_repeats``),
else relaunched, several finalists with equal settings in one launch (``remeasure_group``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from tuner.engine.log import redact_argv
from tuner.engine.server import EngineSettings, ServerStartError, VllmServer
from tuner.engine.settings import served_api_key
from tuner.load.generator import LoadConfig
from tuner.load.workload import load_tokenizer
from tuner.measure.bench import build_requests, measure
from tuner.measure.ratesearch import (
    EarlyStop,
    LoadPoint,
    RatePoint,
    RateSearchResult,
    find_max_rate,
    objective_value,
)
from tuner.measure.session import ServerDied, launched, run_watched
from tuner.plan.prune import Planned, Variant, feasible_concurrency
from tuner.plan.space import Candidate
from tuner.plan.variants import serving_values
from tuner.search.events import Fanout
from tuner.search.finalist_runs import chosen_load, contends, failed_samples, repeat_rounds
from tuner.search.order import EARLY_STOP_MARGIN, EARLY_STOP_OBJECTIVES
from tuner.search.record import (
    FinalistSample,
    TrialRecord,
)
from tuner.search.requests_failed import (
    REQUESTS_FAILED,
    RequestsFailed,
    all_failed,
    client_errors,
)
from tuner.search.trial_build import (
    base_record,
    failure_json,
    finished_record,
    launched_record,
    now,
)
from tuner.search.trial_setup import TrialSetup

# Requests built once per search and reused (cycled) by every measurement.
REQUEST_POOL = 512
WARMUP_REQUESTS = 4


class VllmTrialRunner:
    """The search's TrialRunner against real vLLM."""

    def __init__(self, setup: TrialSetup, observer: Any = None) -> None:
        self.setup = setup
        self.observer = observer if observer is not None else Fanout()
        self._pool: list[Any] | None = None

    # -- TrialRunner ---------------------------------------------------------------------------

    def measure(
        self, number: int, planned: Planned, variant: Variant, incumbent: float | None = None
    ) -> TrialRecord:
        """Launch, rate-search, stop. ``incumbent``: the best objective so far, when the search
        lets trials stop early (throughput and goodput: a probe below it ends the trial)."""
        settings = self.engine_settings(planned.candidate, variant)
        base = base_record(number, planned, variant)
        t0 = time.monotonic()
        log_path = self.setup.log_dir / f"{number:03d}-{planned.name[:100]}.log"
        points: list[RatePoint] = []  # what was measured, kept when the server dies
        try:
            with launched(settings, self.setup.launch, log_path=log_path) as server:
                base = launched_record(base, server)
                concurrency = self._concurrency(planned)
                early = self._early_stop(incumbent)
                result, again = run_watched(
                    server,
                    lambda stop: self._trial(
                        server, planned.name, concurrency, stop, points, early, incumbent
                    ),
                )
        except ServerStartError as exc:
            return replace(
                base,
                failure=failure_json(exc.failure),
                log_path=str(exc.failure.log_path or log_path),
                vllm_args=list(redact_argv(self.setup.launch.effective(settings).to_vllm_args())),
                engine_time_s=time.monotonic() - t0,
                finished_at=now(),
            )
        except RequestsFailed as failed:
            partial = RateSearchResult(tuple(points), None, 0.0, str(failed))
            return replace(
                base,
                rate_search=partial.to_json(),
                failure={
                    "class": REQUESTS_FAILED,
                    "message": str(failed),
                    "log_path": str(log_path),
                },
                engine_time_s=time.monotonic() - t0,
                finished_at=now(),
            )
        except ServerDied as died:
            partial = RateSearchResult(tuple(points), None, 0.0, "server died mid-run")
            return replace(
                base,
                rate_search=partial.to_json(),
                failure=failure_json(died.failure)
                if died.failure
                else {"class": "crashed", "message": "server died mid-run"},
                engine_time_s=time.monotonic() - t0,
                finished_at=now(),
            )
        return finished_record(base, result, again, time.monotonic() - t0, self._objective)

    async def trial_in_launch(
        self,
        server: VllmServer,
        planned: Planned,
        variant: Variant,
        stop: asyncio.Event,
        offset: int,
    ) -> TrialRecord:
        """The trial of ``planned`` on a server launched with its settings for another
        purpose (the max_num_seqs screen's launch): its rate search, then its in-trial re-runs,
        from request ``offset`` of the pool on; ``engine_time_s`` counts these only (the
        launch is the screen's); number -1 until the search registers it. RequestsFailed and
        ServerDied propagate."""
        base = launched_record(base_record(-1, planned, variant), server)
        t0, points = time.monotonic(), []
        conc = self._concurrency(planned)
        result, again = await self._trial(
            server, planned.name, conc, stop, points, None, None, offset
        )
        return finished_record(base, result, again, time.monotonic() - t0, self._objective)

    # -- helpers ----------------------------------------------------------------------------------

    def remeasure(
        self, record: TrialRecord, variant: Variant, repeats: int
    ) -> list[FinalistSample]:
        """Relaunch the candidate and measure its chosen load point ``repeats`` times, each
        one step down when it misses the SLO (:func:`~tuner.measure.ratesearch.measure_held`);
        a failed relaunch counts as zero throughput (it is part of the noise)."""
        return self.remeasure_group([record], variant, repeats)[record.name]

    def remeasure_group(
        self, records: Sequence[TrialRecord], variant: Variant, repeats: int
    ) -> dict[str, list[FinalistSample]]:
        """:meth:`remeasure` for finalists whose settings are equal (the search groups them),
        in ONE launch with the first one's settings: each repeat measures every finalist's
        point in turn, so that a drift over the launch falls on all of them alike. A finalist
        without a chosen point gets no samples; a failed launch, or a server that died, counts
        the worst value for every repeat of each (zero throughput; an endless latency)."""
        loads = {r.name: load for r in records if (load := chosen_load(r)) is not None}
        out: dict[str, list[FinalistSample]] = {r.name: [] for r in records}
        if not loads:
            return out
        settings = self.engine_settings(Candidate(**records[0].knobs), variant)
        log_path = self.setup.log_dir / f"finalist-{'+'.join(loads)[:100]}.log"
        try:
            with launched(settings, self.setup.launch, log_path=log_path) as server:
                out.update(
                    run_watched(server, lambda stop: self._repeat(server, loads, repeats, stop))
                )
        except (ServerStartError, ServerDied):
            out.update(failed_samples(loads, repeats, self.setup.objective))
        return out

    # -- helpers ----------------------------------------------------------------------------------

    def engine_settings(self, cand: Candidate, variant: Variant) -> EngineSettings:
        """Fixed settings, then the candidate's knobs, then the variant's model and method
        (:func:`tuner.plan.variants.serving_values`, which the profile is written from too)."""
        values = serving_values(self.setup.fixed, cand, variant)
        return EngineSettings.from_mapping(variant.model, values)

    def _concurrency(self, planned: Planned) -> int:
        """Closed-loop concurrency for the capacity probe: max_num_seqs (vLLM's default for
        the baseline), but no more sequences than the KV cache holds at the workload's context."""
        seqs = planned.candidate.max_num_seqs or self.setup.rate.concurrency
        return feasible_concurrency(seqs, planned.max_concurrency)

    def requests(self) -> list[Any]:
        if self._pool is None:
            tokenizer = load_tokenizer(self.setup.tokenizer)
            spec = replace(self.setup.workload, num_prompts=REQUEST_POOL)
            self._pool = build_requests(
                tokenizer, spec, extra=WARMUP_REQUESTS, endpoint=self.setup.endpoint
            )  # type: ignore[arg-type]
        return self._pool

    async def _point(
        self,
        server: VllmServer,
        name: str,
        load: LoadPoint,
        warmup: int,
        offset: int,
        stop: asyncio.Event,
    ) -> RatePoint:
        """Measure ``load`` once; raises ServerDied (the point is dropped) when the server died
        during it (``stop`` is the watchdog's: set, it ends the load at once)."""
        pool = self.requests()
        n = load.num_requests + warmup
        reqs: Sequence[Any] = [pool[(offset + i) % len(pool)] for i in range(n)]
        cfg = LoadConfig(
            rate=load.rate,
            concurrency=load.concurrency,
            num_requests=None if load.duration_s else load.num_requests,
            duration_s=load.duration_s,
            warmup=warmup,
            timeout_s=self.setup.request_timeout_s,
            endpoint=self.setup.endpoint,
            api_key=served_api_key(server.settings, server.launch),
        )  # type: ignore[arg-type]
        served = server.info.model if server.info and server.info.model else server.settings.model
        watch = None if self.setup.watch is None else self.setup.watch.for_server(server)
        m = await measure(server.url, served, reqs, cfg, slo=self.setup.slo, stop=stop, watch=watch)
        if stop.is_set() or server.poll_failure() is not None:
            raise ServerDied(server.poll_failure())
        ok = m.summary.failed == 0 and (self.setup.slo is None or self.setup.slo.met(m.summary))
        server_json = None if m.server is None else m.server.to_json()
        point = RatePoint(load, m.summary, ok, server_json, m.telemetry_json(), m.roofline_json())
        self.observer.on_point(name, point.to_json())
        return point

    def _early_stop(self, incumbent: float | None) -> EarlyStop | None:
        """The early stop this trial runs under: with an incumbent that measured something,
        for an objective the capacity probe bounds from above (throughput, goodput)."""
        margin = self.setup.early_stop_margin
        if not incumbent or margin is None or self.setup.objective not in EARLY_STOP_OBJECTIVES:
            return None
        return EarlyStop(incumbent, margin, self.setup.objective)

    async def _trial(
        self,
        server: VllmServer,
        name: str,
        concurrency: int,
        stop: asyncio.Event,
        points: list[RatePoint],
        early: EarlyStop | None,
        incumbent: float | None,
        offset: int = 0,
    ) -> tuple[RateSearchResult, list[FinalistSample]]:
        """The rate search, then, for a contender (:func:`contends`), its chosen load re-run
        ``in_trial_repeats`` times in this launch: the finalist samples a relaunch would cost."""
        result = await self._search(server, name, concurrency, stop, points, early, offset)
        margin = self.setup.early_stop_margin
        margin = EARLY_STOP_MARGIN if margin is None else margin  # 0 is a margin too
        value = None if result.best is None else self._objective(result)
        if not self.setup.in_trial_repeats or value is None or result.stopped_early:
            return result, []
        if not contends(value, incumbent, margin):
            return result, []
        warm = 0 if offset else WARMUP_REQUESTS
        sent = offset + warm + sum(p.load.num_requests for p in points)
        loads = {name: result.best.load}  # type: ignore[union-attr]
        runs = await self._repeat(server, loads, self.setup.in_trial_repeats, stop, sent)
        return result, runs[name]

    async def _search(
        self,
        server: VllmServer,
        name: str,
        concurrency: int,
        stop: asyncio.Event,
        points: list[RatePoint],
        early: EarlyStop | None = None,
        offset: int = 0,
    ) -> RateSearchResult:
        """The rate search within this launch; every measured point is appended to ``points``
        as it completes, so the caller keeps them when the server dies. ``offset``: the
        requests of the pool the launch has sent already (a warm server: no warm-up)."""
        counter = {"offset": offset}

        async def measure_at(load: LoadPoint) -> RatePoint:
            warmup = WARMUP_REQUESTS if not points and not offset else 0
            point = await self._point(server, name, load, warmup, counter["offset"], stop)
            counter["offset"] += load.num_requests + warmup
            points.append(point)
            if point.summary.completed == 0 and client_errors(point.summary.errors):
                raise RequestsFailed(all_failed(points))  # more of the same measures nothing
            return point

        if self.setup.objective == "latency":
            rate = self.setup.latency_rate or 1.0
            load = LoadPoint(rate, None, self.setup.rate.requests_for(rate))
            point = await measure_at(load)
            if not point.summary.completed and point.summary.failed:
                raise RequestsFailed(all_failed(points))
            return RateSearchResult(
                (point,),
                point,
                point.summary.request_throughput,
                f"latency objective: fixed rate {rate:g} req/s",
            )
        cfg = replace(self.setup.rate, concurrency=concurrency)
        result = await find_max_rate(measure_at, self.setup.slo, cfg, early)
        if points and not any(p.summary.completed for p in points):
            raise RequestsFailed(all_failed(points))
        return result

    async def _repeat(
        self,
        server: VllmServer,
        loads: Mapping[str, LoadPoint],
        repeats: int,
        stop: asyncio.Event,
        offset: int = 0,
    ) -> dict[str, list[FinalistSample]]:
        """The finalists' rounds of re-runs in this launch (:func:`repeat_rounds`); the
        latency objective is measured at its fixed rate only: a step down would change what
        it measures. ``offset``: a trial's own re-runs start past its rate search's requests
        (the server is warm then: no warm-up)."""

        async def at(name: str, load: LoadPoint, warmup: int, offset: int) -> RatePoint:
            return await self._point(server, name, load, warmup, offset, stop)

        step = self.setup.objective != "latency"
        warmup = 0 if offset else WARMUP_REQUESTS
        return await repeat_rounds(
            at,
            loads,
            repeats,
            self.setup.rate,
            self._objective,
            step=step,
            warmup=warmup,
            offset=offset,
            in_trial=bool(offset),
        )

    def _objective(self, result: RateSearchResult) -> float:
        if self.setup.objective != "latency":
            return objective_value(result, self.setup.objective)
        if result.best is None:
            return math.inf
        metric, stat = self.setup.latency_stat
        value = result.best.summary.stat(metric, stat)
        return math.inf if value is None else value * 1000.0
