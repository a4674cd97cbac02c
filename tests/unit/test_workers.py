"""Several workers on one study, against a real SQLite study (two ``open_study`` calls on one
file, as two processes would be): who measures a candidate both queued, when a trial nobody
beats for is stale (seen by the watcher's own clock, never by comparing two clocks), waiting for
the others, and a record told after another worker failed its trial. The process-level cases
(two ``vtune search`` processes, random offsets, ``faketime`` skew) are in
tests/faults/test_two_workers.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from tuner.search import study as study_mod
from tuner.search import workers as workers_mod
from tuner.search.record import STATE_COMPLETE, STATE_FAILED, TrialRecord
from tuner.search.study import (
    earlier_trial,
    fail_stale,
    heartbeat,
    measuring_elsewhere,
    open_study,
    storage_url,
)
from tuner.search.workers import tell_record, wait_for_others

RUNNING = optuna.trial.TrialState.RUNNING
COMPLETE = optuna.trial.TrialState.COMPLETE
FAIL = optuna.trial.TrialState.FAIL


def workers(tmp_path: Path, *, heartbeat_s: float = 0.2, grace_s: float = 1.0):
    url = storage_url(None, tmp_path / "study.db")
    return [
        open_study(url, "s", ["maximize"], None, heartbeat_s=heartbeat_s, grace_s=grace_s)
        for _ in range(2)
    ]


def queue(study, name: str) -> None:
    study.enqueue_trial({}, user_attrs={"candidate": name})


def become_another_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on this process is worker b (worker ids are per process)."""
    monkeypatch.setattr(study_mod, "WORKER_ID", uuid.uuid4().hex)


def test_a_candidate_both_workers_queued_is_measured_by_the_earlier_trial(tmp_path: Path) -> None:
    a, b = workers(tmp_path)
    queue(a, "seqs8")
    queue(b, "seqs8")  # both saw nothing pending and queued it
    first, second = a.ask(), b.ask()
    assert (first.number, second.number) == (0, 1)
    # Not claimed yet (each worker is between ask and claim): the order decides already.
    assert earlier_trial(b, "seqs8", second.number) == first.number
    assert earlier_trial(a, "seqs8", first.number) is None
    with heartbeat(first), heartbeat(second):  # both claimed: still one measures
        assert earlier_trial(b, "seqs8", second.number) == first.number
        assert earlier_trial(a, "seqs8", first.number) is None
        assert earlier_trial(b, "seqs4", second.number) is None  # another candidate
    b.tell(second, state=optuna.trial.TrialState.PRUNED)  # it yields
    a.tell(first, 1.0)
    assert earlier_trial(b, "seqs8", 5) is None  # finished: the study's record decides now


def test_a_trial_asked_and_never_claimed_goes_stale_after_a_grace_period_seen(
    tmp_path: Path,
) -> None:
    a, b = workers(tmp_path, grace_s=1.0)
    queue(a, "seqs8")
    dead = a.ask()  # its worker was killed before the claim
    assert fail_stale(b, settle=False) == []  # first seen now: not judged by its age
    assert earlier_trial(b, "seqs8", dead.number + 1) == dead.number
    time.sleep(1.3)
    assert earlier_trial(b, "seqs8", dead.number + 1) is None  # stale: it holds nothing
    assert fail_stale(b, settle=False) == [dead.number]
    failed = b.get_trials(deepcopy=False)[dead.number]
    assert failed.state == FAIL and failed.user_attrs["stale"] is True


def test_a_beating_trial_is_never_stale_however_long_it_is_watched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = workers(tmp_path, heartbeat_s=0.2, grace_s=0.6)
    queue(a, "seqs8")
    trial = a.ask()
    with heartbeat(trial):
        become_another_worker(monkeypatch)
        for _ in range(8):  # 2 s: more than three grace periods
            assert fail_stale(b, settle=False) == []
            assert "seqs8" in measuring_elsewhere(b)
            time.sleep(0.25)
        assert b.get_trials(deepcopy=False)[trial.number].user_attrs["heartbeat"] >= 5
    # The beats stopped: dead, once b has seen its last beat stand still for a grace period.
    first = fail_stale(b, settle=False)
    time.sleep(1.0)
    assert first + fail_stale(b, settle=False) == [trial.number]
    assert "seqs8" not in measuring_elsewhere(b)


def test_a_worker_with_nothing_left_waits_for_what_others_measure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers_mod, "WAIT_S", 0.05)
    a, b = workers(tmp_path)
    assert wait_for_others(b, {}) is False  # nobody measures anything
    queue(a, "seqs8")
    trial = a.ask()
    with heartbeat(trial):
        record = TrialRecord("seqs8", {}, STATE_COMPLETE, objective=3.0, number=trial.number)
        assert measuring_elsewhere(a) == set()  # its own trial is not elsewhere
        become_another_worker(monkeypatch)
        assert wait_for_others(b, {"seqs8": record}) is False  # b has its result already
        done: dict[str, TrialRecord] = {}
        assert wait_for_others(b, done) is True and done == {}
        tell_record(a, trial, record, 3.0)
    assert wait_for_others(b, done) is False
    assert wait_for_others(b, {}) is False


@pytest.mark.parametrize("state", [STATE_COMPLETE, STATE_FAILED])
def test_a_record_told_after_another_worker_failed_its_trial_is_kept(
    tmp_path: Path, state: str
) -> None:
    a, b = workers(tmp_path)
    queue(a, "seqs8")
    trial = a.ask()
    with heartbeat(trial):
        trial.set_user_attr("knobs", {"max_num_seqs": 8})
        # b took it for dead (a stopped process, a database that did not answer) meanwhile
        b.tell(trial.number, state=FAIL)
        failure = None if state == STATE_COMPLETE else {"class": "OOM", "message": "oom"}
        record = TrialRecord(
            "seqs8", {"max_num_seqs": 8}, state, objective=7.0, number=0, failure=failure
        )
        tell_record(a, trial, record, 7.0)  # no traceback
    trials = b.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [FAIL, COMPLETE if state == STATE_COMPLETE else FAIL]
    kept = trials[1]
    assert TrialRecord.from_json(kept.user_attrs["record"]) == record
    assert kept.user_attrs["candidate"] == "seqs8" and kept.user_attrs["replaces"] == 0
    assert kept.user_attrs["knobs"] == {"max_num_seqs": 8}
    if state == STATE_COMPLETE:
        assert kept.values == [7.0]
    else:
        assert kept.user_attrs["failure_class"] == "OOM"


# Each opener is its own `python -c` process (not a fork of this pytest worker, whose threads and
# inherited signal handlers once left a forked pool's worker hanging at exit): it imports once,
# then for each URL on stdin says "ready", waits for the start time and answers "ok" or the error.
_OPENER = """
import sys
import time
from tuner.search.study import open_study
for line in sys.stdin:
    url = line.strip()
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    while time.time() < start:  # spin, not sleep: the four must reach the storage together
        pass
    try:
        open_study(url, "s", ["maximize"], None)
        print("ok", flush=True)
    except Exception as exc:
        print(str(exc).replace("\\n", " "), flush=True)
"""


def test_workers_that_create_one_new_storage_at_once_all_open_it(tmp_path: Path) -> None:
    """Optuna creates a new storage's tables on first use, unguarded: four processes that
    open one new SQLite file at the same moment used to fail most times ("table studies
    already exists", "UNIQUE constraint failed: alembic_version.version_num")."""
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", _OPENER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for i in range(5):
            url = storage_url(None, tmp_path / f"new-{i}.db")
            for proc in openers:
                proc.stdin.write(url + "\n")
                proc.stdin.flush()
            assert [proc.stdout.readline().strip() for proc in openers] == ["ready"] * 4
            start = time.time() + 0.2  # all four are waiting on their stdin: one start time
            for proc in openers:
                proc.stdin.write(f"{start}\n")
                proc.stdin.flush()
            opened = [proc.stdout.readline().strip() for proc in openers]
            assert opened == ["ok"] * 4, opened
    finally:
        for proc in openers:
            proc.stdin.close()
        for proc in openers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
