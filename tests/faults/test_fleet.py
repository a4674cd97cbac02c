"""``vtune search --workers 2``: two workers on one study from one command, on the fake vLLM
process (real processes, real signals, real ports).

- To its end: every candidate measured exactly once across the two workers (one COMPLETE trial
  with its record in the journal study, one trial log and one trial file across both workers'
  directories), the finalists re-measured once (by the parent: no worker has a finalist log),
  one profile and record (nothing a worker wrote is a profile), each worker's label on the
  console, the two workers' vLLM processes on disjoint CPU sets (their affinity and
  ``VLLM_CPU_OMP_THREADS_BIND``, as the fake logs them) and on ports of their own ranges.
- SIGTERM to the parent: it ends with 143 and one line, every worker and every vLLM of theirs
  is gone (the pids seen in its tree, and the marker in their environment), the trials that
  finished are kept in the study and its files, and no profile is written from part of it.
- A worker that ends with exit 2 (vLLM cannot be run): the parent stops the other and ends with
  exit 2 and that worker's one line.

About 70 s on two cores.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults import procs
from tests.faults import searchproc as sp

pytestmark = pytest.mark.faults

CANDIDATES = ("vllm-defaults", "seqs2", "seqs4", "seqs8")
LINE = "vtune: interrupted by SIGTERM; finished trials are saved — rerun the same command to resume"


def _argv(model: Path, out: Path, *extra: str) -> list[str]:
    """Two workers, four candidates (goodput: no calibrated pruning; no early stop: each trial
    is measured whole), one finalist re-run each, relaunched by the parent after the trials
    (``--finalist-runs relaunch``; in-trial re-runs are the workers' own trials')."""
    return [
        *(str(sp.VTUNE), "search", "--model", str(model), "--gpu", "cpu"),
        *("--slo", "ttft:p95<10s", "--objective", "goodput", "--no-early-stop"),
        *("--param", "max_num_seqs=2,4,8", "--input-len", "32", "--output-len", "16"),
        *("--kv-cache-memory-bytes", "2MiB", "--telemetry-period", "1"),  # light loads
        *("--seconds-per-point", "1", "--iterations", "0", "--repeats", "1", "--finalists", "2"),
        *("--finalist-runs", "relaunch"),
        *("--startup-timeout", "60", "--vllm-python", str(sp.FAKE_VLLM_PYTHON)),
        *("--out", str(out), "--workers", "2"),
        *extra,
    ]


def _two_cpus() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two workers need two CPUs")


def _run(argv: list[str], mark: str, out: Path, model: Path) -> tuple[procs.Search, sp.Ran]:
    """Run to the end, remembering every process of the tree as it appears."""
    search = procs.start(argv, sp.fake_env(mark, FAKE_VLLM_STARTUP_S="0.3"), out, model, "fleet")
    try:
        while search.proc.poll() is None:
            search.remember()
            time.sleep(0.1)
        return search, search.ended()
    finally:
        search.kill()


def _study(pdir: Path) -> list[Any]:
    """The trials of the one study in the journal beside the profile."""
    import optuna

    from tuner.search.storage import journal_url, open_storage

    storage = open_storage(journal_url(pdir / "cpu.study.journal"))
    names = [n for n in optuna.study.get_all_study_names(storage) if "/" not in n]
    assert len(names) == 1, names  # the lease's marker study aside
    return optuna.load_study(study_name=names[0], storage=storage).get_trials(deepcopy=False)


def _worker_files(pdir: Path, pattern: str) -> list[Path]:
    return sorted(pdir.glob(f"cpu.workers/w*/*/cpu.study/*/{pattern}"))


def _fake_lines(pdir: Path) -> dict[str, list[tuple[str, str, int]]]:
    """Per worker: (cpus, bind, port) of each fake vLLM it started."""
    found: dict[str, list[tuple[str, str, int]]] = collections.defaultdict(list)
    for log in _worker_files(pdir, "logs/*.log"):
        worker = log.relative_to(pdir).parts[1]
        for m in re.finditer(r"fake vLLM: cpus (\S+) bind (\S+) port (\d+)", log.read_text()):
            found[worker].append((m[1], m[2], int(m[3])))
    return found


def _cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out |= set(range(int(lo), int(hi or lo) + 1))
    return out


def test_two_workers_from_one_command(tiny_model_dir: Path, tmp_path: Path) -> None:
    _two_cpus()
    out, mark = tmp_path / "out", sp.new_mark()
    search, ran = _run(_argv(tiny_model_dir, out), mark, out, tiny_model_dir)
    pdir = search.pdir
    assert ran.returncode == 0, ran.describe()
    assert "Traceback" not in ran.stdout + ran.stderr, ran.describe()
    procs.assert_gone(search.remember())
    sp.assert_no_process_left(mark)
    sp.assert_nothing_half_written(out)

    # The console: where the study lives, and both workers' trials under their labels.
    assert f"study storage: journal file {pdir / 'cpu.study.journal'}" in ran.stdout
    for label in ("w0", "w1"):
        assert re.search(rf"^\[{label}\] trial \d+ \S+: starting vLLM$", ran.stdout, re.M), label
        assert f"[{label}] done: " in ran.stdout, ran.describe()

    # Every candidate measured exactly once across the two workers.
    trials = _study(pdir)
    complete = [t for t in trials if t.state.name == "COMPLETE" and "record" in t.user_attrs]
    assert collections.Counter(t.user_attrs["candidate"] for t in complete) == dict.fromkeys(
        CANDIDATES, 1
    )
    assert not [t.number for t in trials if t.user_attrs.get("stale")]
    labels = {str(t.user_attrs.get("worker")).rpartition("/")[2] for t in complete}
    assert labels <= {"w0", "w1"}, labels
    logs = [p.name for p in _worker_files(pdir, "logs/*.log")]
    assert collections.Counter(n.split("-", 1)[1].removesuffix(".log") for n in logs) == (
        dict.fromkeys(CANDIDATES, 1)
    ), logs
    files = [p.stem for p in _worker_files(pdir, "trials/*.json")]
    assert sorted(files) == sorted(CANDIDATES), files

    # Finalists once, by the parent; one profile and its record, from the whole study.
    assert not [n for n in logs if n.startswith("finalist")], logs
    assert list(pdir.glob("cpu.study/*/logs/finalist*.log")), "the parent re-measured nothing"
    assert [p.relative_to(out) for p in out.rglob("*.yaml")] == [Path(pdir.name, "cpu.yaml")]
    record = sp.assert_pair_from_one_run(pdir)
    assert record is not None
    assert sorted(t["name"] for t in record["trials"]) == sorted(CANDIDATES)
    assert all(t["state"] == "complete" and t["objective"] > 0 for t in record["trials"])

    # Each worker's vLLM on its own CPUs (affinity and OpenMP binding) and its own ports.
    fakes = _fake_lines(pdir)
    assert set(fakes) == {"w0", "w1"}, fakes
    sets = {w: {frozenset(_cpus(c)) for c, _, _ in lines} for w, lines in fakes.items()}
    assert all(len(s) == 1 for s in sets.values()), sets  # one set per worker, every trial
    (w0,), (w1,) = sets["w0"], sets["w1"]
    assert w0 and w1 and not w0 & w1, sets
    for lines in fakes.values():
        assert all(_cpus(bind) == _cpus(cpus) for cpus, bind, _ in lines), lines
    ports = {w: {p for _, _, p in lines} for w, lines in fakes.items()}
    assert all(28000 <= p < 28100 for p in ports["w0"]), ports
    assert all(28100 <= p < 28200 for p in ports["w1"]), ports


def test_sigterm_to_the_parent_stops_every_worker(tiny_model_dir: Path, tmp_path: Path) -> None:
    _two_cpus()
    out, mark = tmp_path / "out", sp.new_mark()
    env = sp.fake_env(mark, FAKE_VLLM_STARTUP_S="0.3")
    search = procs.start(_argv(tiny_model_dir, out), env, out, tiny_model_dir, "fleet")
    pdir = search.pdir
    try:
        deadline = time.monotonic() + 120
        while not _worker_files(pdir, "trials/*.json") and time.monotonic() < deadline:
            assert search.proc.poll() is None, search.ended().describe()
            search.remember()
            time.sleep(0.1)
        finished = {p.stem for p in _worker_files(pdir, "trials/*.json")}
        assert finished, "no trial finished within 120 s"
        ran, took = search.signal(signal.SIGTERM, timeout=90)
    finally:
        search.kill()
    assert ran.returncode == 128 + signal.SIGTERM, ran.describe()
    assert ran.stderr.splitlines().count(LINE) == 1, ran.describe()  # the parent's, once
    assert "Traceback" not in ran.stdout + ran.stderr, ran.describe()
    procs.assert_gone(search.remember())
    sp.assert_no_process_left(mark)
    sp.assert_nothing_half_written(out, killed=True)
    print(f"ended {took:.1f} s after SIGTERM")

    # What finished is kept, in the study and its files; no profile from part of the study.
    kept = {p.stem for p in _worker_files(pdir, "trials/*.json")}
    assert finished <= kept
    done = {
        t.user_attrs["candidate"]
        for t in _study(pdir)
        if t.state.name == "COMPLETE" and "record" in t.user_attrs
    }
    assert kept == done, (kept, done)
    assert not (pdir / "cpu.yaml").exists() and not (pdir / "cpu.json").exists()


def test_a_worker_that_fails_ends_the_search_in_one_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    _two_cpus()
    out, mark = tmp_path / "out", sp.new_mark()
    argv = _argv(tiny_model_dir, out)
    argv[argv.index("--vllm-python") + 1] = str(tmp_path / "no-such-python")
    search, ran = _run(argv, mark, out, tiny_model_dir)
    line = ran.one_line_error()
    assert re.match(r"vtune: error: worker w[01]: the environment failed", line), line
    assert "no-such-python" in line
    procs.assert_gone(search.remember())
    sp.assert_no_process_left(mark)
    assert not (search.pdir / "cpu.yaml").exists()
