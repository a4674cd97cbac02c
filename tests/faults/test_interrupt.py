"""Stop requests to a whole ``vtune search`` on the fake vLLM process (real signals, real
processes): an interruption must never become a result.

SIGTERM while a trial's server starts, and while a trial is under load (also with vtune as PID
1 of its own PID namespace, as in a container without an init): vtune ends within seconds with
143 and one line; nothing of its process tree and no /dev/shm file its servers mapped is left;
the interrupted trial is saved nowhere, and the rerun measures it, and only it (a trial that
finished before the signal keeps its number, no second log of it appears). SIGINT inherited
as ignored (nohup, a background job) stays ignored: the search runs to its end.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.faults import procs
from tests.faults import searchproc as sp

pytestmark = pytest.mark.faults

LINE = "vtune: interrupted by SIGTERM; finished trials are saved — rerun the same command to resume"
QUICK_S = 15.0  # "within seconds" on two busy cores; the fake stops in well under one


def _env(mark: str, **extra: str) -> dict[str, str]:
    return sp.fake_env(mark, FAKE_VLLM_SHM="1", **extra)


def _check_stopped(search: procs.Search, ran: sp.Ran, took: float, mark: str) -> None:
    """Ended by the request, quickly, cleanly: exit 143, the one line, no traceback, nothing
    left running, no /dev/shm file left, no trial saved for what was cut short."""
    assert ran.returncode == 128 + signal.SIGTERM, ran.describe()
    assert took < QUICK_S, f"took {took:.1f} s\n{ran.describe()}"
    assert LINE in ran.stderr.splitlines(), ran.describe()
    assert "Traceback" not in ran.stdout + ran.stderr, ran.describe()
    procs.assert_gone(search.remember())
    sp.assert_no_process_left(mark)
    left = [p for p in procs.shm_segments(search.pdir) if p.exists()]
    assert not left, f"/dev/shm files left: {left}"
    sp.assert_nothing_half_written(search.out)


def _rerun(model: Path, out: Path, *, pid1: bool = False) -> tuple[sp.Ran, dict[str, int]]:
    """The same command again, to its end: every candidate exactly once, measured."""
    mark = sp.new_mark()
    search = procs.start(sp.search_argv(model, out), _env(mark), out, model, "rerun", pid1=pid1)
    try:
        ran = search.ended(timeout=600)
    finally:
        search.kill()
    assert ran.returncode == 0, ran.describe()
    pdir = sp.profile_dir(model, out)
    sp.assert_complete_record(sp.assert_pair_from_one_run(pdir))
    procs.assert_gone(search.remember())
    sp.assert_no_process_left(mark)
    assert not [p for p in procs.shm_segments(pdir) if p.exists()]
    return ran, procs.record_numbers(pdir)


def test_sigterm_while_the_baseline_starts(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, mark = tmp_path / "out", sp.new_mark()
    argv = sp.search_argv(tiny_model_dir, out)
    search = procs.start(argv, _env(mark, FAKE_VLLM_STARTUP_S="60"), out, tiny_model_dir, "a")
    try:
        search.wait_log("000", "# vtune:")
        search.wait_log("000", "shm /dev/shm/")  # the fake runs (and maps its memory)
        ran, took = search.signal(signal.SIGTERM)
    finally:
        search.kill()
    _check_stopped(search, ran, took, mark)
    assert sp.saved_trials(search.pdir) == {}  # a start cut short is no failed trial
    assert procs.trial_logs(search.pdir) == ["000-vllm-defaults.log"]
    _, numbers = _rerun(tiny_model_dir, out)
    assert numbers == {"vllm-defaults": 1, "seqs4": 2}  # measured again, after trial 0
    assert procs.trial_logs(search.pdir) == [
        "000-vllm-defaults.log",
        "001-vllm-defaults.log",
        "002-seqs4.log",
    ]


def test_sigterm_under_load_keeps_the_finished_trial(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGTERM while the second trial is under load: the first (finished) is kept and not
    measured again; the second is neither saved as complete nor as failed, and runs again."""
    out, mark = tmp_path / "out", sp.new_mark()
    search = procs.start(sp.search_argv(tiny_model_dir, out), _env(mark), out, tiny_model_dir, "a")
    try:
        search.wait_log("001", "fake vLLM: first request")
        ran, took = search.signal(signal.SIGTERM)
    finally:
        search.kill()
    _check_stopped(search, ran, took, mark)
    before = sp.saved_trials(search.pdir)
    assert set(before) == {"vllm-defaults"} and before["vllm-defaults"]["number"] == 0
    _, numbers = _rerun(tiny_model_dir, out)
    assert numbers == {"vllm-defaults": 0, "seqs4": 2}
    assert procs.trial_logs(search.pdir) == [
        "000-vllm-defaults.log",
        "001-seqs4.log",
        "002-seqs4.log",
    ]
    after = sp.saved_trials(search.pdir)
    assert after["vllm-defaults"]["started_at"] == before["vllm-defaults"]["started_at"]


def test_sigterm_to_vtune_as_pid_1(tiny_model_dir: Path, tmp_path: Path) -> None:
    """As in a container without an init: the kernel drops signals PID 1 does not handle, and
    re-sending one to itself does nothing. vtune handles SIGTERM itself: it stops vLLM, ends
    with 143 (unshare passes it on), and the rerun (PID 1 again) resumes."""
    out, mark = tmp_path / "out", sp.new_mark()
    argv = sp.search_argv(tiny_model_dir, out)
    search = procs.start(argv, _env(mark), out, tiny_model_dir, "a", pid1=True)
    try:
        search.wait_log("000", "fake vLLM: first request")
        ran, took = search.signal(signal.SIGTERM)
    finally:
        search.kill()
    _check_stopped(search, ran, took, mark)
    assert sp.saved_trials(search.pdir) == {}
    _, numbers = _rerun(tiny_model_dir, out, pid1=True)
    assert numbers == {"vllm-defaults": 1, "seqs4": 2}


def test_sigint_inherited_as_ignored_does_not_interrupt(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out, mark = tmp_path / "out", sp.new_mark()
    argv = sp.search_argv(tiny_model_dir, out)
    search = procs.start(argv, _env(mark), out, tiny_model_dir, "a", ignore_sigint=True)
    try:
        search.wait_log("000", "fake vLLM: first request")
        search.vtune().send_signal(signal.SIGINT)
        ran = search.ended(timeout=600)
    finally:
        search.kill()
    assert ran.returncode == 0 and "interrupted" not in ran.stderr, ran.describe()
    sp.assert_complete_record(sp.assert_pair_from_one_run(search.pdir))
    assert procs.record_numbers(search.pdir) == {"vllm-defaults": 0, "seqs4": 1}
    procs.assert_gone(search.remember())
    sp.assert_no_process_left(mark)
