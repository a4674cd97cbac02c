"""Shared fixtures: the tiny model and one real vLLM CPU server per session.

- ``tiny_model_dir`` (session): the tiny random-weight Llama of ``tuner.tiny``. Built once into
  ``$VTUNE_TINY_MODEL_DIR`` when set, else into pytest's cache directory: a stable path keeps
  vLLM's torch.compile cache valid across sessions (the cache key includes the model path), which
  halves the server's start (68 s cold, 35 s warm on 2 cores).
- ``vllm_server`` (session, started on first use): a ``tuner.engine.server.VllmServer`` on the tiny
  model with ``--kv-cache-memory-bytes 300000000``; yields the running server (``.url``,
  ``.info``). Tests that use it are e2e tests: mark them ``@pytest.mark.e2e`` and run them under
  ``flock /tmp/vtune-vllm.lock`` (the fixture does not take the lock itself: ``flock FILE pytest``
  would deadlock against a second lock on the same file).

Every process the tests start inherits ``VTUNE_TEST_SESSION``; at the end of the session any
vLLM process (API server, EngineCore, Worker, vtune's guard) still carrying it fails the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SESSION_MARK = "VTUNE_TEST_SESSION"
SERVER_KV_BYTES = 300_000_000  # deliberately not a whole number of 128-token blocks


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(SESSION_MARK, uuid.uuid4().hex)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # A pytest-xdist worker, or the run scripts/test-all starts in the background, begins
        # with SIGINT ignored, which every process a test starts would inherit (and vtune keeps
        # an inherited SIG_IGN, as for nohup): take SIGINT as a plain pytest run does.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # A `vtune probe` cached on this machine would change every estimate: tests (and the
    # processes they start) read and write probe results in a scratch directory instead.
    os.environ.setdefault("VTUNE_PROBE_DIR", tempfile.mkdtemp(prefix="vtune-probe-"))


@pytest.fixture(scope="session")
def tiny_model_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from tuner.tiny import build_tiny_model

    env = os.environ.get("VTUNE_TINY_MODEL_DIR")
    if env:
        target = Path(env)
    elif getattr(request.config, "cache", None) is not None:
        target = Path(request.config.cache.mkdir("vtune-tiny-llama"))
    else:
        target = tmp_path_factory.mktemp("tiny-llama")
    return build_tiny_model(target)


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from tuner.engine.server import EngineSettings, LaunchConfig, VllmServer

    settings = EngineSettings(model=str(tiny_model_dir), kv_cache_memory_bytes=SERVER_KV_BYTES)
    launch = LaunchConfig(
        device="cpu", log_dir=tmp_path_factory.mktemp("vllm-logs"), startup_timeout_s=600
    )
    server = VllmServer(settings, launch)
    with server:
        _warm_up(server, tiny_model_dir)
        yield server
    assert server.survivors == [], f"vLLM processes survived teardown: {server.survivors}"


def _warm_up(server: object, model_dir: Path) -> None:
    """Send the batch shapes the tests use once, so that torch.compile's first-seen-shape work
    (seconds each on a cold cache, as in CI) happens here rather than inside a measurement."""
    import asyncio

    from tuner.load.generator import LoadConfig
    from tuner.load.workload import LengthRange, load_tokenizer, random_requests
    from tuner.measure.bench import measure

    tok = load_tokenizer(model_dir)
    for concurrency in (1, 4, 16):
        reqs = random_requests(tok, 2 * concurrency, LengthRange(16, 64), LengthRange.fixed(16))
        load = LoadConfig(concurrency=concurrency, timeout_s=300)
        url, name = server.url, server.info.model  # type: ignore[attr-defined]
        asyncio.run(measure(url, name, reqs, load, scraper=False))


def _leftover_vllm_processes() -> list[str]:
    """Processes started by this session (by env mark) that look like vLLM or vtune's guard."""
    import psutil

    mark = os.environ.get(SESSION_MARK)
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.info["cmdline"] or [])
            if not any(k in cmd for k in ("vllm", "VLLM::", "engine_guard")):
                continue
            if proc.environ().get(SESSION_MARK) == mark:
                found.append(f"{proc.pid}: {cmd[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``pytest -n N --dist loadgroup`` the tests that start real vLLM are meant for one
    worker (two vLLM CPU servers at once on a small machine time each other out). ``make test``
    does not rely on it: it runs them in a pytest run of their own (scripts/test-all)."""
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(pytest.mark.xdist_group("vllm"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a vLLM process started by the tests outlived them (after 15 s of grace).
    Under pytest-xdist only the controller looks, once every worker is done (a worker would
    see the other worker's live processes)."""
    if hasattr(session.config, "workerinput"):
        return
    deadline = time.monotonic() + 15
    left = _leftover_vllm_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _leftover_vllm_processes()
    if not left:
        return
    import psutil

    for line in left:  # clean up anyway, so one failed run does not poison the next
        with contextlib.suppress(psutil.Error):
            psutil.Process(int(line.split(":")[0])).kill()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("vLLM processes left behind by the tests:", red=True)
        for line in left:
            reporter.write_line("  " + line, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
