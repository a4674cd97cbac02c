"""Optuna study plumbing: storage from a URL or path, resuming, stale trials, heartbeats.

Trials carry user attributes: ``candidate`` (name), ``knobs`` (dict), ``baseline`` (bool),
``worker_id`` (a random id per process), ``worker`` (its hostname, for people), and at the end
``record`` (TrialRecord JSON) and, when it failed, ``failure_class`` and ``environment`` (the
environment's failure: not finished, runs again); a trial failed as stale has ``stale: true``,
one cut short by a stop request ``interrupted: true`` (:mod:`tuner.search.resume`).

Liveness is Optuna's heartbeat (``RDBStorage(heartbeat_interval, grace_period)``): from the
moment a trial is asked a thread records a heartbeat every ``HEARTBEAT_S`` seconds, and a
RUNNING trial whose last heartbeat is more than ``GRACE_S`` seconds old is stale. Both times are the
database's clock, so clock skew between hosts does not matter, and a trial that has never beaten
(just asked by another worker) is never stale. A worker is not known by ``host:pid``: in a
container vtune is PID 1 and an Indexed Job's pod keeps its hostname across restarts, so a rerun
would take its own dead trial for a live one.

A RUNNING trial is *live* when its worker has claimed it (``worker_id``) and its heartbeat is
not stale; only live trials keep their candidate from running here (:func:`running_elsewhere`,
:func:`pending_names`). :func:`fail_stale` fails stale trials so their candidates run again.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tuner.errors import StorageError
from tuner.search.record import STATE_COMPLETE, STATE_FAILED, TrialRecord

log = logging.getLogger(__name__)

HEARTBEAT_S = 10  # Optuna takes whole seconds
GRACE_S = 3 * HEARTBEAT_S  # three missed beats: a stalled database write is not a death
HOST = socket.gethostname()
WORKER_ID = uuid.uuid4().hex


def _new_identity() -> None:
    global WORKER_ID
    WORKER_ID = uuid.uuid4().hex  # a forked child is another worker


os.register_at_fork(after_in_child=_new_identity)

# The storage each study was opened with (Optuna wraps it; we keep ours rather than reaching
# into ``study._storage``). Weak keys: a study that is dropped takes its entry with it.
_STORAGES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


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


# userinfo with a password: the password runs to the last "@" (an unencoded "@" in it must not
# leak its tail; a query holding "@" is rare, and then too much is hidden, never too little).
_USERINFO = re.compile(r"(?P<user>[^:/?#@]*):(?P<password>.*)@(?P<after>[^@]*)", re.DOTALL)
_SECRET_KEYS = ("password", "secret", "token")


def redact(url: str) -> str:
    """A storage URL without its secrets, for logs and records: the userinfo password and the
    value of every query key containing "password", "secret" or "token" (``sslpassword``,
    ``auth_token``...) become ``***``; the username, host and everything else stay as written."""
    if "://" not in url:
        return url  # a file path
    scheme, rest = url.split("://", 1)
    m = _USERINFO.fullmatch(rest)
    if m:
        rest = f"{m['user']}:***@{m['after']}"
    base, sep, query = rest.partition("?")
    if not sep:
        return f"{scheme}://{rest}"
    query, hash_, fragment = query.partition("#")
    pairs = []
    for pair in re.split(r"([&;])", query):
        key, eq, _ = pair.partition("=")
        if eq and any(word in unquote(key).lower() for word in _SECRET_KEYS):
            pair = f"{key}=***"
        pairs.append(pair)
    return f"{scheme}://{base}?{''.join(pairs)}{hash_}{fragment}"


def open_study(
    url: str,
    name: str,
    directions: list[str],
    sampler: Any,
    *,
    heartbeat_s: int = HEARTBEAT_S,
    grace_s: int = GRACE_S,
) -> Any:
    """Create or load the study, with Optuna heartbeats every ``heartbeat_s`` and staleness
    after ``grace_s`` seconds; StorageError with one line when the storage is unreachable."""
    optuna = _optuna()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
            )
        study = optuna.create_study(
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
    # Optuna warns on every ask() that heartbeats are meant for optimize(); with ask/tell this
    # module records them itself (heartbeat()).
    warnings.filterwarnings(
        "ignore", message="Heartbeat of storage is supposed to be used with Study.optimize"
    )
    _STORAGES[study] = storage
    return study


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # Several workers on one SQLite file wait for the lock instead of failing at once.
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def fail_stale(study: Any, *, settle: bool = True) -> list[int]:
    """Fail the RUNNING trials whose heartbeat is stale, marked ``stale: true``; returns their
    numbers. Their candidates are then neither finished nor pending, so they run again.

    With ``settle``, when a live-looking trial was claimed from this hostname by another
    worker — a previous run of this pod, killed less than a grace period ago, or a sibling
    worker on this machine — wait one grace period first, so a dead one is failed now rather
    than skipped as running elsewhere; a live one keeps beating through the wait."""
    storage = _STORAGES.get(study)
    if storage is None:
        return []  # not opened by open_study: no heartbeats to judge by
    if settle and any(
        t.user_attrs.get("worker") == HOST and t.user_attrs.get("worker_id") != WORKER_ID
        for t in _live(study)
    ):
        wait = int(storage.grace_period) + 2  # + 2: the database clock may count whole seconds
        log.warning("a trial from this host may be dead; waiting %d s for its heartbeat", wait)
        time.sleep(wait)
    optuna = _optuna()
    failed = []
    for trial_id in _stale_ids(study, storage):
        try:
            storage.set_trial_user_attr(trial_id, "stale", True)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        number = storage.get_trial_number_from_id(trial_id)
        study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        failed.append(number)
    return failed


def _stale_ids(study: Any, storage: Any) -> list[int]:
    """Optuna's own judgment (what ``optuna.storages.fail_stale_trials`` fails), asked before
    failing so that the trials can be marked first: a finished trial takes no attributes."""
    return list(storage._get_stale_trial_ids(storage.get_study_id_from_name(study.study_name)))


def _live(study: Any) -> list[Any]:
    """RUNNING trials claimed by a worker whose heartbeat is not stale."""
    optuna = _optuna()
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    claimed = [t for t in running if t.user_attrs.get("worker_id")]
    storage = _STORAGES.get(study)
    if storage is None or not claimed:
        return claimed
    stale = {storage.get_trial_number_from_id(i) for i in _stale_ids(study, storage)}
    return [t for t in claimed if t.number not in stale]


def finished_records(study: Any) -> dict[str, TrialRecord]:
    """Candidates this study has finished: measured, or failed as a property of the candidate
    (OOM, an option vLLM rejects: not retried). Interrupted and stale trials, and those that
    failed for the environment (``TrialRecord.environment_failure``), are not finished: their
    candidates run again."""
    out: dict[str, TrialRecord] = {}
    for trial in study.get_trials(deepcopy=False):
        data = trial.user_attrs.get("record")
        if not data:
            continue
        record = TrialRecord.from_json(data)
        if record.environment_failure or record.name in out:
            continue
        if record.state in (STATE_COMPLETE, STATE_FAILED):
            out[record.name] = record
    return out


def pending_names(study: Any) -> set[str]:
    """Candidates queued, or being measured by a live worker (possibly another one)."""
    optuna = _optuna()
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    return {
        str(t.user_attrs.get("candidate"))
        for t in [*waiting, *_live(study)]
        if t.user_attrs.get("candidate")
    }


def running_elsewhere(study: Any, name: str, except_number: int) -> bool:
    """Whether another live trial (another worker, heartbeat fresh) is measuring ``name``."""
    return any(
        t.number != except_number and t.user_attrs.get("candidate") == name for t in _live(study)
    )


@contextmanager
def heartbeat(trial: Any) -> Iterator[None]:
    """Claim ``trial`` for this worker and record its Optuna heartbeat while the body runs.

    The first beat comes before the claim: a worker killed in between leaves a trial that no
    one counts as live and that goes stale. Without a kept storage (a study not opened by
    :func:`open_study`) the trial is claimed and nothing beats."""
    storage = _STORAGES.get(trial.study)
    trial_id = trial._trial_id  # Trial has no public id; Optuna's own heartbeat uses this one
    if storage is not None:
        storage.record_heartbeat(trial_id)
    trial.set_user_attr("worker_id", WORKER_ID)
    trial.set_user_attr("worker", HOST)
    if storage is None:
        yield
        return
    stop = threading.Event()
    interval = float(storage.get_heartbeat_interval())

    def beat() -> None:
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except Exception as exc:  # a storage hiccup must not kill the trial
                log.warning("heartbeat failed: %s", exc)

    thread = threading.Thread(target=beat, name="vtune-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
