"""Does ``vtune search --workers N`` scale, and does it survive a worker killed at any moment?

    .venv/bin/python benchmarks/workers_scaling.py [--workers 1,2,4] [--candidates N]
        [--kill-runs 20] [--seed S] [--out DIR]

Runs on the fake vLLM process (``tests/fake_vllm_process.py``): every trial costs fixed time
(``FAKE_VLLM_STARTUP_S=0.5``, one load point of ``--seconds-per-point 2``, slow light tokens),
and the engine mostly sleeps, so four workers scale even on two CPU cores (more workers than
CPUs: ``--devices 0,1,0,1``, each CPU shared by two workers).

Scaling: one search of ``--candidates`` candidates (vLLM's defaults and max_num_seqs 1, 2, ...)
with 1, 2 and 4 workers, each from scratch; prints the wall times and the speed-ups side by side
with linear, and where each wall time went: until the workers' first trials start (the processes'
fixed cost: Python, imports, the study), the trial phase, and after the last trial (the children
ending, the parent's final run, the report). Target: at least 0.9 x linear at 4 workers. The
default 48 candidates (12 trials per worker at 4 workers) take about 6 minutes for the three.

``--kill-runs N`` (no scaling runs then): N runs of the 4-worker search, each SIGKILLs one worker
drawn at random at a random moment of its trial phase (the others take over its trial once its
heartbeat has stood still for the grace period), lets the search end, then reruns the same
command to its end. Each run checks: no candidate measured twice (one trial file across the
workers' directories and one COMPLETE trial holding its record in the study, per candidate),
every candidate measured in the end (the record beside the profile), no process left behind
(a marker in the environment of everything the runs start). Prints one line per run and a
summary line. 16 candidates unless ``--candidates``; about one minute per run on two cores.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults.searchproc import MARK, marked_processes  # noqa: E402

VTUNE = Path(sys.executable).with_name("vtune")
FAKE = ROOT / "tests" / "bin" / "fake-vllm-python"
FAKE_ENV = {
    "FAKE_VLLM_STARTUP_S": "0.5",
    "FAKE_VLLM_TTFT_S": "0.05",
    "FAKE_VLLM_TOKEN_S": "0.05",  # slow tokens: few events per second, the CPUs stay idle
}


def argv(model: Path, out: Path, candidates: int, workers: int) -> list[str]:
    """The search: ``candidates`` candidates, one 2-second point each, SLO always met. The KV
    cache holds 16 sequences per 2 MiB: room for every max_num_seqs asked (one it could not
    hold would be pruned as the same as a smaller one)."""
    seqs = ",".join(str(n) for n in range(1, candidates))
    kv_mib = 2 * max(1, -(-candidates // 16))
    cmd = [
        *(str(VTUNE), "search", "--model", str(model), "--gpu", "cpu"),
        *("--slo", "ttft:p95<30s", "--objective", "goodput", "--no-early-stop"),
        *("--param", f"max_num_seqs={seqs}", "--input-len", "16", "--output-len", "8"),
        *("--kv-cache-memory-bytes", f"{kv_mib}MiB", "--telemetry-period", "1"),
        *("--seconds-per-point", "2", "--iterations", "0", "--repeats", "0", "--finalists", "1"),
        *("--startup-timeout", "60", "--vllm-python", str(FAKE), "--out", str(out)),
    ]
    if workers > 1:
        cpus = sorted(os.sched_getaffinity(0))
        if workers <= len(cpus):
            cmd += ["--workers", str(workers)]
        else:  # more workers than CPUs: each CPU shared, in turn
            cmd += ["--devices", ",".join(str(cpus[i % len(cpus)]) for i in range(workers))]
    return cmd


def env(mark: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(FAKE_ENV, FAKE_VLLM_PYTHON=sys.executable, PYTHONUNBUFFERED="1", COLUMNS="120")
    out[MARK] = mark
    out.pop("VLLM_API_KEY", None)
    return out


def tiny_model(root: Path) -> Path:
    from tuner.tiny import build_tiny_model

    return build_tiny_model(root / "tiny-model")


@dataclass
class Ran:
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    lines: list[tuple[float, str]]  # stdout lines with their time (seconds after the start)
    started: float  # time.time() at the start


def run(
    cmd: list[str], mark: str, log: Path, kill: tuple[float, random.Random] | None = None
) -> Ran:
    """Run ``cmd`` to its end (output in ``log``.out/.err, stdout lines timed as they come).
    With ``kill`` (seconds, rng): that long after the first trial starts, SIGKILL one worker
    drawn at random."""
    lines: list[tuple[float, str]] = []
    started, t0 = time.time(), time.monotonic()
    with open(log.with_suffix(".err"), "wb") as se:
        proc = subprocess.Popen(cmd, env=env(mark), cwd=ROOT, stdout=subprocess.PIPE, stderr=se)
    log.with_suffix(".out").touch()  # there before _kill_one reads it (the pump opens it)
    pump = threading.Thread(target=_pump, args=(proc, log.with_suffix(".out"), t0, lines))
    pump.start()
    killed = ""
    if kill is not None:
        killed = _kill_one(proc, log.with_suffix(".out"), *kill)
    proc.wait(timeout=900)
    seconds = time.monotonic() - t0
    pump.join()
    out = log.with_suffix(".out").read_text(errors="replace")
    err = log.with_suffix(".err").read_text(errors="replace")
    if killed:
        err = f"{killed}\n{err}"
    return Ran(proc.returncode, seconds, out, err, lines, started)


def _pump(
    proc: subprocess.Popen[bytes], path: Path, t0: float, lines: list[tuple[float, str]]
) -> None:
    """Copy ``proc``'s stdout to ``path`` line by line (flushed: _kill_one reads it), noting
    when each line came."""
    assert proc.stdout is not None
    with open(path, "wb") as so:
        for raw in iter(proc.stdout.readline, b""):
            lines.append((time.monotonic() - t0, raw.decode(errors="replace").rstrip("\n")))
            so.write(raw)
            so.flush()


def _kill_one(proc: subprocess.Popen[bytes], out: Path, after_s: float, rng: random.Random) -> str:
    """Wait for the first trial to start, then ``after_s`` more; SIGKILL one worker (by pid,
    a child of ``proc`` running ``--fleet-worker``); returns what was killed."""
    import psutil

    deadline = time.monotonic() + 120
    while "starting vLLM" not in out.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            return "kill: the search ended before any trial"
        time.sleep(0.05)
    time.sleep(after_s)
    workers = []
    for child in psutil.Process(proc.pid).children():
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if "--fleet-worker" in cmdline:
            workers.append((cmdline[cmdline.index("--fleet-worker") + 1], child))
    if not workers:
        return "kill: no worker left to kill"
    label, victim = rng.choice(sorted(workers, key=lambda w: w[0]))
    text = out.read_text(errors="replace")
    started = len(re.findall(rf"^\[{label}\] trial .*starting vLLM$", text, re.M))
    ended = len(re.findall(rf"^\[{label}\] trial .*: (complete|failed|pruned)", text, re.M))
    victim.send_signal(signal.SIGKILL)
    where = "mid-trial" if started > ended else "between trials"
    return f"killed {label} (pid {victim.pid}) {after_s:.1f} s into its trials, {where}"


def leftovers(mark: str, grace_s: float = 20.0) -> list[str]:
    deadline = time.monotonic() + grace_s
    left = marked_processes(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = marked_processes(mark)
    return left


def candidates(n: int) -> list[str]:
    return ["vllm-defaults", *(f"seqs{i}" for i in range(1, n))]


def measurements(pdir: Path) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Per candidate: trial files across the workers' directories (one per finished
    measurement), and COMPLETE trials holding a record in the study."""
    import optuna

    from tuner.search.storage import journal_url, open_storage

    files = collections.Counter(p.stem for p in pdir.glob("cpu.workers/*/*/cpu.study/*/trials/*"))
    storage = open_storage(journal_url(pdir / "cpu.study.journal"))
    names = [n for n in optuna.study.get_all_study_names(storage) if "/" not in n]
    study = optuna.load_study(study_name=names[0], storage=storage)
    done = collections.Counter(
        str(t.user_attrs.get("candidate"))
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE" and "record" in t.user_attrs
    )
    return files, done


def trial_times(pdir: Path) -> tuple[list[float], list[float]]:
    """Engine seconds of each worker's first trial, and of the other trials."""
    by_worker: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
    for path in _trial_files(pdir):
        data = json.loads(path.read_text())
        worker = path.relative_to(pdir).parts[1] if "cpu.workers" in path.parts else "-"
        by_worker[worker].append((data["started_at"], float(data["engine_time_s"])))
    firsts, others = [], []
    for trials in by_worker.values():
        trials.sort()
        firsts.append(trials[0][1])
        others += [t for _, t in trials[1:]]
    return firsts, others or [0.0]


_TRIAL_LINE = re.compile(  # "[w0] trial 3 seqs5: starting vLLM", "  trial 0 x: complete, ..."
    r"^(?:\[(?P<w>w\d+)\] )?\s*trial \d+ (?P<name>\S+): "
    r"(?P<what>starting vLLM|complete|failed|pruned)"
)


def phases(ran: Ran, pdir: Path) -> tuple[float, float, float]:
    """Where ``ran``'s wall time went: until the workers' first trials started (median over
    the workers: each process's fixed cost), the trial phase (the first trial's start to the
    last trial's end), after the last trial (to the command's end). A fleet's workers print a
    line as each trial starts and ends (timed here); one worker's progress display does not,
    so its trials' records give the times (``started_at``/``finished_at``: whole seconds)."""
    starts: dict[str, list[float]] = collections.defaultdict(list)
    ends: list[float] = []
    for at, line in ran.lines:
        m = _TRIAL_LINE.match(line)
        if m is not None and m["w"]:
            (starts[m["w"]] if m["what"] == "starting vLLM" else ends).append(at)
    if not ends:
        for path in _trial_files(pdir):
            data = json.loads(path.read_text())
            worker = path.relative_to(pdir).parts[1] if "cpu.workers" in path.parts else "-"
            starts[worker].append(_stamp(data["started_at"]) - ran.started)
            ends.append(_stamp(data["finished_at"]) - ran.started)
    if not ends:
        return float("nan"), float("nan"), float("nan")
    firsts = [min(s) for s in starts.values() if s]
    return statistics.median(firsts), max(ends) - min(firsts), ran.seconds - max(ends)


def _stamp(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()


def _trial_files(pdir: Path) -> list[Path]:
    return list(pdir.glob("**/cpu.study/*/trials/*.json"))


def scaling(model: Path, root: Path, workers: list[int], n: int) -> None:
    print(f"{n} candidates, one 2 s point each, fake vLLM start-up 0.5 s")
    times: dict[int, float] = {}
    engine: dict[int, tuple[list[float], list[float]]] = {}
    split: dict[int, tuple[float, float, float]] = {}
    for w in workers:
        out = root / f"scale-{w}"
        shutil.rmtree(out, ignore_errors=True)
        mark = os.urandom(8).hex()
        ran = run(argv(model, out, n, w), mark, root / f"scale-{w}")
        if ran.returncode != 0:
            raise SystemExit(f"{w} workers: exit {ran.returncode}\n{ran.stderr[-2000:]}")
        left = leftovers(mark)
        assert not left, left
        times[w] = ran.seconds
        engine[w] = trial_times(out / "tiny-model")
        split[w] = phases(ran, out / "tiny-model")
        trials = len(_trial_files(out / "tiny-model"))  # a pruned candidate is not measured
        print(
            f"  {w} worker{'s' if w > 1 else ' '}: {ran.seconds:6.1f} s, {trials} trials",
            flush=True,
        )
    base = times[workers[0]] * workers[0]
    print(
        f"{'workers':>8} {'wall s':>8} {'speed-up':>9} {'linear':>7} {'of linear':>10} "
        f"{'trials s':>9} {'first trial s':>14} {'others s':>9} "
        f"{'start s':>8} {'phase s':>8} {'after s':>8}"
    )
    for w, t in times.items():
        up = base / t
        firsts, others = engine[w]
        start, phase, after = split[w]
        print(
            f"{w:>8} {t:>8.1f} {up:>9.2f} {w:>7} {up / w:>10.0%} "
            f"{sum(firsts) + sum(others):>9.1f} {statistics.median(firsts):>14.1f} "
            f"{statistics.median(others):>9.1f} {start:>8.1f} {phase:>8.1f} {after:>8.1f}"
        )
    print(
        "(trials s: the trials' engine time summed; first trial s: the median engine time of "
        "each worker's first trial, which carries the process's one-time imports; others s: "
        "the median of the rest; start s: from the command's start to a worker's first trial "
        "(median over the workers: each process's fixed cost); phase s: the first trial's start "
        "to the last one's end; after s: from there to the command's end (children ending, the "
        "parent's final run and report); one worker: from its records, to the second)"
    )
    if 4 in times:
        ratio = base / times[4] / 4
        verdict = "met" if ratio >= 0.9 else "missed"
        print(f"target >= 0.9 x linear at 4 workers: {ratio:.2f} x linear ({verdict})")


def kill_runs(model: Path, root: Path, runs: int, n: int, seed: int) -> None:
    rng = random.Random(seed)
    print(f"{runs} kill runs, seed {seed}: 4 workers, {n} candidates; one worker SIGKILLed")
    twice = never = left_behind = failed = mid = 0
    t_all = time.monotonic()
    for i in range(runs):
        out = root / f"kill-{i}"
        shutil.rmtree(out, ignore_errors=True)
        mark = os.urandom(8).hex()
        cmd = argv(model, out, n, 4)
        after = rng.uniform(0.5, 0.8 * n)  # within the trial phase: n / 4 trials of about 4 s
        first = run(cmd, mark, root / f"kill-{i}", kill=(after, rng))
        second = run(cmd, mark, root / f"kill-{i}-rerun")
        pdir = out / "tiny-model"
        files, done = measurements(pdir)
        record = json.loads((pdir / "cpu.json").read_text()) if (pdir / "cpu.json").exists() else {}
        measured = {t["name"] for t in record.get("trials", ()) if t.get("state") == "complete"}
        dup = sorted(c for c in candidates(n) if files[c] > 1 or done[c] > 1)
        missing = sorted(set(candidates(n)) - measured)
        left = leftovers(mark)
        ok = first.returncode == 0 and second.returncode == 0
        twice += bool(dup)
        never += bool(missing)
        left_behind += bool(left)
        failed += not ok
        note = first.stderr.splitlines()[0]
        mid += "mid-trial" in note
        print(
            f"  run {i:2d}: {note}; exits {first.returncode}/{second.returncode}, "
            f"{first.seconds:.0f}+{second.seconds:.0f} s; measured twice: {dup or 'none'}, "
            f"never: {missing or 'none'}, left: {len(left)}",
            flush=True,
        )
    print(
        f"kill runs: {runs} ({mid} killed mid-trial), candidates measured twice in {twice}, "
        f"unmeasured at the end in {never}, processes left in {left_behind}, a non-zero exit "
        f"in {failed}; {time.monotonic() - t_all:.0f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--candidates", type=int, default=None, help="default 48; 16 with --kill-runs")
    ap.add_argument("--kill-runs", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="vtune-workers-"))
    root.mkdir(parents=True, exist_ok=True)
    model = tiny_model(root)
    if args.kill_runs:
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
        kill_runs(model, root, args.kill_runs, args.candidates or 16, seed)
    else:
        scaling(model, root, [int(w) for w in args.workers.split(",")], args.candidates or 48)
    print(f"(runs kept in {root})")


if __name__ == "__main__":
    main()
