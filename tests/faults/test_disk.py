"""ENOSPC on ``--out``: a search whose output directory is a small tmpfs that fills up after its
first trial is saved (tests/faults/tmpfs_driver.py, in a user and mount namespace). Wanted: one
line and exit 2 (no traceback), nothing half-written, the trial being saved not left RUNNING
where the study can still be written, and a rerun with space resumes: the trial saved before the
disk filled is not measured again, every candidate ends up measured exactly once.

Two layouts: the study database in ``--out`` (the default: SQLite fails too) and on another
disk (``--storage``, as a database server would be: only the trial files fail).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults import searchproc as sp

pytestmark = pytest.mark.faults

DRIVER = Path(__file__).with_name("tmpfs_driver.py")


def _unshare() -> str:
    path = shutil.which("unshare")
    if path is None:
        pytest.fail("unshare (util-linux) is not installed", pytrace=False)
    return path


# When the disk fills: right after the first trial is saved (the second one is starting), or
# while the second one is under load (its server is up), so that saving it fails.
FILL_WHEN = {
    "first-saved": {"glob": "*/cpu.study/*/trials/*.json", "text": ""},
    "second-measured": {"glob": "*/cpu.study/*/logs/001-*.log", "text": "KV cache size"},
}


def _full_disk_run(
    out: Path, results: Path, argv: list[str], env: dict[str, str], when: str
) -> sp.Ran:
    out.mkdir()
    results.mkdir()
    spec = results.parent / f"{results.name}.json"
    spec.write_text(
        json.dumps(
            {
                "out": str(out),
                "size": "32m",
                "argv": argv,
                "results": str(results),
                "fill_when": FILL_WHEN[when],
            }
        )
    )
    driver = subprocess.run(
        [_unshare(), "-rm", sys.executable, str(DRIVER), str(spec)],
        env=env,
        cwd=sp.ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert driver.returncode == 0, driver.stderr[-3000:]
    state = json.loads((results / "driver.json").read_text())
    assert state["filled"] == 1 and state["filler_bytes"] > 0, state  # it filled, one trial in
    return sp.Ran(
        argv,
        state["returncode"],
        (results / "stdout").read_text(),
        (results / "stderr").read_text(),
    )


@pytest.mark.parametrize("when", sorted(FILL_WHEN))
@pytest.mark.parametrize("study_on", ["out", "other-disk"])
def test_a_full_disk_is_one_line_and_the_rerun_resumes(
    tiny_model_dir: Path, tmp_path: Path, study_on: str, when: str
) -> None:
    mark = sp.new_mark()
    env = sp.fake_env(mark)
    out, results = tmp_path / "out", tmp_path / "results"
    extra = []
    db = sp.profile_dir(tiny_model_dir, out) / "cpu.study.db"
    if study_on == "other-disk":
        db = tmp_path / "study.db"
        extra = ["--storage", f"sqlite:///{db}"]
    argv = sp.search_argv(tiny_model_dir, out, *extra)

    ran = _full_disk_run(out, results, argv, env, when)
    sp.assert_no_process_left(mark)
    line = ran.one_line_error()
    assert "finished trials are kept" in line, line
    assert "No space left on device" in line or "disk is full" in line, line
    if when == "second-measured" and study_on == "other-disk":  # only the trial file failed
        assert "cannot save trial seqs4 in " in line, line

    # What the full disk left (copied out of the tmpfs): whole files only, the first trial kept.
    left = results / "out"
    sp.assert_nothing_half_written(left)
    pdir = sp.profile_dir(tiny_model_dir, left)
    before = sp.saved_trials(pdir)
    assert len(before) == 1, sorted(before)
    assert sp.assert_pair_from_one_run(pdir) is None  # no record, no profile: not finished
    if study_on == "other-disk":  # the study was writable: the trial being saved is not RUNNING
        assert sp.running_trials(db) == []

    # The rerun, with space, on the same directory (the tmpfs is gone with its namespace).
    assert not any(out.iterdir())
    shutil.copytree(left, out, dirs_exist_ok=True)
    rerun = sp.run(argv, env)
    assert rerun.returncode == 0, rerun.describe()
    sp.assert_no_process_left(mark)
    pdir = sp.profile_dir(tiny_model_dir, out)
    sp.assert_nothing_half_written(out)
    trials = sp.assert_complete_record(sp.assert_pair_from_one_run(pdir))
    for name, saved in before.items():  # saved before the disk filled: not measured again
        assert trials[name]["started_at"] == saved["started_at"], name
        assert trials[name]["number"] == saved["number"], name
    assert sp.running_trials(db) == []
