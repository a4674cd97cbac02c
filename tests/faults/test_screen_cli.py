"""A real ``vtune search --screen`` on the fake vLLM process: the screen phase is printed, its
one launch measures every rung of the max_num_seqs ladder, the loser it prunes is never
launched, the record carries the ``screen`` block, and a rerun measures nothing again (the
screen is read back). About 20 s on two cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults import searchproc as sp

pytestmark = pytest.mark.faults


def _argv(model: Path, out: Path) -> list[str]:
    argv = sp.search_argv(model, out, "--screen", "--repeats", "0", "--finalists", "0")
    i = argv.index("max_num_seqs=4")
    argv[i] = "max_num_seqs=2,4,16"
    return [*argv, "--input-len", "16", "--output-len", "16"]


def test_a_search_with_screen_prints_and_records_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, mark = tmp_path / "out", sp.new_mark()
    # 10 ms a token: two requests in flight make ~200 tok/s, sixteen ~1,600; the fake's
    # default max_num_seqs (128) never slows the screen's launch down.
    env = sp.fake_env(mark, FAKE_VLLM_TOKEN_S="0.01")
    ran = sp.run(_argv(tiny_model_dir, out), env)
    sp.assert_no_process_left(mark)
    assert ran.returncode == 0, ran.describe()
    shown = ran.stdout + ran.stderr
    assert "screen: vllm-defaults: 128, 16, 4, 2 in flight, one launch" in shown, ran.describe()
    assert "points in" in shown and "pruned" in shown

    pdir = sp.profile_dir(tiny_model_dir, out)
    sp.assert_nothing_half_written(out)
    record = sp.assert_pair_from_one_run(pdir)
    assert record is not None
    screen = record["screen"]
    assert screen["launch"] == "vllm-defaults" and screen["order"] == "largest first"
    assert [r["concurrency"] for r in screen["results"]] == [128, 16, 4, 2]
    assert screen["engine_time_s"] > 0 and screen["failure"] is None
    # ~200 tok/s cannot reach what 16 in flight (~1,600) or more delivered under the SLO.
    assert "seqs2" in screen["pruned"]
    trials = {t["name"] for t in record["trials"]}
    assert "vllm-defaults" in trials and not trials & set(screen["pruned"])  # never launched
    pruned = {p["name"]: p for p in record["plan"]["pruned"] if p["rule"] == "screened"}
    assert set(pruned) == set(screen["pruned"])
    ruled_out = {p["name"] for p in record["plan"]["pruned"]}
    assert trials | ruled_out == {"vllm-defaults", "seqs2", "seqs4", "seqs16"}
    assert "screened capacity" in pruned["seqs2"]["reason"]
    logs = sorted(p.name for p in pdir.glob("cpu.study/*/logs/screen-*.log"))
    assert logs == ["screen-vllm-defaults.log"]  # one launch
    saved = list(pdir.glob("cpu.study/*/screen/vllm-defaults.json"))
    assert len(saved) == 1

    # The rerun finds every trial and the screen saved: it launches nothing.
    before = saved[0].read_text()
    again = sp.run(_argv(tiny_model_dir, out), env)
    sp.assert_no_process_left(mark)
    assert again.returncode == 0, again.describe()
    assert saved[0].read_text() == before
    assert "one launch" not in again.stdout + again.stderr  # not measured again
    rerecord = json.loads((pdir / "cpu.json").read_text())
    assert rerecord["screen"]["results"] == screen["results"]
    assert {t["name"] for t in rerecord["trials"]} == trials
