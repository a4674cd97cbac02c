"""tuner.engine.interrupt: a stop request stops the servers, then ends the run by an exception
that code cannot mistake for a failure; real signals, sent to this process or to a child."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuner.engine import interrupt
from tuner.errors import Interrupted

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def armed() -> Iterator[list[str]]:
    """The handlers installed (restored afterwards), with a stop callback that records calls."""
    interrupt.reset()
    calls: list[str] = []

    def callback() -> None:
        calls.append("stopped")

    interrupt.on_stop(callback)
    assert interrupt.install()
    try:
        yield calls
    finally:
        interrupt._state.callbacks.remove(callback)
        interrupt.reset()


def test_sigterm_stops_the_servers_first_then_raises(armed: list[str]) -> None:
    with pytest.raises(Interrupted) as err:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert err.value.signum == signal.SIGTERM and str(err.value) == "interrupted by SIGTERM"
    assert armed == ["stopped"] and interrupt.pending() == signal.SIGTERM
    with pytest.raises(Interrupted):
        interrupt.check()  # the request stays: the process is ending


def test_a_deferred_block_ends_before_the_request_is_raised(armed: list[str]) -> None:
    steps = []
    with pytest.raises(Interrupted), interrupt.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        steps.append("saved")
    assert steps == ["saved"] and armed == ["stopped"]
    with interrupt.shielded():
        interrupt.check()  # held: nothing raised inside a shielded block


def test_inside_an_event_loop_the_request_waits_for_the_loop(armed: list[str]) -> None:
    """A loop would swallow the exception: the handler only marks the request; the loop's own
    watchdog (tuner.measure.session) acts on it, and check() raises after the loop."""

    async def work() -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.2)
        return "ran on"

    assert asyncio.run(work()) == "ran on"
    assert interrupt.pending() == signal.SIGTERM and armed == []  # the watchdog's job here
    with pytest.raises(Interrupted):
        interrupt.check()


PROBE = textwrap.dedent(
    """
    import signal, sys, time
    from tuner.engine import interrupt
    from tuner.errors import Interrupted
    interrupt.install()
    try:
        print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True)
        time.sleep(3)
        print("slept", flush=True)
    except Interrupted as exc:
        sys.exit(128 + exc.signum)
    """
)


@pytest.mark.parametrize("ignored", [True, False])
def test_sigint_inherited_as_ignored_stays_ignored(ignored: bool) -> None:
    """nohup / a background job starts vtune with SIGINT ignored: Python leaves it so, and so
    does vtune; otherwise SIGINT ends the run with 130."""

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=ignore_sigint if ignored else None,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == str(ignored)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    if ignored:
        assert proc.returncode == 0 and out.strip() == "slept"
    else:
        assert proc.returncode == 130 and "slept" not in out
