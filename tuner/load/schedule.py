"""When each request goes: arrival processes, trace replay, and the order of a session's turns.

* :func:`arrivals` — an async generator of ``(request, due_at)`` apart from the sender: Poisson
  (burstiness 1), gamma (other burstiness; shape = burstiness, scale = 1 / (rate * burstiness),
  as vLLM defines it), constant (burstiness = inf) or all at once (rate = inf);
* :func:`replay_arrivals` — the same, at the send times the requests carry (``Request.at``,
  seconds after the phase starts: a replayed trace);
* :class:`SessionGate` — a conversation's turn waits for the previous turn of its session (sent
  earlier in the same run) to finish, then for its think time. Arrivals are not held up: the
  turn's task waits, the schedule goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from tuner.load.prompts import Request

clock = time.perf_counter
T = TypeVar("T")


def interarrival_gaps(rate: float, burstiness: float, rng: np.random.Generator) -> Iterator[float]:
    """Endless gaps between arrivals: 0 for an infinite rate, 1/rate for infinite burstiness,
    otherwise gamma(shape=burstiness, scale=1/(rate*burstiness)) (exponential at 1)."""
    if math.isinf(rate):
        return itertools.repeat(0.0)
    if math.isinf(burstiness):
        return itertools.repeat(1.0 / rate)
    scale = 1.0 / (rate * burstiness)

    def gen() -> Iterator[float]:
        while True:  # draw in blocks: one numpy call per 256 arrivals
            yield from rng.gamma(burstiness, scale, size=256).tolist()

    return gen()


async def arrivals(
    requests: Iterable[T],
    rate: float,
    burstiness: float,
    rng: np.random.Generator,
    *,
    until: float | None = None,
) -> AsyncIterator[tuple[T, float]]:
    """Yield ``(request, due_at)`` when each request is due (the first at once).

    ``due_at`` is an absolute ``perf_counter`` time; the generator sleeps until then, so the
    consumer only sends. Stops when ``requests`` runs out or the next arrival is past ``until``.
    """
    due = clock()
    gaps = interarrival_gaps(rate, burstiness, rng)
    for i, request in enumerate(requests):
        if i:
            due += next(gaps)
        if until is not None and due >= until:
            return
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        yield request, due


async def replay_arrivals(
    order: Iterable[int],
    requests: Sequence[Request],
    *,
    until: float | None = None,
) -> AsyncIterator[tuple[int, float]]:
    """Yield ``(index, due_at)`` at each request's own send time: ``start + at``, where start is
    the first request's due time minus its ``at``. When ``order`` comes round again (a cycled
    set), the next pass starts one mean gap after the last request of the one before."""
    start = clock()
    offset = 0.0
    last_at: float | None = None
    first = True
    span = _pass_length(requests)
    for i in order:
        at = requests[i].at or 0.0
        if first:
            start -= at
            first = False
        elif last_at is not None and at < last_at:
            offset += span
        last_at = at
        due = start + offset + at
        if until is not None and due >= until:
            return
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        yield i, due


def _pass_length(requests: Sequence[Request]) -> float:
    times = sorted(r.at for r in requests if r.at is not None)
    if len(times) < 2:
        return 1.0
    return times[-1] - times[0] + (times[-1] - times[0]) / (len(times) - 1)


def replays(requests: Sequence[Request], order: Sequence[int]) -> bool:
    """Whether the requests of ``order`` carry send times (a trace built for replay)."""
    return bool(order) and all(requests[i].at is not None for i in order)


class SessionGate:
    """Keeps each session's turns in order within one run (see the module docstring).

    Call :meth:`previous` in send order before a turn's task is created, then :meth:`sent` with
    the task; inside the task, :meth:`wait` returns when the turn may go and its due time."""

    def __init__(self) -> None:
        self._last: dict[str, asyncio.Task[Any]] = {}

    def previous(self, request: Request) -> asyncio.Task[Any] | None:
        if request.session is None:
            return None
        return self._last.get(request.session)

    def sent(self, request: Request, task: asyncio.Task[Any]) -> None:
        if request.session is not None:
            self._last[request.session] = task

    @staticmethod
    async def wait(
        prev: asyncio.Task[Any], request: Request, due: float | None, think: bool
    ) -> float:
        """Wait for ``prev`` (never raises: a failed or cancelled turn also ends the wait) and
        then ``request.think_s`` when ``think``; returns the later of ``due`` and that time."""
        await asyncio.wait({prev})
        end = None
        if not prev.cancelled() and prev.exception() is None:
            end = getattr(prev.result(), "end", None)
        ready = (end if end is not None else clock()) + (request.think_s if think else 0.0)
        delay = ready - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        return ready if due is None else max(due, ready)
