"""Study plumbing against a real SQLite study (no mocks of Optuna): heartbeats decide which
RUNNING trials are live, stale or merely not yet started; the worker identity; redact().

Two "workers" are two ``open_study`` calls on one file, as two processes would be. Heartbeat
intervals are whole seconds (Optuna's unit) and SQLite's clock counts whole seconds, so these
tests sleep a few seconds in all.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import optuna
import pytest

from tuner.search import study as study_mod
from tuner.search.study import (
    fail_stale,
    heartbeat,
    open_study,
    pending_names,
    redact,
    running_elsewhere,
    storage_url,
)

RUNNING = optuna.trial.TrialState.RUNNING
FAIL = optuna.trial.TrialState.FAIL


def workers(tmp_path: Path, *, heartbeat_s: int = 1, grace_s: int = 1):
    url = storage_url(None, tmp_path / "study.db")
    return [
        open_study(url, "s", ["maximize"], None, heartbeat_s=heartbeat_s, grace_s=grace_s)
        for _ in range(2)
    ]


def claim(study, name: str):
    trial = study.ask()
    trial.set_user_attr("candidate", name)
    return trial


def state_of(study, number: int):
    return study.get_trials(deepcopy=False)[number]


def test_running_trial_that_never_beat_is_not_failed(tmp_path: Path) -> None:
    a, b = workers(tmp_path)
    trial = claim(a, "seqs8")  # asked; the worker has not reached its first heartbeat yet
    time.sleep(2.2)  # longer than the grace period: age alone is not staleness
    assert fail_stale(b) == []
    assert state_of(b, trial.number).state == RUNNING
    # not claimed yet, so it does not hold its candidate either (a duplicate, never a loss)
    assert not running_elsewhere(b, "seqs8", except_number=-1)
    assert "seqs8" not in pending_names(b)


def test_trial_whose_heartbeat_went_quiet_is_failed_and_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = workers(tmp_path, grace_s=1)
    trial = claim(a, "seqs8")
    with heartbeat(trial):
        pass  # one beat, then silence: the worker was killed mid-trial
    assert fail_stale(b, settle=False) == []  # still within the grace period
    assert running_elsewhere(b, "seqs8", except_number=-1)
    assert "seqs8" in pending_names(b)
    # Same hostname, another worker id: a restarted pod's dead trial; settle waits it out.
    monkeypatch.setattr(study_mod, "WORKER_ID", uuid.uuid4().hex)  # b is the restarted process
    started = time.monotonic()
    assert fail_stale(b) == [trial.number]
    assert time.monotonic() - started >= 1
    failed = state_of(b, trial.number)
    assert failed.state == FAIL and failed.user_attrs["stale"] is True
    assert not running_elsewhere(b, "seqs8", except_number=-1)
    assert "seqs8" not in pending_names(b)
    assert fail_stale(b, settle=False) == []  # failed once only


def test_live_worker_keeps_its_trial_across_another_workers_fail_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = workers(tmp_path, heartbeat_s=1, grace_s=3)
    trial = claim(a, "seqs8")
    with heartbeat(trial):
        monkeypatch.setattr(study_mod, "WORKER_ID", uuid.uuid4().hex)  # b: a sibling worker
        started = time.monotonic()
        assert fail_stale(b) == []  # settles (same host) for longer than the grace period
        assert time.monotonic() - started >= 3
        assert state_of(b, trial.number).state == RUNNING
        assert running_elsewhere(b, "seqs8", except_number=-1)
        assert not running_elsewhere(a, "seqs8", except_number=trial.number)
    a.tell(trial, 1.0)
    assert state_of(b, trial.number).state == optuna.trial.TrialState.COMPLETE


def test_whoever_sees_a_trial_stale_fails_it_and_fail_stale_hands_it_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dead worker's trial goes stale between two questions a moment apart: fail_stale says
    # "not yet" at 29.99 s, pending_names asks at 30.01 s. Both must agree from then on: the
    # trial is failed when first seen stale, and the next fail_stale returns it for a requeue.
    now = [0.0]
    monkeypatch.setattr(study_mod.time, "monotonic", lambda: now[0])
    (a,) = workers(tmp_path)[:1]
    b = open_study(storage_url(None, tmp_path / "study.db"), "s", ["maximize"], None, grace_s=30)
    trial = claim(a, "seqs8")
    trial.set_user_attr("worker_id", "a-dead-worker")
    trial.set_user_attr(study_mod.BEAT, 3)
    assert "seqs8" in pending_names(b)  # b starts watching it
    now[0] = 29.99
    assert fail_stale(b, settle=False) == []
    now[0] = 30.01
    assert "seqs8" not in pending_names(b)
    failed = state_of(b, trial.number)
    assert failed.state == FAIL and failed.user_attrs["stale"] is True  # not left RUNNING
    assert fail_stale(b, settle=False) == [trial.number]  # handed over once, to be requeued
    assert fail_stale(b, settle=False) == []


def test_worker_identity_is_a_random_id_not_host_pid(tmp_path: Path) -> None:
    a, _ = workers(tmp_path)
    trial = claim(a, "seqs8")
    with heartbeat(trial):
        attrs = state_of(a, trial.number).user_attrs
    assert re.fullmatch(r"[0-9a-f]{32}", attrs["worker_id"])
    assert attrs["worker_id"] == study_mod.WORKER_ID
    assert attrs["worker"] == study_mod.HOST
    assert str(os.getpid()) not in attrs["worker_id"]
    assert f"{study_mod.HOST}:{os.getpid()}" not in attrs.values()

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked child is another worker with its own id
        os.write(write, study_mod.WORKER_ID.encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert re.fullmatch(r"[0-9a-f]{32}", child_id) and child_id != study_mod.WORKER_ID


@pytest.mark.parametrize(
    "url,expected",
    [
        ("postgresql://vtune:hunter2@db:5432/s", "postgresql://vtune:***@db:5432/s"),
        ("postgresql://vtune@db/s", "postgresql://vtune@db/s"),  # no password: unchanged
        ("postgresql://db/s", "postgresql://db/s"),
        ("postgresql://u:p%40ss@[::1]:5432/s", "postgresql://u:***@[::1]:5432/s"),
        ("postgresql://u@[2001:db8::1]/s", "postgresql://u@[2001:db8::1]/s"),
        ("postgresql://u:p@ss@h/s", "postgresql://u:***@h/s"),  # unencoded "@": no tail leaks
        ("postgresql://u@h/db?password=secret", "postgresql://u@h/db?password=***"),
        (
            "postgresql://u@h/db?sslmode=require&sslpassword=x&application_name=vt",
            "postgresql://u@h/db?sslmode=require&sslpassword=***&application_name=vt",
        ),
        (
            "mysql+pymysql://u:p@h/db?Auth_Token=abc;client_secret=def",
            "mysql+pymysql://u:***@h/db?Auth_Token=***;client_secret=***",
        ),
        ("postgresql://h/db?sslmode=require", "postgresql://h/db?sslmode=require"),
        ("sqlite:////tmp/vtune/study.db", "sqlite:////tmp/vtune/study.db"),
        ("/tmp/study.db", "/tmp/study.db"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected
