"""The trial engine: start the real vLLM server for one set of settings, and stop it for sure.

Contract (what search / bench rely on):

- ``EngineSettings``: the vLLM knobs of one candidate, by vLLM's names; unset (None) means
  "vLLM's default" and is not passed. ``to_vllm_args()`` / ``to_config()`` / ``name``.
- ``LaunchConfig``: how to start vLLM on this machine (python or command, host, port, env,
  log dir, timeouts, device). On CPU an unset ``kv_cache_memory_bytes`` becomes 1 GiB, because
  vLLM CPU otherwise reserves 92 % of the NUMA node and fails when anything else holds memory.
- ``VllmServer(settings, launch)``: a context manager. ``__enter__`` (= ``start()``) returns
  the server once /health answers, or raises :class:`ServerStartError` whose ``.failure`` is an
  :class:`EngineFailure` (class + one line + log tail): a failed start is a *result* for the
  search (``except ServerStartError as e: record(e.failure)``). ``poll_failure()`` tells whether
  a started server has died since (CRASHED, or OOM). ``stop()`` / ``__exit__`` kill the whole
  process group and check that nothing survived.
- ``attach(url)``: the same ``ServerInfo`` for a server someone else started.

Process handling: vLLM runs under ``tuner/engine/guard.py`` (leader of a new session, with a
parent-death signal), so neither a crash of vLLM's API server nor a SIGKILL of vtune leaves an
orphaned EngineCore behind. A stop request (SIGTERM / SIGINT) stops every running server first
and then ends the run (:mod:`tuner.engine.interrupt`). Servers must be started from a
long-lived thread (the kernel's parent-death signal fires when the starting *thread* exits).
Log parsing lives in ``tuner.engine.log``; log files in ``tuner.engine.logfile`` (private).
Once /health answers, the server must be ours: every socket listening on the port is held by
our process group, and /v1/models serves the model we started; else another worker picked the
same free port, and the start is retried on another port.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tuner.engine import interrupt
from tuner.engine.guard import foreign_listeners, group_members, shm_files, unlink_all
from tuner.engine.http import ServerInfo, attach, find_free_port, port_free, read_info, try_get
from tuner.engine.log import (
    EngineFailure,
    FailureClass,
    classify_failure,
    log_tail,
    outside_stop,
    redact_argv,
)
from tuner.engine.logfile import create_log, private_log_dir, reopen_log
from tuner.engine.settings import EngineSettings, LaunchConfig, child_env
from tuner.errors import EngineError

__all__ = [
    "EngineFailure",
    "EngineSettings",
    "FailureClass",
    "LaunchConfig",
    "ServerInfo",
    "ServerStartError",
    "VllmServer",
    "attach",
    "child_env",
    "find_free_port",
    "stop_all",
]

_GUARD = Path(__file__).with_name("guard.py")


class ServerStartError(EngineError):
    """vLLM did not become healthy; ``failure`` says why (a result, not a crash, for search)."""

    def __init__(self, failure: EngineFailure) -> None:
        super().__init__(f"vLLM did not start: {failure}")
        self.failure = failure

    @property
    def failure_class(self) -> FailureClass:
        return self.failure.failure_class


# --- the server -------------------------------------------------------------------------------

_counter = itertools.count(1)


class VllmServer:
    """One vLLM server for one trial. Use as ``with VllmServer(settings, launch) as server:``.

    Attributes once started: ``url`` (``http://host:port``), ``base_url`` (``url + "/v1"``),
    ``info`` (:class:`ServerInfo`), ``log_path``, ``pid`` (the guard = process group id),
    ``settings`` (as launched, CPU KV default applied), ``survivors`` (PIDs still alive after
    ``stop()``; empty when the teardown was clean).
    """

    def __init__(
        self,
        settings: EngineSettings,
        launch: LaunchConfig | None = None,
        *,
        log_path: Path | None = None,
    ) -> None:
        self.launch = launch or LaunchConfig()
        self.settings = self.launch.effective(settings)
        self.settings.to_vllm_args()  # validate extra flags now, before anything starts
        if log_path is None:
            log_dir = self.launch.log_dir or private_log_dir()
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"vllm-{stamp}-{os.getpid()}-{next(_counter)}-{self.settings.name[:80]}.log"
            log_path = log_dir / name
        self.log_path = Path(log_path)
        self.port: int | None = None
        self.info: ServerInfo | None = None
        self.survivors: list[int] = []
        self._proc: Any = None
        self._healthy = False
        self._stopped = False
        self._failure: EngineFailure | None = None
        self._t0 = 0.0
        self._log_created = False  # the log file is ours: later port retries reuse it

    # -- public --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.launch.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def argv(self, port: int) -> list[str]:
        """The vLLM command line for ``port`` (contains no secrets; see ``child_env``)."""
        out = [*self.launch.prefix(), *self.settings.to_vllm_args()]
        out += ["--host", self.launch.host, "--port", str(port)]
        if not self.launch.access_log:
            out.append("--disable-uvicorn-access-log")
        return out

    def start(self) -> VllmServer:
        """Launch and wait for /health; raises :class:`ServerStartError` on any failure (the
        processes are gone by then). Interrupted starts (``Interrupted``, Ctrl-C) are cleaned
        up as well."""
        if self._proc is not None:
            raise EngineError("this VllmServer was already started; make a new one")
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> VllmServer:
        tries = 1 if self.launch.port is not None else 3
        for attempt in range(tries):
            port = self.launch.port or find_free_port(self.launch.host)
            if not port_free(self.launch.host, port):
                failure = EngineFailure(
                    FailureClass.PORT_IN_USE, f"port {port} on {self.launch.host} is already in use"
                )
            else:
                self.launch_process(port)
                failure = self.wait_ready()
            if failure is None:
                assert self.info is not None
                return self
            if failure.failure_class is not FailureClass.PORT_IN_USE or attempt == tries - 1:
                raise ServerStartError(failure)
            self._reset()
        raise AssertionError("unreachable")  # pragma: no cover

    def launch_process(self, port: int) -> None:
        """Start vLLM (under the guard) without waiting; ``wait_ready()`` finishes the start."""
        self.port = port
        argv = self.argv(port)
        guard = [sys.executable, str(_GUARD), str(os.getpid()), str(self.launch.stop_grace_s), "--"]
        if self._log_created:
            log = reopen_log(self.log_path)
        else:
            log, self.log_path = create_log(self.log_path)
            self._log_created = True
        with log:
            log.write(f"# vtune: {' '.join(redact_argv(argv))}\n")
            log.flush()
            # A stop request waits until the process is known (start() then stops it).
            with interrupt.deferred():
                self._proc = subprocess.Popen(
                    guard + argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=child_env(self.settings, self.launch),
                    start_new_session=True,
                    close_fds=True,
                )
                self._t0 = time.monotonic()
                _register(self)

    def wait_ready(self) -> EngineFailure | None:
        """Wait for /health 200 while watching the process; None when ready, else the failure
        (the server is already stopped then)."""
        deadline = self._t0 + self.launch.startup_timeout_s
        health = self.url + "/health"
        while True:
            interrupt.check()
            if self._exit_code() is not None:
                failure = self._dead_failure(started=False)
                self.stop()
                return failure
            if time.monotonic() > deadline:
                text = self._log_text()
                last = text.strip().splitlines()[-1:] or ["(empty log)"]
                failure = EngineFailure(
                    FailureClass.HEALTH_TIMEOUT,
                    f"no /health answer within {self.launch.startup_timeout_s:.0f} s; "
                    f"last log line: {last[0].strip()[:200]}",
                    log_tail(text),
                    self.log_path,
                    None,
                )
                self.stop()
                return failure
            if try_get(health, timeout=1.0) is not None:
                break
            time.sleep(0.25)
        startup = time.monotonic() - self._t0
        info = read_info(
            self.url,
            log_text=self._log_text(),
            api_key=self.settings.api_key,
            startup_s=round(startup, 3),
            log_path=self.log_path,
            argv=redact_argv(self.argv(self.port or 0)),
        )
        stranger = self._stranger(info)
        if stranger is not None:
            failure = EngineFailure(FailureClass.PORT_IN_USE, stranger, "", self.log_path, None)
            self.stop()
            return failure
        self._healthy = True
        self.info = info
        return None

    def _stranger(self, info: ServerInfo) -> str | None:
        """None when the server answering on our port is ours; else what answered. A model
        name unknown (a key we do not have) or ``/proc/net`` unreadable count as ours."""
        if self._proc is not None and foreign_listeners(self.port or 0, self._proc.pid):
            return f"port {self.port} answered from outside this vLLM (another worker took it)"
        given = [self.settings.model, self.settings.served_model_name]
        given += [v for f, v in self.settings.extra if f == "--served-model-name"]
        names = {n for g in given if g for n in [g, *g.split()]}  # names, space-separated
        if info.model is not None and info.model not in names:
            return f"port {self.port} serves {info.model!r}, not {self.settings.model!r}"
        return None

    def alive(self) -> bool:
        return self._proc is not None and not self._stopped and self._exit_code() is None

    def poll_failure(self) -> EngineFailure | None:
        """None while the server runs (or was stopped by us); the failure once it has died."""
        if (
            self._failure is None
            and self._proc is not None
            and not self._stopped
            and self._exit_code() is not None
        ):
            self._failure = self._dead_failure(started=self._healthy)
        return self._failure

    def stop(self) -> list[int]:
        """Stop the whole process group (idempotent). Returns survivors (normally empty).
        A stop request arriving meanwhile does not cut it short (it stays pending)."""
        with interrupt.shielded():
            return self._stop()

    def _stop(self) -> list[int]:
        proc = self._proc
        if proc is None or self._stopped:
            return self.survivors
        self._stopped = True
        pgid = proc.pid
        try:
            if self._exit_code() is None and self._healthy:
                # Healthy vLLM shuts down cleanly on SIGTERM (< 1 s); the guard forwards it.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pgid, signal.SIGTERM)
                _wait_for(lambda: self._exit_code() is not None, self.launch.stop_grace_s + 2)
            # Starting vLLM ignores SIGTERM; and after a clean exit this finds nobody. The
            # guard is not reaped yet, so the group id cannot have been reused.
            shm = shm_files(group_members(pgid))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            _wait_for(lambda: not group_members(pgid), 10.0)
            unlink_all(shm)  # SIGKILLed vLLM leaks its /dev/shm segments
            self.survivors = group_members(pgid)
        finally:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
            _unregister(self)
        return self.survivors

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _reset(self) -> None:
        self._proc, self._healthy, self._stopped, self._failure = None, False, False, None
        self.info, self.port, self.survivors = None, None, []

    def _exit_code(self) -> int | None:
        """The guard's exit code without reaping it (so its pid keeps the group id reserved)."""
        if self._proc.returncode is not None:
            return int(self._proc.returncode)
        try:
            res = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self._proc.poll()
        if res is None:
            return None
        return res.si_status if res.si_code == os.CLD_EXITED else -res.si_status

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _dead_failure(self, *, started: bool) -> EngineFailure:
        """Why the guard exited while we had not stopped it. Its exit status is vLLM's code;
        killed by a signal, or saying that it was told to stop, it was stopped from outside
        (KILLED, an environment failure: vLLM itself did not fail)."""
        text = self._log_text()
        code = self._exit_code()
        outside = outside_stop(text, code)
        if outside is not None:
            message = f"the vLLM guard (pid {self.pid}) {outside}; vLLM was stopped with it"
            return EngineFailure(FailureClass.KILLED, message, log_tail(text), self.log_path, code)
        cls, message = classify_failure(text, started=started)
        if started and cls is FailureClass.CRASHED:
            message = f"vLLM died while serving (exit {code}): {message}"
        return EngineFailure(cls, message, log_tail(text), self.log_path, code)


def _wait_for(cond: Any, timeout: float, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(step)
    return True


# --- cleanup on SIGTERM / SIGINT / exit ---------------------------------------------------

_live: dict[int, VllmServer] = {}
_installed = False


def _register(server: VllmServer) -> None:
    global _installed
    _live[id(server)] = server
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    interrupt.install()  # the CLI installs it at its start; a library user gets it here
    atexit.register(stop_all)
    _installed = True


def _unregister(server: VllmServer) -> None:
    _live.pop(id(server), None)


def stop_all() -> None:
    """Stop every server this process started and has not stopped yet (the first thing a
    stop request does, and at exit)."""
    for server in list(_live.values()):
        with contextlib.suppress(Exception):
            server.stop()


interrupt.on_stop(stop_all)
