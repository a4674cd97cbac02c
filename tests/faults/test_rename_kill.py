"""SIGKILL at each rename: every file vtune writes goes through a temporary file and a rename,
so a kill at any rename must leave the old file or the new one, and a rerun must lose nothing
finished and measure nothing twice.

Debian's strace delivers SIGKILL on entering the N-th rename (``-e inject=...:signal=SIGKILL:
when=N``; counted per thread, and vtune renames from its main thread), so renames 1..N-1 are
done and the N-th is not. For N = 1, 2, ... until a run is not killed: after each killed run, a
rerun without strace must end with every candidate exactly once, each trial saved before the
kill not measured again (same ``started_at`` and number), each finalist's saved samples kept,
the YAML and JSON from one run, nothing half-written, and no process left. The same again for
a second search over an existing profile (the old YAML is moved aside before its record is
replaced), killed at each rename of its write-out.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.faults import searchproc as sp

pytestmark = pytest.mark.faults

MAX_RENAMES = 20  # far more than a two-candidate search makes: a run that never ends fails


def _strace() -> str:
    path = shutil.which("strace")
    if path is None:
        pytest.fail("strace is not installed: make system-packages", pytrace=False)
    return path


def _killed_at(n: int, argv: list[str]) -> list[str]:
    calls = "rename,renameat,renameat2"
    # Not -f: vtune renames from its main thread (the one strace starts with), and untraced
    # children (the guard, the fake vLLM) run at full speed. (--seccomp-bpf would speed up -f,
    # but strace 6.1 then injects nothing.)
    return [
        _strace(),
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        f"trace={calls}",
        "-e",
        f"inject={calls}:signal=SIGKILL:when={n}",
        *argv,
    ]


def _was_killed(ran: sp.Ran) -> bool:
    # strace exits with the tracee's status: 128 + 9 for a SIGKILL (or -9 through a shell).
    return ran.returncode in (137, -9)


def _check_rerun(
    pdir: Path,
    before: dict[str, dict[str, Any]],
    samples_before: dict[str, list[float]],
    rerun: sp.Ran,
) -> None:
    assert rerun.returncode == 0, rerun.describe()
    sp.assert_nothing_half_written(pdir)
    record = sp.assert_pair_from_one_run(pdir)
    trials = sp.assert_complete_record(record)
    assert (pdir / "cpu.yaml").exists()
    for name, saved in before.items():  # finished before the kill: kept, not measured again
        assert trials[name]["started_at"] == saved["started_at"], name
        assert trials[name]["number"] == saved["number"], name
    assert record is not None
    finalists = {f["name"]: f["samples"] for f in record["finalists"]}
    for name, samples in samples_before.items():
        assert finalists[name] == samples, name


def test_sigkill_at_each_rename_of_a_search(tiny_model_dir: Path, tmp_path: Path) -> None:
    mark = sp.new_mark()
    env = sp.fake_env(mark)
    killed = 0
    for n in range(1, MAX_RENAMES + 1):
        out = tmp_path / f"kill-{n}"
        pdir = sp.profile_dir(tiny_model_dir, out)
        argv = sp.search_argv(tiny_model_dir, out)
        ran = sp.run(_killed_at(n, argv), env)
        sp.assert_no_process_left(mark)  # the guard took the fake vLLM down with vtune
        if not _was_killed(ran):
            assert ran.returncode == 0, ran.describe()
            sp.assert_complete_record(sp.assert_pair_from_one_run(pdir))
            break
        killed += 1
        sp.assert_nothing_half_written(out, killed=True)
        sp.assert_pair_from_one_run(pdir)
        before, samples = sp.saved_trials(pdir), sp.saved_samples(pdir)
        _check_rerun(pdir, before, samples, sp.run(argv, env))
        sp.assert_no_process_left(mark)
    else:
        pytest.fail(f"the search was still killed at rename {MAX_RENAMES}")
    # Two trials and two finalists' samples, then the record and the profile: six renames.
    assert killed >= 6, killed


def test_sigkill_at_each_rename_of_a_second_search_over_a_profile(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A finished profile, then a search of another study (another SLO) into the same --out,
    killed at each rename of its write-out: never a YAML beside a record of another run."""
    mark = sp.new_mark()
    env = sp.fake_env(mark)
    first = tmp_path / "first"
    assert sp.run(sp.search_argv(tiny_model_dir, first), env).returncode == 0
    # The second search renames: 2 trials, 2 finalists' samples, the old YAML aside, the JSON,
    # the new YAML. Kill it at the last three, each time on a copy of the first one's --out.
    for n in (5, 6, 7):
        out = tmp_path / f"second-{n}"
        shutil.copytree(first, out)
        argv = [*sp.search_argv(tiny_model_dir, out), "--slo", "ttft:p95<2s"]  # the last wins
        ran = sp.run(_killed_at(n, argv), env)
        assert _was_killed(ran), ran.describe()
        sp.assert_no_process_left(mark)
        pdir = sp.profile_dir(tiny_model_dir, out)
        sp.assert_nothing_half_written(out, killed=True)
        sp.assert_pair_from_one_run(pdir)
        if n >= 6:  # the old YAML was moved aside before its record was replaced
            assert not (pdir / "cpu.yaml").exists() and (pdir / "cpu.yaml.stale").exists()
        old = sp.studies(sp.profile_dir(tiny_model_dir, first))  # the first search's study
        before, samples = sp.saved_trials(pdir, old), sp.saved_samples(pdir, old)
        rerun = sp.run(argv, env)
        _check_rerun(pdir, before, samples, rerun)
        assert not (pdir / "cpu.yaml.stale").exists()  # confirmed by the new run: dropped
        record = sp.assert_pair_from_one_run(pdir)
        assert record is not None and record["slo"] == "ttft:p95<2s"
        sp.assert_no_process_left(mark)
