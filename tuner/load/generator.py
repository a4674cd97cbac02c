"""The load generator: many streamed requests on an arrival schedule, against one server.

* :class:`LoadConfig` — rate, burstiness, concurrency, warm-up, stop by count or duration,
  per-request timeout, endpoint; an API key a header cannot carry is refused here.
* :func:`arrivals` — the schedule (:mod:`tuner.load.schedule`): Poisson, gamma, constant or all
  at once (rate = inf, usually with a concurrency limit: closed loop); a request set built to
  replay a trace (every measured request has ``Request.at``) goes at its recorded times instead,
  and a conversation's turns wait for their session's previous turn and think time.
* :func:`run_load` — warm-up (not measured), then the measured phase until the request count or
  the duration is reached; returns every record and the measurement window.

One request (:class:`RequestRecord`, :func:`send_request`) lives in :mod:`tuner.load.stream`,
SSE parsing in :mod:`tuner.load.sse`, the HTTP transports in :mod:`tuner.load.transport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tuner.errors import ParameterError
from tuner.load.schedule import (
    SessionGate,
    arrivals,
    interarrival_gaps,
    replay_arrivals,
    replays,
)
from tuner.load.stream import (
    Flight,
    RequestRecord,
    auth_headers,
    build_payload,
    endpoint_url,
    send_request,
)
from tuner.load.transport import Transport, make_transport
from tuner.load.workload import Endpoint, Request

__all__ = [
    "LoadConfig",
    "LoadResult",
    "Observer",
    "RequestRecord",
    "Window",
    "arrivals",
    "auth_headers",
    "build_payload",
    "endpoint_url",
    "interarrival_gaps",
    "run_load",
    "send_request",
]

clock = time.perf_counter


@dataclass(frozen=True)
class LoadConfig:
    """How to drive the server. ``rate`` in requests/s (inf: all at once); ``burstiness`` 1 is
    Poisson, inf is constant spacing; ``concurrency`` caps requests in flight (closed loop when
    rate is inf). The first ``warmup`` requests of the set are sent and waited for before the
    measurement starts. The measured phase stops after ``num_requests`` (default: the rest of
    the set) or, when ``duration_s`` is given, when that many seconds have passed (the set is
    then cycled). ``timeout_s`` bounds each request. The API key is never printed.
    ``replay`` says the requests were built to replay a trace (each has ``Request.at``): they
    go at those times, rate and burstiness unused (a set with send times is replayed even
    without it; the flag names the arrival and insists on the times)."""

    rate: float = math.inf
    burstiness: float = 1.0
    concurrency: int | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    warmup: int = 0
    timeout_s: float = 300.0
    endpoint: Endpoint = "completions"
    seed: int = 0
    ignore_eos: bool = True
    api_key: str | None = field(default=None, repr=False, compare=False)
    replay: bool = False  # the requests carry their send times (a replayed trace)

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ParameterError(f"request rate must be positive, got {self.rate}")
        if not self.burstiness > 0:
            raise ParameterError(f"burstiness must be positive, got {self.burstiness}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ParameterError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ParameterError(f"number of requests must be at least 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ParameterError(f"duration must be positive, got {self.duration_s}")
        if self.warmup < 0:
            raise ParameterError(f"warm-up request count must be >= 0, got {self.warmup}")
        if not self.timeout_s > 0:
            raise ParameterError(f"request timeout must be positive, got {self.timeout_s}")
        if self.duration_s is not None and math.isinf(self.rate) and self.concurrency is None:
            raise ParameterError("a duration-limited run needs a finite rate or a concurrency")
        if self.endpoint not in ("completions", "chat"):
            raise ParameterError(f"endpoint must be 'completions' or 'chat', got {self.endpoint}")
        auth_headers(self.api_key)  # a key no HTTP header can carry fails here, before any request

    @property
    def arrival(self) -> str:
        if self.replay:
            return "replay"
        if math.isinf(self.rate):
            return "closed-loop" if self.concurrency else "all-at-once"
        if math.isinf(self.burstiness):
            return "constant"
        return "poisson" if self.burstiness == 1.0 else "gamma"


@dataclass(frozen=True)
class Window:
    """The measurement window in ``perf_counter`` seconds; warm-up lies before ``start``."""

    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start

    def __contains__(self, record: RequestRecord) -> bool:
        return self.start <= record.start <= self.end


@dataclass(frozen=True)
class LoadResult:
    """Every record (warm-up included, in send order) and the measurement window.
    ``stopped`` says why the measured phase ended: "count", "duration" or "aborted: <why>"."""

    records: tuple[RequestRecord, ...]
    window: Window
    stopped: str

    @property
    def measured(self) -> tuple[RequestRecord, ...]:
        return tuple(r for r in self.records if r in self.window)


# --- arrivals ---------------------------------------------------------------------------------


# --- the run ----------------------------------------------------------------------------------


class Observer(Protocol):
    """Live hooks (e.g. a Prometheus exporter): ``started()`` when a request is sent,
    ``observe(record)`` when it has finished. Called on the event loop; must not block."""

    def started(self) -> None: ...
    def observe(self, record: RequestRecord) -> None: ...


async def run_load(
    base_url: str,
    model: str,
    requests: Sequence[Request],
    cfg: LoadConfig,
    *,
    stop: asyncio.Event | None = None,
    on_measure: Callable[[], Awaitable[object]] | None = None,
    observer: Observer | None = None,
) -> LoadResult:
    """Warm up with ``requests[:cfg.warmup]``, then measure with the rest (see LoadConfig).

    ``stop``, when set by the caller (e.g. the server died), ends the run early: no new request
    is sent and those in flight are cancelled and kept with error "aborted". Never hangs past
    the last request's timeout. ``on_measure`` is awaited between warm-up and measurement
    (e.g. to start a /metrics scraper); ``observer`` sees the measured requests live.
    """
    if len(requests) <= cfg.warmup:
        raise ParameterError(
            f"{len(requests)} requests leave none to measure after {cfg.warmup} warm-up ones"
        )
    url = endpoint_url(base_url, cfg.endpoint)
    transport = make_transport(url, auth_headers(cfg.api_key), cfg.concurrency)
    sender = _Sender(
        transport,
        requests,
        [build_payload(r, model, cfg.endpoint, cfg.ignore_eos) for r in requests],
        cfg,
        stop or asyncio.Event(),
    )
    try:
        warm: list[RequestRecord] = []
        if cfg.warmup:
            warm, _ = await sender.phase(range(cfg.warmup), math.inf, None)
        measured = range(cfg.warmup, len(requests))
        replay = replays(requests, measured)  # a trace built for replay: its own send times
        if cfg.replay and not replay:
            raise ParameterError("a replay needs requests with send times (a trace's)")
        if cfg.duration_s is not None and cfg.num_requests is None:
            order: Iterable[int] = itertools.cycle(measured)
        elif cfg.num_requests is not None:
            order = (measured[i % len(measured)] for i in range(cfg.num_requests))
        else:
            order = measured
        if on_measure is not None:
            await on_measure()
        with _gc_frozen():
            start = clock()
            until = start + cfg.duration_s if cfg.duration_s is not None else None
            records, stopped = await sender.phase(order, cfg.rate, until, observer, replay)
            end = clock()
    finally:
        await transport.close()
    return LoadResult(tuple(warm) + tuple(records), Window(start, end), stopped)


@contextlib.contextmanager
def _gc_frozen() -> Iterator[None]:
    """Freeze what exists for the measured phase: a full collection over the request pool and
    tokenizer (~370k objects) pauses the event loop for ~0.2 s, which would land on some
    request's TTFT. Freezing is O(1) (no collection first, which would delay the phase); new
    garbage is still collected, and everything is unfrozen afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _acquire_or_stop(sem: asyncio.Semaphore, stop_wait: asyncio.Future[object]) -> bool:
    """Take a semaphore slot; False (holding nothing) if ``stop`` fires first."""
    if not sem.locked():
        await sem.acquire()
        return True
    acquire = asyncio.ensure_future(sem.acquire())
    await asyncio.wait({acquire, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if acquire.done():
        return True
    acquire.cancel()
    return False


@dataclass
class _Sender:
    """Sends requests by index on an arrival schedule (one phase at a time)."""

    transport: Transport
    requests: Sequence[Request]
    bodies: list[bytes]
    cfg: LoadConfig
    stop: asyncio.Event
    gate: SessionGate = field(default_factory=SessionGate)  # across phases: warm-up turns count

    async def phase(
        self,
        order: Iterable[int],
        rate: float,
        until: float | None,
        observer: Observer | None = None,
        replay: bool = False,
    ) -> tuple[list[RequestRecord], str]:
        """Send ``order`` on the schedule (``replay``: at the requests' own send times) and wait
        for every request to finish.

        With a concurrency limit the sender takes a semaphore slot before it sends (closed
        loop: the next request waits for a free slot, never more than the limit in flight).
        A conversation's turn waits in its task for its session's previous turn (and, unless
        the loop is closed, its think time), holding its slot. Returns the records in send
        order and why sending stopped.
        """
        cfg, stop = self.cfg, self.stop
        sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
        flights: dict[asyncio.Task[RequestRecord], Flight] = {}
        rng = np.random.default_rng(cfg.seed)
        exhausted = False
        think = replay or not math.isinf(rate)

        async def one(i: int, f: Flight, prev: asyncio.Task[Any] | None) -> RequestRecord:
            try:
                if prev is not None:
                    f.due = await SessionGate.wait(prev, self.requests[i], f.due, think)
                if observer is not None:
                    observer.started()
                rec = await send_request(
                    self.transport,
                    self.bodies[i],
                    self.requests[i],
                    timeout_s=cfg.timeout_s,
                    flight=f,
                )
                if observer is not None:
                    observer.observe(rec)
                return rec
            finally:
                if sem is not None:
                    sem.release()

        def source() -> Iterator[int]:
            nonlocal exhausted
            yield from order
            exhausted = True

        stop_wait = asyncio.ensure_future(stop.wait())
        schedule = (
            replay_arrivals(source(), self.requests, until=until)
            if replay
            else arrivals(source(), rate, cfg.burstiness, rng, until=until)
        )
        try:
            async with contextlib.aclosing(schedule):
                async for i, due in schedule:
                    if sem is not None and not await _acquire_or_stop(sem, stop_wait):
                        break
                    if stop.is_set() or (until is not None and clock() >= until):
                        if sem is not None:
                            sem.release()
                        break
                    f = Flight(i, self.requests[i], due)
                    prev = self.gate.previous(f.request)
                    task = asyncio.create_task(one(i, f, prev))
                    self.gate.sent(f.request, task)
                    flights[task] = f
            stopped = "count" if exhausted or until is None else "duration"
            if flights and not stop.is_set():
                everything = asyncio.gather(*flights, return_exceptions=True)
                await asyncio.wait({stop_wait, everything}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            for task in flights:
                if not task.done():
                    task.cancel()
            if flights:
                await asyncio.gather(*flights, return_exceptions=True)
        if stop.is_set():
            stopped = "aborted"
        records = []
        for task, f in flights.items():
            if task.cancelled() or task.exception() is not None:
                records.append(f.record(error="aborted"))
            else:
                records.append(task.result())
        return records, stopped
