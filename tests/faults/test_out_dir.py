"""Two searches on one ``--out``, started at the same moment: one runs, the other ends at once
with one line and exit 2 (the ``--out`` lock, an flock held for the whole run), and the YAML and
JSON left are one run's pair. And an ``--out`` that cannot be created: one line, exit 2, before
any engine starts."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults import searchproc as sp

pytestmark = pytest.mark.faults


def test_two_searches_on_one_out_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, mark = tmp_path / "out", sp.new_mark()
    env = sp.fake_env(mark)
    argv = sp.search_argv(tiny_model_dir, out)
    logs = [(tmp_path / f"{i}.out", tmp_path / f"{i}.err") for i in range(2)]
    procs = []
    for stdout, stderr in logs:
        with open(stdout, "w") as o, open(stderr, "w") as e:
            procs.append(
                subprocess.Popen(
                    argv, env=env, cwd=sp.ROOT, stdin=subprocess.DEVNULL, stdout=o, stderr=e
                )
            )
    t0 = time.monotonic()
    ended: dict[int, float] = {}
    while len(ended) < 2 and time.monotonic() - t0 < 300:
        for proc in procs:
            if proc.pid not in ended and proc.poll() is not None:
                ended[proc.pid] = time.monotonic() - t0
        time.sleep(0.05)
    for proc in procs:
        proc.wait(timeout=10)
    results = [
        sp.Ran(argv, proc.returncode, o.read_text(), e.read_text())
        for proc, (o, e) in zip(procs, logs, strict=True)
    ]
    sp.assert_no_process_left(mark)
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [r.describe() for r in results]
    winner, loser = (procs[0], procs[1]) if results[0].returncode == 0 else (procs[1], procs[0])
    lost = results[procs.index(loser)]
    line = lost.one_line_error()
    assert re.search(
        rf"another vtune search \(pid {winner.pid}\) is writing the cpu profile in .+; "
        "wait for it to end, or give this search its own --out$",
        line,
    ), line
    assert ended[loser.pid] < ended[winner.pid]  # it did not wait for the other to finish
    pdir = sp.profile_dir(tiny_model_dir, out)
    sp.assert_nothing_half_written(out)
    sp.assert_complete_record(sp.assert_pair_from_one_run(pdir))
    assert len(sp.studies(pdir)) == 1  # one run measured; the other touched nothing


def test_an_out_that_cannot_be_created(tiny_model_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way\n")
    mark = sp.new_mark()
    ran = sp.run(sp.search_argv(tiny_model_dir, blocker / "profiles"), sp.fake_env(mark))
    line = ran.one_line_error()
    assert f"{blocker} is a file, not a directory" in line
    assert ran.stdout == "" and blocker.read_text() == "in the way\n"
    sp.assert_no_process_left(mark)


def test_a_search_that_meets_nothing_leaves_no_profile_to_deploy(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A profile, then a search of the same model into the same --out that meets nothing: the
    old YAML is moved aside (its record is replaced), so ``vtune deploy`` cannot ship it."""
    out, mark = tmp_path / "out", sp.new_mark()
    env = sp.fake_env(mark)
    assert sp.run(sp.search_argv(tiny_model_dir, out), env).returncode == 0
    pdir = sp.profile_dir(tiny_model_dir, out)
    old_yaml = (pdir / "cpu.yaml").read_text()
    impossible = sp.run([*sp.search_argv(tiny_model_dir, out), "--slo", "ttft:p95<1us"], env)
    line = impossible.one_line_error()
    assert "no configuration met the SLO" in line
    assert "the earlier profile is now cpu.yaml.stale, not to be deployed" in line
    assert not (pdir / "cpu.yaml").exists()
    assert (pdir / "cpu.yaml.stale").read_text() == old_yaml
    record = sp.assert_pair_from_one_run(pdir)
    assert record is not None and record["slo"] == "ttft:p95<1us"
    assert record["best"] is None and "profile" not in record  # the record says: no profile
    deploy = sp.run([str(sp.VTUNE), "deploy", str(pdir / "cpu.json")], env)
    assert deploy.one_line_error() and "kind: Deployment" not in deploy.stdout
    sp.assert_no_process_left(mark)
