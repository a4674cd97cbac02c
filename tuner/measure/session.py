"""A launched server's life, in one place: start, measure under a watchdog, stop.

``vtune bench``, a search trial and a finalist's re-measure all do the same three things:

* :func:`launched` — a context manager: start vLLM (``ServerStartError`` propagates, its
  failure always naming the log), yield the running server, stop it on every way out.
* :func:`run_watched` — run the async measuring, ``work(stop)``, on uvloop when it is installed,
  while a watchdog polls the server. When vLLM dies, ``stop`` is set at once (the load ends,
  requests in flight are kept as "aborted") instead of waiting for request timeouts; work that
  does not return within a grace period is cancelled. A death during the work raises
  :class:`ServerDied` with the failure (class + log) and whatever the work returned.
* :func:`run_async` — the event loop alone (uvloop when installed), for a server someone else
  runs (``vtune bench --url``).

A stop request (SIGTERM / SIGINT, :mod:`tuner.engine.interrupt`) has stopped the servers
already; inside an event loop its exception cannot be raised (the loop would swallow it), so
both functions end the work within their grace period and then raise
:class:`tuner.errors.Interrupted`, never :class:`ServerDied`: a server stopped on a stop request
did not die, and what was measured is not a result.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tuner.engine import interrupt
from tuner.engine import server as engine
from tuner.engine.log import EngineFailure
from tuner.engine.settings import EngineSettings, LaunchConfig

T = TypeVar("T")

POLL_S = 0.25  # how often the watchdog looks at the process
GRACE_S = 5.0  # how long stopped work may take to return before it is cancelled


class Watched(Protocol):
    """What the watchdog needs of a server (VllmServer satisfies it)."""

    def alive(self) -> bool: ...

    def poll_failure(self) -> EngineFailure | None: ...


class ServerDied(Exception):
    """The server died while it was measured. ``failure`` is its EngineFailure (None only when
    the process was gone without a failure to read); ``partial`` is what the work returned
    before it ended (None when it raised or was cancelled)."""

    def __init__(self, failure: EngineFailure | None, partial: Any = None) -> None:
        super().__init__(f"vLLM died while measured: {failure or 'no failure recorded'}")
        self.failure = failure
        self.partial = partial


@contextlib.contextmanager
def launched(
    settings: EngineSettings,
    launch: LaunchConfig | None = None,
    *,
    log_path: Path | None = None,
    say: Callable[[str], None] | None = None,
) -> Iterator[engine.VllmServer]:
    """Start vLLM with ``settings`` and yield it once /health answers; stop it (the whole
    process group) however the block ends. A failed start raises ``ServerStartError`` (nothing
    is left running) whose ``failure.log_path`` is always set. ``say`` hears the progress lines
    (start with the log's path, stop, processes that survived the stop)."""
    tell = say or (lambda _msg: None)
    # Looked up at call time, so tests can stand a fake in for VllmServer.
    server = engine.VllmServer(settings, launch or LaunchConfig(), log_path=log_path)
    tell(f"starting vLLM ({settings.name}); log: {server.log_path}")
    try:
        server.start()
    except engine.ServerStartError as exc:
        interrupt.check()  # a start cut short by a stop request is not a failed start
        if exc.failure.log_path is not None:
            raise
        raise engine.ServerStartError(replace(exc.failure, log_path=server.log_path)) from exc
    try:
        yield server
    finally:
        tell("stopping vLLM")
        survivors = server.stop()
        if survivors:
            tell(f"warning: vLLM processes survived the stop: {survivors}")


def run_watched(
    server: Watched,
    work: Callable[[asyncio.Event], Awaitable[T]],
    *,
    poll_s: float = POLL_S,
    grace_s: float = GRACE_S,
) -> T:
    """Run ``work(stop)`` to its end (see :func:`run_async` for the loop) while a watchdog
    checks ``server.alive()`` every ``poll_s`` seconds. When the server dies, ``stop`` is set
    and the work has ``grace_s`` seconds to return before it is cancelled.

    Returns what the work returned when the server stayed up. Raises :class:`ServerDied` when
    the server is found dead during or right after the work, whether the work returned (its
    result is ``partial``), raised (chained) or was cancelled. With the server up, an exception
    from the work propagates unchanged. A stop request ends the work the same way and raises
    :class:`~tuner.errors.Interrupted` instead, whatever the work did.
    """

    async def main() -> asyncio.Future[T]:
        stop = asyncio.Event()
        task = asyncio.ensure_future(work(stop))
        while not task.done():
            await asyncio.wait({task}, timeout=poll_s)
            if task.done() or (server.alive() and interrupt.pending() is None):
                continue
            stop.set()
            await asyncio.wait({task}, timeout=grace_s)
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        return task

    try:
        task = _run_loop(main())
    except BaseException:
        interrupt.check()
        raise
    if interrupt.pending() is not None:  # ended on a stop request: not a death, not a result
        if not task.cancelled():
            task.exception()  # retrieved, so that asyncio does not log it at exit
        interrupt.check()
    failure = server.poll_failure()
    if failure is not None or not server.alive():
        error = None if task.cancelled() else task.exception()
        partial = None if task.cancelled() or error is not None else task.result()
        raise ServerDied(failure, partial) from error
    return task.result()  # the work's exception, if it raised, propagates from here


def run_async(coro: Coroutine[Any, Any, T], *, poll_s: float = POLL_S) -> T:
    """Run ``coro`` in a new event loop: uvloop when it is installed (less client overhead per
    streamed chunk), else asyncio's own. A stop request cancels it (within ``poll_s``) and
    raises :class:`~tuner.errors.Interrupted`."""

    async def main() -> T:
        task = asyncio.ensure_future(coro)
        while not task.done():
            await asyncio.wait({task}, timeout=poll_s)
            if not task.done() and interrupt.pending() is not None:
                task.cancel()
                await asyncio.wait({task})
        return task.result()

    try:
        result = _run_loop(main())
    except BaseException:
        interrupt.check()
        raise
    interrupt.check()
    return result


def _run_loop(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


__all__ = ["ServerDied", "Watched", "launched", "run_async", "run_watched"]
