"""Environment failures of a whole ``vtune search`` on the fake vLLM process: they say nothing
about the candidate, so they are not finished trials, the search stops at once when the
baseline meets one (one line, exit 2, the class and the log named), and the run after the fix
measures every candidate, the baseline included, with no failed trial left in the record.

Injected for real: a ``--vllm-python`` that does not exist; only the guard process (the leader
of vLLM's process group) SIGKILLed from outside while the baseline is under load.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.faults import procs
from tests.faults import searchproc as sp

pytestmark = pytest.mark.faults


def _fixed_rerun(model: Path, out: Path) -> dict[str, int]:
    """The same search with a working environment: complete, nothing failed, every candidate
    measured in this run (after the failed trial 0)."""
    mark = sp.new_mark()
    ran = sp.run(sp.search_argv(model, out), sp.fake_env(mark, FAKE_VLLM_SHM="1"), timeout=600)
    assert ran.returncode == 0, ran.describe()
    pdir = sp.profile_dir(model, out)
    record = sp.assert_pair_from_one_run(pdir)
    sp.assert_complete_record(record)  # every candidate once, complete, objective > 0
    assert record is not None and not [t for t in record["trials"] if t["state"] != "complete"]
    sp.assert_no_process_left(mark)
    assert not [p for p in procs.shm_segments(pdir) if p.exists()]
    return procs.record_numbers(pdir)


def _one_line(ran: sp.Ran, failure_class: str) -> str:
    line = ran.one_line_error()  # exit 2, one "vtune: error: ..." line, no traceback
    assert f"the environment failed, not the candidate ({failure_class} in the baseline" in line
    log = re.search(r"; log: (\S+\.log)\. ", line)
    assert log is not None and Path(log.group(1)).exists(), line
    return line


def test_wrong_vllm_python_then_fixed(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, mark = tmp_path / "out", sp.new_mark()
    argv = sp.search_argv(tiny_model_dir, out, "--vllm-python", str(tmp_path / "no-python"))
    ran = sp.run(argv, sp.fake_env(mark), timeout=300)
    line = _one_line(ran, "load_crash")
    assert "no-python" in line
    pdir = sp.profile_dir(tiny_model_dir, out)
    assert sp.saved_trials(pdir) == {}  # not a finished trial: skipped by nobody
    assert not (pdir / "cpu.yaml").exists()
    assert procs.trial_logs(pdir) == ["000-vllm-defaults.log"]  # stopped at the baseline
    sp.assert_no_process_left(mark)
    assert _fixed_rerun(tiny_model_dir, out) == {"vllm-defaults": 1, "seqs4": 2}


def test_guard_killed_alone_is_the_environment(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL to the guard only (vLLM itself healthy, orphaned): not CRASHED, not the
    candidate's; vtune stops the orphaned server, stops the search, and the rerun measures the
    baseline again."""
    out, mark = tmp_path / "out", sp.new_mark()
    env = sp.fake_env(mark, FAKE_VLLM_SHM="1")
    search = procs.start(sp.search_argv(tiny_model_dir, out), env, out, tiny_model_dir, "a")
    try:
        search.wait_log("000", "fake vLLM: first request")
        guard = search.guard()
        server = guard.children()  # the fake vLLM, orphaned by the kill below
        assert server
        search.remember()
        guard.send_signal(signal.SIGKILL)
        ran = search.ended(timeout=120)
    finally:
        search.kill()
    line = _one_line(ran, "killed")
    assert "SIGKILL from outside vtune" in line
    procs.assert_gone([*search.remember(), *server])
    sp.assert_no_process_left(mark)
    assert not [p for p in procs.shm_segments(search.pdir) if p.exists()]
    assert sp.saved_trials(search.pdir) == {}
    assert _fixed_rerun(tiny_model_dir, out) == {"vllm-defaults": 1, "seqs4": 2}
