"""Optuna study plumbing: storage from a URL or path, resuming, stale trials, heartbeats.

Trials carry user attributes: ``candidate`` (name), ``knobs`` (dict), ``baseline`` (bool),
``worker`` (host:pid), ``heartbeat_at`` (epoch s), and at the end ``record`` (TrialRecord JSON)
or ``failure_class``. A RUNNING trial whose worker is gone (same host, dead pid) or whose
heartbeat is older than ``STALE_AFTER_S`` is failed on start, so its candidate runs again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuner.errors import StorageError
from tuner.search.record import STATE_COMPLETE, STATE_FAILED, TrialRecord

HEARTBEAT_S = 20.0
STALE_AFTER_S = 5 * HEARTBEAT_S
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(storage: str | None, default_path: Path) -> str:
    """``None`` -> SQLite file at ``default_path``; a bare path -> SQLite there; else a URL."""
    if storage is None:
        default_path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{default_path.resolve()}"
    if "://" not in storage:
        return f"sqlite:///{Path(storage).resolve()}"
    return storage


def redact(url: str) -> str:
    """A storage URL without its password, for logs and records."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def open_study(url: str, name: str, directions: list[str], sampler: Any) -> Any:
    """Create or load the study; StorageError with one line when the storage is unreachable."""
    optuna = _optuna()
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
        return optuna.create_study(
            study_name=name,
            storage=storage,
            directions=directions,
            sampler=sampler,
            load_if_exists=True,
        )
    except (ImportError, ModuleNotFoundError) as exc:
        raise StorageError(f"study storage {redact(url)}: missing driver ({exc.name})") from None
    except Exception as exc:  # SQLAlchemy raises many types for "cannot connect"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open study storage {redact(url)}: {first[:200]}") from None


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # Several workers on one SQLite file wait for the lock instead of failing at once.
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def fail_stale(study: Any) -> list[int]:
    """Fail RUNNING trials left by dead workers; returns their numbers."""
    optuna = _optuna()
    failed = []
    now = time.time()
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        w_host, _, w_pid = worker.partition(":")
        beat = float(trial.user_attrs.get("heartbeat_at", 0.0))
        dead_here = w_host == host and w_pid.isdigit() and not _pid_alive(int(w_pid))
        if dead_here or now - beat > STALE_AFTER_S:
            study._storage.set_trial_user_attr(trial._trial_id, "stale", True)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            failed.append(trial.number)
    return failed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finished_records(study: Any) -> dict[str, TrialRecord]:
    """Candidates this study has finished: measured, or failed by the server (not retried).
    Interrupted and stale trials are not finished: their candidates run again."""
    out: dict[str, TrialRecord] = {}
    for trial in study.get_trials(deepcopy=False):
        data = trial.user_attrs.get("record")
        if not data:
            continue
        record = TrialRecord.from_json(data)
        if record.state in (STATE_COMPLETE, STATE_FAILED) and record.name not in out:
            out[record.name] = record
    return out


def pending_names(study: Any) -> set[str]:
    """Candidates queued or running (possibly on another worker)."""
    optuna = _optuna()
    states = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    return {
        str(t.user_attrs.get("candidate"))
        for t in study.get_trials(deepcopy=False, states=states)
        if t.user_attrs.get("candidate")
    }


def running_elsewhere(study: Any, name: str, except_number: int) -> bool:
    """Whether another RUNNING trial (another worker) is measuring candidate ``name``."""
    optuna = _optuna()
    return any(
        t.number != except_number and t.user_attrs.get("candidate") == name
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    )


@contextmanager
def heartbeat(trial: Any) -> Iterator[None]:
    """Mark ``trial`` as owned by this worker and refresh its heartbeat while the body runs."""
    trial.set_user_attr("worker", WORKER)
    trial.set_user_attr("heartbeat_at", time.time())
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                trial.set_user_attr("heartbeat_at", time.time())
            except Exception as exc:  # a storage hiccup must not kill the trial
                logging.getLogger(__name__).warning("heartbeat failed: %s", exc)

    thread = threading.Thread(target=beat, name="vtune-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
