"""Stop requests (SIGTERM, SIGINT): stop the servers at once, then end the run by an exception.

Contract:

- :func:`install` (main thread; idempotent) makes SIGTERM, and SIGINT unless it was ignored
  when the process started (``nohup``, a shell's background job: then it stays ignored, as
  Python itself leaves it), run the handler below. It works for vtune as PID 1 in a container,
  where the kernel ignores a signal the process does not handle: nothing here re-sends a
  signal or relies on an init.
- The handler remembers the signal, runs the stop callbacks (:func:`on_stop`:
  ``tuner.engine.server`` stops every vLLM it started) and raises
  :class:`tuner.errors.Interrupted` in the main thread.
- Except while an event loop runs in the main thread: there an exception raised by a signal
  handler is not reliable (asyncio's and uvloop's loops swallow it inside a callback, a task
  keeps it as its result), and stopping vLLM under load from inside the handler would block
  the client that must hang up first. The request stays *pending*: code that runs loops asks
  :func:`pending` (its watchdog ends the work within a second or so: the load hangs up, the
  server is then stopped on the way out) and calls :func:`check` once the loop has ended. A
  thread runs the stop callbacks anyway after ``LOOP_STOP_S``, in case a loop does not listen.
- Code that must not be cut in half (stopping a server, saving a finished trial) runs under
  :func:`deferred` / :func:`shielded`.
- A pending request is never cleared in a process (the process is ending); :func:`reset` is
  for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tuner.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# With an event loop running, the servers are stopped by this time at the latest (the loop's
# watchdog ends the work well before: tuner.measure.session).
LOOP_STOP_S = 10.0


@dataclass
class _State:
    pending: int | None = None  # the first stop request's signal number
    held: int = 0  # depth of deferred()/shielded() blocks
    in_handler: bool = False
    generation: int = 0  # bumped by reset(): a late stop belongs to the request it was for
    installed: dict[int, Any] = field(default_factory=dict)  # signal -> handler it replaced
    callbacks: list[Callable[[], None]] = field(default_factory=list)


_state = _State()


def install() -> bool:
    """Handle SIGTERM and SIGINT (unless SIGINT is ignored) from now on; False when called
    outside the main thread (signals can only be handled there) and nothing was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in SIGNALS:
        if sig in _state.installed:
            continue
        previous = signal.getsignal(sig)
        if sig == signal.SIGINT and previous == signal.SIG_IGN:
            continue  # inherited as ignored: whoever started us does not want Ctrl-C to stop us
        signal.signal(sig, _on_signal)
        _state.installed[sig] = previous
    return True


def on_stop(callback: Callable[[], None]) -> None:
    """Run ``callback`` (no arguments, must not raise) first thing when a stop request comes."""
    if callback not in _state.callbacks:
        _state.callbacks.append(callback)


def pending() -> int | None:
    """The signal number of the stop request received, or None."""
    return _state.pending


def check() -> None:
    """Raise :class:`Interrupted` when a stop request is pending (not inside a deferred block
    or the handler itself, where the request waits for the block's end)."""
    if _state.pending is not None and not _state.held and not _state.in_handler:
        raise Interrupted(_state.pending)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A block a stop request does not cut short; the request stays pending afterwards.
    (Only the main thread is ever cut short: elsewhere this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.held += 1
    try:
        yield
    finally:
        _state.held -= 1


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Like :func:`shielded`, and raises the pending stop request once the block has ended
    normally (when the block raised, its exception goes on)."""
    with shielded():
        yield
    check()


def reset() -> None:
    """Forget a pending request and restore the handlers :func:`install` replaced (tests)."""
    for sig, previous in _state.installed.items():
        signal.signal(sig, previous)
    _state.installed.clear()
    _state.pending = None
    _state.held = 0
    _state.generation += 1


def _loop_running() -> bool:
    return asyncio._get_running_loop() is not None


def _run_callbacks() -> None:
    for callback in list(_state.callbacks):
        with contextlib.suppress(Exception):
            callback()


def _late_stop(generation: int) -> None:
    if generation == _state.generation and _state.pending is not None:
        _run_callbacks()


def _on_signal(signum: int, _frame: Any) -> None:
    first = _state.pending is None
    if first:
        _state.pending = signum
    if _state.in_handler:
        return  # a second request while the first one stops the servers
    if _loop_running() and not _state.held:
        if first:  # the loop's watchdog acts on it; this thread in case it does not
            timer = threading.Timer(LOOP_STOP_S, _late_stop, (_state.generation,))
            timer.daemon = True  # never keeps the process from exiting
            timer.start()
        return
    _state.in_handler = True
    try:
        _run_callbacks()
    finally:
        _state.in_handler = False
    if _state.held:
        return  # pending: raised by check() at the end of the block
    raise Interrupted(_state.pending)


__all__ = ["SIGNALS", "check", "deferred", "install", "on_stop", "pending", "reset", "shielded"]
