"""Optuna study plumbing: opening (the storage itself: :mod:`tuner.search.storage`), resuming,
stale trials, heartbeats.

Trials carry user attributes: ``candidate`` (name), ``knobs`` (dict), ``baseline`` (bool),
``worker_id`` (a random id per process), ``worker`` (its hostname, for people), and at the end
``record`` (TrialRecord JSON), ``objective`` and ``slo`` (met, not met, stopped early, failed;
what ``optuna-dashboard`` shows: :func:`tuner.search.workers.dashboard_attrs`) and, when it failed,
``failure_class`` and ``environment`` (the environment's failure: not finished, runs again); a
trial failed as stale has ``stale: true``, one cut short by a stop request ``interrupted: true``
(:mod:`tuner.search.resume`). The study itself carries the search's configuration
(:mod:`tuner.search.study_config`); a marker study beside it, who writes the profile
(:mod:`tuner.search.lease`).

Liveness is a heartbeat judged by the one who watches it, on its own clock: from the moment a
trial is claimed, a thread adds one to its ``heartbeat`` attribute every ``HEARTBEAT_S``
seconds, and a worker takes a RUNNING trial for dead (*stale*) once it has itself seen the
trial's heartbeat stand still for ``GRACE_S`` seconds of its own monotonic clock. No two clocks
are ever compared, so clock skew between workers does not matter. (Optuna's heartbeat,
``RDBStorage(heartbeat_interval, grace_period)``, compares the time a beat was written with the
time it is read, each taken by the database's ``CURRENT_TIMESTAMP``; on SQLite that is each
worker's own clock, and a worker whose clock ran two minutes ahead failed every live trial of
the others: tests/faults/test_two_workers.py; on PostgreSQL both times are the server's, but
one rule for every storage is simpler.) A trial asked but never claimed (its worker died
in between) goes stale the same way. A worker is not known by ``host:pid``: in a container
vtune is PID 1 and an Indexed Job's pod keeps its hostname across restarts, so a rerun would
take its own dead trial for a live one.

A RUNNING trial is *live* when its worker has claimed it (``worker_id``) and it is not stale;
only live trials keep their candidate from being queued here (:func:`pending_names`).
:func:`fail_stale` fails stale trials so their candidates run again. Two workers that asked a
trial for the same candidate (both queued it) settle it by trial number: the later one yields
to an earlier one that is still running (:func:`earlier_trial`), so exactly one measures it.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tuner.errors import StorageError
from tuner.search.record import STATE_COMPLETE, STATE_FAILED, TrialRecord
from tuner.search.storage import OPEN_TRIES, lost_creation_race, open_failure, open_storage, redact
from tuner.search.storage import sqlalchemy_url as sqlalchemy_url  # re-exported
from tuner.search.storage import storage_url as storage_url  # re-exported

log = logging.getLogger(__name__)

HEARTBEAT_S = 10
GRACE_S = 3 * HEARTBEAT_S  # three missed beats: a stalled database write is not a death
BEAT = "heartbeat"  # the trial attribute its heartbeat counts up
HOST = socket.gethostname()
WORKER_ID = uuid.uuid4().hex


def _new_identity() -> None:
    global WORKER_ID
    WORKER_ID = uuid.uuid4().hex  # a forked child is another worker


os.register_at_fork(after_in_child=_new_identity)


@dataclass
class _Watch:
    """One study's storage as opened (Optuna wraps it; we keep ours rather than reaching into
    ``study._storage``), its heartbeat settings, and what this worker has seen of its RUNNING
    trials: per trial number, the last (claim, beat) and since when, on this process's
    monotonic clock."""

    storage: Any
    heartbeat_s: float
    grace_s: float
    seen: dict[int, tuple[tuple[Any, Any], float]] = field(default_factory=dict)
    # Trials this worker failed as stale that no fail_stale caller has been given yet (one
    # failed while another question was asked: their candidates must still run again).
    failed: list[int] = field(default_factory=list)

    def stale(self, running: list[Any]) -> set[int]:
        """The numbers of ``running`` (all the RUNNING trials) whose claim and heartbeat this
        worker has seen stand still for ``grace_s`` seconds; the watch of a trial starts when
        this worker first sees it. This worker's own trials are never stale."""
        now = time.monotonic()
        seen, stale = {}, set()
        for trial in running:
            state = (trial.user_attrs.get("worker_id"), trial.user_attrs.get(BEAT))
            last = self.seen.get(trial.number)
            if last is None or last[0] != state:
                last = (state, now)
            elif now - last[1] >= self.grace_s and state[0] != WORKER_ID:
                stale.add(trial.number)
            seen[trial.number] = last
        self.seen = seen  # finished trials are forgotten
        return stale


# Weak keys: a study that is dropped takes its watch with it.
_WATCHES: weakref.WeakKeyDictionary[Any, _Watch] = weakref.WeakKeyDictionary()


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(
    url: str,
    name: str,
    directions: list[str],
    sampler: Any,
    *,
    heartbeat_s: float = HEARTBEAT_S,
    grace_s: float = GRACE_S,
) -> Any:
    """Create or load the study; its trials' heartbeats beat every ``heartbeat_s`` and go
    stale after ``grace_s`` seconds seen standing still; StorageError with one line when the
    storage is unreachable (:func:`open_storage`)."""
    optuna = _optuna()
    for attempt in range(1, OPEN_TRIES + 1):
        storage = open_storage(url)
        try:
            study = optuna.create_study(
                study_name=name,
                storage=storage,
                directions=directions,
                sampler=sampler,
                load_if_exists=True,
            )
            break
        except Exception as exc:  # SQLAlchemy raises many types for "cannot connect"
            if attempt < OPEN_TRIES and lost_creation_race(exc):
                time.sleep(random.uniform(0.1, 0.5))  # the other worker's tables are there now
                continue
            raise StorageError(open_failure(url, exc)) from None
    _WATCHES[study] = _Watch(storage, heartbeat_s, grace_s)
    return study


def load_study(url: str, name: str, sampler: Any = None) -> Any:
    """An existing study, with heartbeats as :func:`open_study`'s; StorageError (one line)
    when the storage cannot be opened or holds no study ``name``."""
    storage = open_storage(url)
    try:
        try:
            study_id = storage.get_study_id_from_name(name)
        except KeyError:
            names = sorted(
                s.study_name
                for s in storage.get_all_studies()
                if s.study_name.startswith("vtune-") and "/" not in s.study_name
            )
            there = f"studies there: {', '.join(names[:5])}" if names else "no vtune study there"
            raise StorageError(
                f"no study {name!r} in {redact(url)} ({there}; `vtune search` prints the name "
                "of its study)"
            ) from None
        directions = [d.name.lower() for d in storage.get_study_directions(study_id)]
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(open_failure(url, exc)) from None
    return open_study(url, name, directions, sampler)


def storage_of(study: Any) -> Any:
    """The storage ``study`` was opened on (by :func:`open_study`), else Optuna's own."""
    watch = _WATCHES.get(study)
    return watch.storage if watch is not None else study._storage


def fail_stale(study: Any, *, settle: bool = True) -> list[int]:
    """Fail the RUNNING trials this worker has seen go stale, marked ``stale: true``; returns
    their numbers. Their candidates are then neither finished nor pending, so they run again.

    A worker sees a trial go stale only after watching it for a grace period. With
    ``settle``, when a live-looking trial was claimed from this hostname by another worker —
    a previous run of this pod, killed less than a grace period ago, or a sibling worker on
    this machine — watch it for one grace period first, so a dead one is failed now rather
    than skipped as running elsewhere; a live one keeps beating through the wait."""
    watch = _WATCHES.get(study)
    if watch is None:
        return []  # not opened by open_study: no heartbeats to judge by
    if settle and any(
        t.user_attrs.get("worker") == HOST and t.user_attrs.get("worker_id") != WORKER_ID
        for t in _live(study)
    ):
        wait = watch.grace_s + 2  # + 2: a beat due at the very end is written too
        log.warning("a trial from this host may be dead; waiting %.0f s for its heartbeat", wait)
        time.sleep(wait)
    _fail(study, watch, watch.stale(_running(study)))
    failed, watch.failed = sorted(set(watch.failed)), []
    return failed


def _fail(study: Any, watch: _Watch, stale: set[int]) -> None:
    """Fail the ``stale`` trials (marked ``stale: true``) and note them in ``watch.failed``.
    Whoever sees a trial stale fails it at once — :func:`fail_stale` or a question about what
    is pending or running — so that two questions a moment apart never disagree (one seeing
    a dead trial as live, the next as gone: the trial would stay RUNNING, its candidate
    neither pending nor finished)."""
    if not stale:
        return
    optuna = _optuna()
    storage = watch.storage
    study_id = storage.get_study_id_from_name(study.study_name)
    for number in sorted(stale):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        try:
            storage.set_trial_user_attr(trial_id, "stale", True)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it ended meanwhile, or another worker failed it first
        study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        watch.failed.append(number)


def _running(study: Any) -> list[Any]:
    optuna = _optuna()
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))


def _not_stale(study: Any) -> list[Any]:
    """RUNNING trials that are not stale (claimed or not), as this worker sees them now."""
    running = _running(study)
    watch = _WATCHES.get(study)
    if watch is None:
        return running
    stale = watch.stale(running)
    _fail(study, watch, stale)  # seen stale: failed now (the next fail_stale requeues them)
    return [t for t in running if t.number not in stale]


def _live(study: Any) -> list[Any]:
    """RUNNING trials claimed by a worker whose heartbeat is not stale."""
    return [t for t in _not_stale(study) if t.user_attrs.get("worker_id")]


def finished_records(study: Any) -> dict[str, TrialRecord]:
    """Candidates this study has finished: measured, stopped early (its probe could not reach
    the incumbent), or failed as a property of the candidate
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
        if record.state in (STATE_COMPLETE, STATE_FAILED) or record.stopped_early:
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


def measuring_elsewhere(study: Any) -> set[str]:
    """Candidates of the RUNNING trials of other workers that are not stale (claimed, or
    about to be)."""
    return {
        str(t.user_attrs["candidate"])
        for t in _not_stale(study)
        if t.user_attrs.get("worker_id") != WORKER_ID and t.user_attrs.get("candidate")
    }


def earlier_trial(study: Any, name: str, number: int) -> int | None:
    """The first trial before trial ``number`` that holds candidate ``name`` and is still
    RUNNING and not stale — claimed, or asked and about to be (its worker is between ask and
    claim) —, or None. Trial ``number`` measures ``name`` only when there is none: of two
    workers that both queued and asked it, the later yields and the earlier measures, never
    both and never neither. (A trial the sampler proposed names its candidate only when it
    starts: two such trials may both measure it, a duplicate, never a loss.)"""
    earlier = [
        t.number
        for t in _not_stale(study)
        if t.number < number and t.user_attrs.get("candidate") == name
    ]
    return min(earlier, default=None)


@contextmanager
def heartbeat(trial: Any) -> Iterator[None]:
    """Claim ``trial`` for this worker and keep its heartbeat going while the body runs: its
    ``heartbeat`` attribute counts up every heartbeat interval, from a thread.

    A worker killed before the claim leaves an unclaimed RUNNING trial, which goes stale like
    any other. Without a watch (a study not opened by :func:`open_study`) the trial is
    claimed and nothing beats."""
    trial.set_user_attr("worker_id", WORKER_ID)
    trial.set_user_attr("worker", HOST)
    watch = _WATCHES.get(trial.study)
    if watch is None:
        yield
        return
    storage = watch.storage
    trial_id = trial._trial_id  # Trial has no public id; Optuna's own heartbeat uses this one
    finished = _optuna().exceptions.UpdateFinishedTrialError
    stop = threading.Event()

    def beat() -> None:
        count = 0
        while not stop.wait(watch.heartbeat_s):
            count += 1
            try:
                storage.set_trial_user_attr(trial_id, BEAT, count)
            except finished:
                return  # told (here, or failed by another worker): nothing left to keep alive
            except Exception as exc:  # a storage hiccup must not kill the trial
                log.warning("heartbeat failed: %s", exc)

    thread = threading.Thread(target=beat, name="vtune-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
