"""A stand-in for ``tuner.engine.server.VllmServer`` in unit tests: it "starts" the fake HTTP
server of ``tests.fakes`` on its own loop in a thread, and can fail to start or "die" (its
process reports dead; the HTTP side keeps answering, as a hung engine would).

    monkeypatch.setattr(tuner.engine.server, "VllmServer", fake_vllm(die_after_s=0.8))

Each class made by :func:`fake_vllm` keeps its own ``instances`` list, so a test can check that
every server it started was stopped, and when (``stopped_at``, ``died_at`` in monotonic time).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from tests.fakes import Behaviour, FakeServer
from tuner.engine.http import ServerInfo
from tuner.engine.log import EngineFailure, FailureClass
from tuner.engine.server import EngineSettings, LaunchConfig, ServerStartError


class ThreadedFake:
    """The fake server on its own event loop in a thread (the code under test runs its own)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.fake = FakeServer(behaviour, model="tiny")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.__aenter__(), self.loop).result(10)
        return self.fake

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.__aexit__(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class FakeVllm:
    """Stands in for VllmServer: start() fails with ``start_failure``, or serves the fake and
    'dies' ``die_after_s`` seconds after its start."""

    start_failure: EngineFailure | None = None
    die_after_s: float | None = None
    behaviour: Behaviour = Behaviour(token_delay_s=0.02)
    instances: ClassVar[list[FakeVllm]] = []

    def __init__(
        self, settings: EngineSettings, launch: LaunchConfig, *, log_path: Path | None = None
    ) -> None:
        self.settings, self.launch = settings, launch
        self.log_path = log_path or Path("/tmp/fake-vllm.log")
        self.stopped = False
        self.stopped_at: float | None = None
        self.t0 = 0.0
        self._ctx = ThreadedFake(self.behaviour)
        self.instances.append(self)

    def start(self) -> FakeVllm:
        if self.start_failure is not None:
            raise ServerStartError(self.start_failure)
        self.fake = self._ctx.__enter__()
        self.url = self.fake.url
        self.t0 = time.monotonic()
        self.info = ServerInfo(
            self.url, "tiny", "0.0", None, None, None, None, None, 1.0, argv=("vllm", "serve")
        )
        return self

    @property
    def died_at(self) -> float | None:
        return None if self.die_after_s is None else self.t0 + self.die_after_s

    def alive(self) -> bool:
        return not self.stopped and (self.died_at is None or time.monotonic() < self.died_at)

    def poll_failure(self) -> EngineFailure | None:
        if self.died_at is None or time.monotonic() < self.died_at:
            return None
        return EngineFailure(
            FailureClass.CRASHED, "vLLM died while serving (exit -9)", "", self.log_path, -9
        )

    def stop(self) -> list[int]:
        if not self.stopped and self.start_failure is None:
            self.stopped_at = time.monotonic()
            self._ctx.__exit__()
        self.stopped = True
        return []


def fake_vllm(**attrs: Any) -> type[FakeVllm]:
    """A FakeVllm class with its own ``instances`` list and the given class attributes."""
    return type("FakeVllmFor", (FakeVllm,), {"instances": [], **attrs})
