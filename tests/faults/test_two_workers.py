"""Two ``vtune search`` workers on ONE study (one SQLite file, the same command, each its own
``--out``), on the fake vLLM process: started at random offsets, and with one worker's clock
skewed by ``faketime`` (Debian's libfaketime: ``time.time()``, ``time.monotonic()``, SQLite's
``CURRENT_TIMESTAMP`` and Optuna's timestamps in that process and its children all move).

Worker b runs as on another machine (its own UTS namespace, hostname ``vtune-worker-b``), so
both work from the start; in the first repetition it shares a's hostname, and then it first
watches a's live trial for a grace period (``fail_stale``'s settle: that trial might be a dead
run's of this host) and must leave it alone.

Each case proves: both workers exit 0; every candidate is measured exactly once across the two
(one COMPLETE trial holds its record in the study, one trial log exists across both ``--out``
directories), the baseline included; one worker writes the record and profile (the study's
lease), the other says so, and the record holds every candidate, measured (a worker with
nothing left to ask waits for what the other still measures instead of ending with part of the
study); no trial was failed as stale (both workers lived throughout: a stale
mark means one took the other's live trial for a dead one); nothing half-written; no process
left behind. ``--objective goodput``: the calibrated pruning rule (throughput only) would leave
candidates out depending on which worker measured what first.

The offsets come from a seed printed with each case (``-s`` shows it; a failure's message
repeats it): rerun a failure with ``VTUNE_TWO_WORKERS_SEED=<seed>``. About 2.5 min on 2 cores.
"""

from __future__ import annotations

import collections
import functools
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults import procs
from tests.faults import searchproc as sp

pytestmark = pytest.mark.faults

CANDIDATES = {"vllm-defaults", "seqs2", "seqs4", "seqs8", "seqs16"}
FAKETIME = shutil.which("faketime")
OTHER_HOST = "vtune-worker-b"


def _argv(model: Path, out: Path, db: Path) -> list[str]:
    """One worker: the same study as the other (model, space, SLO, objective, workload,
    storage), its own ``--out``; short points, no finalist re-runs (they are per worker)."""
    return [
        str(sp.VTUNE),
        "search",
        "--model",
        str(model),
        "--gpu",
        "cpu",
        "--slo",
        "ttft:p95<1s",
        "--objective",
        "goodput",
        "--param",
        "max_num_seqs=2,4,8,16",
        "--seconds-per-point",
        "1",
        "--iterations",
        "1",
        "--repeats",
        "0",
        "--finalists",
        "1",
        "--startup-timeout",
        "60",
        "--storage",
        f"sqlite:///{db}",
        "--vllm-python",
        str(sp.FAKE_VLLM_PYTHON),
        "--out",
        str(out),
    ]


@functools.cache
def _own_hostname_works() -> bool:
    """Whether this user may give a process its own hostname (``unshare -u``: root)."""
    try:
        ran = subprocess.run(["unshare", "-u", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ran.returncode == 0


def _prefix(other_host: bool, skew: str | None) -> list[str]:
    """What worker b runs under: its own hostname, then ``faketime``."""
    prefix: list[str] = []
    if other_host:
        if not _own_hostname_works():
            pytest.skip("unshare -u (a hostname of its own) needs root")
        script = 'hostname "$0" && exec "$@"'
        prefix += ["unshare", "-u", "sh", "-c", script, OTHER_HOST]
    if skew:
        if FAKETIME is None:
            pytest.fail("faketime is not installed: make system-packages", pytrace=False)
        prefix += [FAKETIME, "-f", skew]
    return prefix


def _two_workers(
    model: Path, tmp: Path, offset_s: float, prefix: list[str], note: str
) -> tuple[list[procs.Search], list[sp.Ran], Path]:
    """Start worker a, then worker b ``offset_s`` later under ``prefix``; wait for both;
    check that nothing of either is left running; returns them, how they ended, the study."""
    db, mark = tmp / "shared.db", sp.new_mark()
    env = sp.fake_env(mark, FAKE_VLLM_STARTUP_S="1")
    a_out, b_out = tmp / "a", tmp / "b"
    searches: list[procs.Search] = []
    try:
        searches.append(procs.start(_argv(model, a_out, db), env, a_out, model, "a"))
        deadline = time.monotonic() + offset_s
        while time.monotonic() < deadline:
            searches[0].remember()
            time.sleep(0.05)
        assert searches[0].proc.poll() is None, f"{note}: a ended before b started"
        argv = [*prefix, *_argv(model, b_out, db)]
        searches.append(procs.start(argv, env, b_out, model, "b"))
        ended = []
        for search in searches:
            ended.append(search.ended(timeout=240))
    finally:
        for search in searches:
            search.kill()
    for search in searches:
        procs.assert_gone(search.remember())
    sp.assert_no_process_left(mark)
    return searches, ended, db


def _study_trials(db: Path) -> list[Any]:
    import optuna

    url = f"sqlite:///{db}"
    names = [n for n in optuna.study.get_all_study_names(url) if not n.endswith("/profile-lease")]
    assert len(names) == 1, names  # one command, one study: both workers shared it
    return optuna.load_study(study_name=names[0], storage=url).get_trials(deepcopy=False)


def _check(searches: list[procs.Search], ended: list[sp.Ran], db: Path, note: str) -> None:
    import optuna

    trials = _study_trials(db)
    hosts = {t.user_attrs.get("worker_id"): t.user_attrs.get("worker") for t in trials}
    table = "\n".join(
        f"  #{t.number} {t.state.name} {t.user_attrs.get('candidate')} "
        f"on {t.user_attrs.get('worker')}:{str(t.user_attrs.get('worker_id'))[:8]} "
        f"{sorted(k for k in t.user_attrs if k not in ('record', 'knobs', 'candidate'))}"
        for t in trials
    )
    print(f"study ({len(hosts)} workers):\n{table}")
    context = f"{note}\nstudy:\n{table}\n" + "\n".join(r.describe() for r in ended)
    for ran in ended:
        assert ran.returncode == 0, context
        assert "Traceback" not in ran.stdout + ran.stderr, context

    # No live trial was taken for a dead one; nothing is left running or cut short.
    assert not [t.number for t in trials if t.user_attrs.get("stale")], context
    assert not [t.number for t in trials if t.user_attrs.get("interrupted")], context
    assert not [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING], context

    # Every candidate measured exactly once across both workers: one COMPLETE trial holding
    # its record, one trial log in either --out, no failed measurement.
    complete = optuna.trial.TrialState.COMPLETE
    with_record = [t for t in trials if "record" in t.user_attrs]
    measured = [t.user_attrs["candidate"] for t in with_record if t.state == complete]
    assert collections.Counter(measured) == dict.fromkeys(CANDIDATES, 1), context
    assert all(t.state == complete for t in with_record), context
    logs = [name for s in searches for name in procs.trial_logs(s.pdir)]
    by_candidate = collections.Counter(name.split("-", 1)[1].removesuffix(".log") for name in logs)
    assert by_candidate == dict.fromkeys(CANDIDATES, 1), f"{logs}\n{context}"

    # One worker writes the record and profile (the lease in the study: tuner.search.lease),
    # from the whole study, every candidate measured; the other says so and writes neither.
    writers = [s for s in searches if (s.pdir / "cpu.json").exists()]
    assert len(writers) == 1, context
    for search, ran in zip(searches, ended, strict=True):
        sp.assert_nothing_half_written(search.out)
        if search not in writers:
            assert "profile written by another worker" in ran.stderr, context
            continue
        record = sp.assert_pair_from_one_run(search.pdir)
        assert record is not None and (search.pdir / "cpu.yaml").exists(), context
        names = sorted(t["name"] for t in record["trials"])
        assert names == sorted(CANDIDATES), f"{search.out.name}: {names}\n{context}"
        for trial in record["trials"]:
            assert trial["state"] == "complete" and trial["objective"] > 0, (trial, context)


def _offset() -> tuple[int, float]:
    """A seed (``VTUNE_TWO_WORKERS_SEED``, else a random one) and the offset it draws."""
    seed = int(os.environ.get("VTUNE_TWO_WORKERS_SEED") or random.SystemRandom().randrange(1 << 30))
    return seed, random.Random(seed).uniform(0.0, 3.0)


@pytest.mark.parametrize("repetition", range(3))
def test_two_workers_started_at_random_offsets(
    tiny_model_dir: Path, tmp_path: Path, repetition: int
) -> None:
    other_host = repetition > 0
    seed, offset = _offset()
    where = "another host" if other_host else "the same host"
    note = f"repetition {repetition}: b on {where}, seed {seed}, started {offset:.2f} s after a"
    print(note)
    prefix = _prefix(other_host, None)
    searches, ended, db = _two_workers(tiny_model_dir, tmp_path, offset, prefix, note)
    _check(searches, ended, db, note)


@pytest.mark.parametrize("skew", ["+120s", "-120s"])
def test_two_workers_with_one_clock_skewed(tiny_model_dir: Path, tmp_path: Path, skew: str) -> None:
    """Worker b (another host) has its clock two minutes ahead or behind: four grace periods.
    Ahead, it used to take a's live trials for dead ones; behind, a took b's."""
    prefix = _prefix(True, skew)
    python = str(sp.VTUNE.with_name("python"))
    probe = sp.run([*prefix, python, "-c", "import time; print(time.time())"], dict(os.environ))
    seen = float(probe.stdout.strip()) - time.time()
    assert abs(seen - float(skew.removesuffix("s"))) < 30, probe.describe()  # really skewed
    seed, offset = _offset()
    note = f"b on another host under faketime {skew}: seed {seed}, started {offset:.2f} s after a"
    print(note)
    searches, ended, db = _two_workers(tiny_model_dir, tmp_path, offset, prefix, note)
    _check(searches, ended, db, note)
