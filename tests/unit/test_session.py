"""tuner.measure.session: launch + watchdog + stop, with a bare fake process (no HTTP)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from tests.fake_vllm import fake_vllm
from tuner.engine import interrupt
from tuner.engine.log import EngineFailure, FailureClass
from tuner.engine.server import EngineSettings, LaunchConfig, ServerStartError
from tuner.errors import Interrupted
from tuner.measure.session import ServerDied, launched, run_async, run_watched

DEATH = EngineFailure(FailureClass.OOM, "CUDA out of memory", "", Path("/tmp/x.log"), 1)


class Process:
    """Just what the watchdog reads: alive() and poll_failure(); dies ``die_after_s`` after
    it is made (never when None)."""

    def __init__(self, die_after_s: float | None = None) -> None:
        self.died_at = None if die_after_s is None else time.monotonic() + die_after_s

    def alive(self) -> bool:
        return self.died_at is None or time.monotonic() < self.died_at

    def poll_failure(self) -> EngineFailure | None:
        return None if self.alive() else DEATH


def test_run_watched_returns_the_work_on_uvloop() -> None:
    async def work(stop: asyncio.Event) -> type:
        await asyncio.sleep(0.3)  # more than one watchdog poll
        assert not stop.is_set()
        return type(asyncio.get_running_loop())

    assert run_watched(Process(), work, poll_s=0.05) is uvloop.Loop
    assert run_async(work(asyncio.Event())) is uvloop.Loop


def test_run_watched_sets_stop_when_the_server_dies_and_keeps_the_partial_result() -> None:
    async def work(stop: asyncio.Event) -> str:
        await asyncio.wait_for(stop.wait(), timeout=30)  # a load that honours stop
        return "records so far"

    t0 = time.monotonic()
    with pytest.raises(ServerDied) as info:
        run_watched(Process(die_after_s=0.3), work, poll_s=0.05)
    assert time.monotonic() - t0 < 1.0
    assert info.value.failure is DEATH and info.value.partial == "records so far"


def test_run_watched_cancels_work_that_ignores_stop_after_the_grace() -> None:
    cancelled = []

    async def work(stop: asyncio.Event) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(stop.is_set())
            raise

    t0 = time.monotonic()
    with pytest.raises(ServerDied) as info:
        run_watched(Process(die_after_s=0.2), work, poll_s=0.05, grace_s=0.3)
    assert time.monotonic() - t0 < 1.5
    assert cancelled == [True] and info.value.partial is None


def test_an_error_of_the_work_is_server_died_only_when_the_server_died() -> None:
    async def fails(stop: asyncio.Event) -> None:
        raise ValueError("bug in the load")

    with pytest.raises(ValueError, match="bug in the load"):
        run_watched(Process(), fails)

    async def fails_after_death(stop: asyncio.Event) -> None:
        await stop.wait()
        raise ValueError("connection refused")

    with pytest.raises(ServerDied) as info:
        run_watched(Process(die_after_s=0.1), fails_after_death, poll_s=0.05)
    assert isinstance(info.value.__cause__, ValueError) and info.value.partial is None


def test_a_death_right_after_the_work_still_counts() -> None:
    proc = Process(die_after_s=0.2)

    async def work(stop: asyncio.Event) -> int:
        time.sleep(0.3)  # blocks the loop: the watchdog never sees the death while it runs
        return 7

    with pytest.raises(ServerDied) as info:
        run_watched(proc, work)
    assert info.value.partial == 7 and info.value.failure is DEATH


def test_launched_stops_on_every_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner.engine.server

    cls = fake_vllm()
    monkeypatch.setattr(tuner.engine.server, "VllmServer", cls)
    settings = EngineSettings(model="m")
    said: list[str] = []
    with launched(settings, LaunchConfig(), log_path=Path("/tmp/a.log"), say=said.append) as s:
        assert s.alive() and s.log_path == Path("/tmp/a.log")
    with pytest.raises(RuntimeError), launched(settings):
        raise RuntimeError("boom")
    assert [s.stopped for s in cls.instances] == [True, True]
    assert said == [f"starting vLLM ({settings.name}); log: /tmp/a.log", "stopping vLLM"]


def test_a_failed_start_names_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner.engine.server

    failure = EngineFailure(FailureClass.PORT_IN_USE, "port 8000 is already in use")
    monkeypatch.setattr(tuner.engine.server, "VllmServer", fake_vllm(start_failure=failure))
    with (
        pytest.raises(ServerStartError) as info,
        launched(EngineSettings(model="m"), log_path=Path("/tmp/b.log")),
    ):
        pytest.fail("a failed start must not run the block")
    assert info.value.failure.log_path == Path("/tmp/b.log")
    assert info.value.failure_class is FailureClass.PORT_IN_USE


# --- stop requests: the work ends, and it is Interrupted, never a death or a result -----------


@pytest.fixture
def armed() -> Iterator[None]:
    interrupt.reset()
    assert interrupt.install()
    try:
        yield
    finally:
        interrupt.reset()


@pytest.mark.parametrize("server_stopped", [False, True])
def test_a_stop_request_ends_the_work_as_interrupted(armed: None, server_stopped: bool) -> None:
    """SIGTERM under load: the watchdog ends the load (stop is set, as for a death) and the
    run ends by Interrupted, also when the server is gone by then (stopped by us on the
    request: not ServerDied, which would record a crash)."""
    seen: list[bool] = []

    async def work(stop: asyncio.Event) -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), timeout=30)
        seen.append(stop.is_set())
        return "half a rate search"

    proc = Process(die_after_s=0.1 if server_stopped else None)
    t0 = time.monotonic()
    with pytest.raises(Interrupted) as info:
        run_watched(proc, work, poll_s=0.05)
    assert time.monotonic() - t0 < 2.0 and seen == [True]
    assert info.value.signum == signal.SIGTERM


def test_a_stop_request_cancels_unwatched_work(armed: None) -> None:
    async def work() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(30)

    t0 = time.monotonic()
    with pytest.raises(Interrupted) as info:
        run_async(work(), poll_s=0.05)
    assert time.monotonic() - t0 < 2.0 and info.value.signum == signal.SIGINT


def test_a_start_cut_short_by_a_stop_request_is_not_a_failed_start(
    armed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tuner.engine.server

    failure = EngineFailure(FailureClass.HEALTH_TIMEOUT, "stopped while starting")
    monkeypatch.setattr(tuner.engine.server, "VllmServer", fake_vllm(start_failure=failure))
    interrupt._state.pending = signal.SIGTERM  # the handler ran inside the start's own loop
    with pytest.raises(Interrupted), launched(EngineSettings(model="m")):
        pytest.fail("an interrupted start must not run the block")
