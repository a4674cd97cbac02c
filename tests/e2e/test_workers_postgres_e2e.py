"""Many workers, one study, end to end: two workers on real vLLM CPU (the tiny model) and a real
PostgreSQL server (a throwaway cluster: tests/pg.py), each worker on one CPU core of its own.

One module-scoped scenario, then tests that read what it left:

1. Worker A: ``vtune search --storage postgresql://...`` over four candidates (vLLM's defaults,
   max_num_seqs 2, 4, 8). ``--objective goodput --no-early-stop``: a grid, every candidate
   measured whole; no calibrated pruning or early stop that would depend on who measured what
   first. A runs under ``taskset`` on the first CPU, its vLLM's OpenMP threads bound there
   (``VLLM_CPU_OMP_THREADS_BIND``), its vLLM ports from a range of its own
   (``VTUNE_PORT_RANGE``), as ``vtune search --workers`` pins its workers (tuner.search.fleet).
2. Once the study carries its configuration: worker B, ``vtune worker --storage URL --study
   NAME --out B``, pinned the same way to the second CPU, under a hostname of its own
   (``unshare -u``, root: as on another machine; on A's hostname B would first watch A's live
   trial for a grace period, ``fail_stale``'s settle).
3. While B's first trial is under load (its vLLM's /metrics counts requests), SIGKILL to B's
   process group (B leads a session of its own). vLLM runs under vtune's guard, in a session of
   its own out of that group's reach: the guard must take it down when vtune dies; every
   process of B's tree (guard, vLLM, EngineCore) must be gone within a minute.
4. A sees B's trial's heartbeat stand still for a grace period (tuner.search.study.GRACE_S),
   fails it as stale, measures its candidate again, finishes the study, takes the profile
   lease and writes the one profile and record.
5. B's command again (same ``--out``): it joins a finished study whose lease A holds and ends
   at once (exit 0, ``profile written by another worker``), measuring nothing.

The checks: every candidate has exactly one COMPLETE trial holding its record (one trial log
each, the killed one aside); the killed trial is FAIL with ``stale: true`` and its candidate is
COMPLETE in a later trial measured by A; one profile YAML and one record across both ``--out``;
each finalist re-measured once (``repeats`` samples more than its trial's), any finalist
relaunch and saved finalist samples only under the profile's writer; each worker's vLLM on its
own CPU and ports; no password in any output, file or study; no process left behind.

The record's candidate set is compared with the plan a single worker makes of the same command
(``vtune search ... --dry-run --json`` without ``--storage``: the same study name, a grid that
measures each planned candidate once). Reading that plan, rather than paying a second real
search, is how this test compares with a single-worker run within CI's time.

``VTUNE_E2E_FAKE=1`` (read by this module only) runs the same scenario on the fake vLLM process
(tests/bin/fake-vllm-python): 80-170 s on two busy cores, to check this test without vLLM.
Real vLLM: about a minute per launch on one core; B dies in its first trial, so A launches four
trials in turn (the grace period passes during its third) and any finalist relaunch.

Over 400 lines: one scenario (two workers, a kill, a takeover, a rerun), the helpers that watch
it (process trees, vLLM's /metrics, ports) and the checks that read it belong together.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import pg
from tests.faults import procs
from tests.faults import searchproc as sp

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

postgres = pg.postgres  # the module's PostgreSQL server
FAKE = os.environ.get("VTUNE_E2E_FAKE") == "1"  # the fake vLLM process instead of vLLM
CANDIDATES = ("vllm-defaults", "seqs2", "seqs4", "seqs8")
REPEATS = 1  # re-runs of each finalist
ELSEWHERE = "profile written by another worker"
OTHER_HOST = "vtune-e2e-worker-b"
PORTS = ((28600, 28699), (28700, 28799))  # A's, B's; --workers (tests/faults/test_fleet.py)
# uses 28000-28199
STARTUP_S = 60 if FAKE else 600  # --startup-timeout
UNDER_LOAD_S = 120 if FAKE else 600  # B's first trial under load within this
RUN_S = 300 if FAKE else 1200  # A's whole run within this
GONE_S = 60  # the guard stops vLLM: SIGTERM, 10 s of grace, SIGKILL
VLLM = "fake_vllm_process" if FAKE else "vllm.entrypoints"  # in a vLLM server's argv
LEFT_RUNNING = (
    "the killed trial is still RUNNING: its candidate was measured again without the trial "
    "being failed as stale (one staleness verdict from fail_stale, another from pending_names "
    "or measuring_elsewhere moments later in the same loop of Search.run)"
)


def _options(model: Path, out: Path) -> list[str]:
    """The search's options, the storage aside: four candidates, small loads."""
    options = [
        *("--model", str(model), "--gpu", "cpu"),
        *("--slo", "ttft:p95<10s", "--objective", "goodput", "--no-early-stop"),
        *("--param", "max_num_seqs=2,4,8", "--input-len", "32", "--output-len", "16"),
        *("--kv-cache-memory-bytes", "16MiB", "--telemetry-period", "1"),
        *("--seconds-per-point", "2", "--iterations", "1"),
        *("--finalists", "2", "--repeats", str(REPEATS)),
        *("--startup-timeout", str(STARTUP_S), "--out", str(out)),
    ]
    return [*options, *_vllm_python()]


def _vllm_python() -> list[str]:
    return ["--vllm-python", str(sp.FAKE_VLLM_PYTHON)] if FAKE else []


def _search_argv(model: Path, out: Path, url: str) -> list[str]:
    return [str(sp.VTUNE), "search", *_options(model, out), "--storage", url]


def _worker_argv(url: str, study: str, out: Path) -> list[str]:
    argv = [str(sp.VTUNE), "worker", "--storage", url, "--study", study, "--out", str(out)]
    return [*argv, *_vllm_python()]


def _env(mark: str, slot: int, cpu: int) -> dict[str, str]:
    """A worker's environment: its ports, its vLLM's OpenMP threads on its CPU, ``mark``."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        COLUMNS="100",
        VTUNE_PORT_RANGE=f"{PORTS[slot][0]}-{PORTS[slot][1]}",
        VLLM_CPU_OMP_THREADS_BIND=str(cpu),
        **{sp.MARK: mark},
    )
    env.pop("VLLM_API_KEY", None)
    if FAKE:
        env.update(FAKE_VLLM_PYTHON=sys.executable, FAKE_VLLM_STARTUP_S="1")
    return env


def _pinned(cpu: int) -> list[str]:
    """Run on ``cpu`` alone (inherited by the guard and vLLM)."""
    return ["taskset", "-c", str(cpu)]


@functools.cache
def _other_host() -> tuple[str, ...]:
    """A prefix that runs a worker under a hostname of its own (``unshare -u``: root); without
    root, nothing (worker B then first waits a grace period on A's live trial)."""
    ran = subprocess.run(["unshare", "-u", "true"], capture_output=True, timeout=30)
    if ran.returncode != 0:
        return ()
    return ("unshare", "-u", "sh", "-c", 'hostname "$0" && exec "$@"', OTHER_HOST)


def _storage(url: str) -> Any:
    import optuna

    return optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg://", 1))


def _trials(url: str, study: str) -> list[Any]:
    import optuna

    storage = _storage(url)
    try:
        return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=True)
    finally:
        storage.remove_session()


def _wait_for_config(url: str, search: procs.Search, timeout: float) -> str:
    """The study's name, once it carries the search's configuration (stored when its trials
    begin)."""
    from tuner.search.study_config import ATTR

    storage = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert search.proc.poll() is None, f"A ended first:\n{search.ended().describe()}"
            search.remember()
            # Opened here, not before: opening creates Optuna's tables, which A may be
            # creating this instant.
            with contextlib.suppress(Exception):
                storage = storage or _storage(url)
                for summary in storage.get_all_studies():
                    if "/" not in summary.study_name and ATTR in summary.user_attrs:
                        return summary.study_name
                storage.remove_session()
            time.sleep(0.2)
    finally:
        if storage is not None:
            storage.remove_session()
    raise AssertionError(f"the search stored no configuration in a study within {timeout} s")


def _single_worker_plan(model: Path, out: Path) -> dict[str, Any]:
    """``vtune search`` of the same options, one worker (no --storage), --dry-run --json."""
    argv = [str(sp.VTUNE), "search", *_options(model, out), "--dry-run", "--json"]
    ran = sp.run(argv, {**os.environ, "COLUMNS": "100"}, timeout=120)
    assert ran.returncode == 0, ran.describe()
    assert not out.exists(), "a dry run wrote under --out"
    return dict(json.loads(ran.stdout))


# --- what the running workers show -------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A vLLM process seen in a worker's tree (the guard around it, the API server, its
    engine core): its CPUs, its OpenMP binding, the port on its argv (None: none there)."""

    pid: int
    cpus: frozenset[int]
    bind: str | None
    port: int | None


def _servers(search: procs.Search) -> list[Server]:
    found = []
    for p in search.remember():
        with contextlib.suppress(psutil.Error):
            cmd = p.cmdline()
            if not any(VLLM in part or "VLLM::" in part for part in cmd):
                continue
            port = int(cmd[cmd.index("--port") + 1]) if "--port" in cmd else None
            bind = p.environ().get("VLLM_CPU_OMP_THREADS_BIND")
            found.append(Server(p.pid, frozenset(p.cpu_affinity()), bind, port))
    return found


def _log_port(log: Path) -> int | None:
    """The port in the trial log's first line (``# vtune: ... --port N``)."""
    match = re.search(r"--port (\d+)", log.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def _trial_logs(pdir: Path) -> list[Path]:
    return sorted(
        p for p in pdir.glob("cpu.study/*/logs/*.log") if not p.name.startswith("finalist")
    )


def _candidate(log_name: str) -> str:
    """``001-seqs8.log`` -> ``seqs8``."""
    return log_name.split("-", 1)[1].removesuffix(".log")


@dataclass(frozen=True)
class Killed:
    """B's trial as it was SIGKILLed: number, candidate, state and worker id then, B's vLLM
    servers then."""

    number: int
    candidate: str
    state: str
    worker_id: str | None
    servers: tuple[Server, ...]


def _kill_under_load(
    a: procs.Search, b: procs.Search, url: str, study: str, seen_a: dict[int, Server]
) -> Killed:
    """Wait until B's first trial is under load, SIGKILL B's process group, and check that
    every process of B's tree (its vLLM too, through the guard) is gone."""
    deadline = time.monotonic() + UNDER_LOAD_S
    while True:
        assert time.monotonic() < deadline, f"B's first trial not under load in {UNDER_LOAD_S} s"
        assert b.proc.poll() is None, f"B ended first:\n{b.ended().describe()}"
        seen_a.update({s.pid: s for s in _servers(a)})
        b.remember()
        logs = _trial_logs(b.pdir)
        port = _log_port(logs[0]) if logs else None
        if port is not None and procs.vllm_under_load(port):
            break
        time.sleep(0.2)
    servers = tuple(_servers(b))
    number = int(logs[0].name.split("-", 1)[0])
    trial = next(t for t in _trials(url, study) if t.number == number)
    seen = b.remember()
    os.killpg(b.proc.pid, signal.SIGKILL)  # B leads its session: its group's id is its pid
    b.proc.wait(timeout=30)
    procs.assert_gone(seen, grace_s=GONE_S)  # vLLM too: the guard's doing, not the kill's
    return Killed(
        trial.number,
        _candidate(logs[0].name),
        trial.state.name,
        trial.user_attrs.get("worker_id"),
        servers,
    )


# --- the scenario ------------------------------------------------------------------------------


@dataclass
class Scenario:
    """What the run left: the storage, the study, the workers and how each ended, B's killed
    trial, B's command run again, the single-worker plan, the vLLM servers seen, timings."""

    url: str
    password: str
    study: str
    plan: dict[str, Any]
    cpus: tuple[int, int]
    a: procs.Search
    b: procs.Search
    a_ran: sp.Ran
    b_ran: sp.Ran
    killed: Killed
    again: sp.Ran
    again_s: float
    b_logs_before_again: list[str]
    trials_before_again: int
    a_servers: dict[int, Server] = field(default_factory=dict)

    def describe(self) -> str:
        return "\n".join(r.describe() for r in (self.a_ran, self.b_ran, self.again))

    def trials(self) -> list[Any]:
        return _trials(self.url, self.study)


@pytest.fixture(scope="module")
def scenario(
    postgres: pg.Postgres, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("two workers, one CPU each: this process may use one CPU")
    cpus = (allowed[0], allowed[1])
    model, tmp = tiny_model_dir, tmp_path_factory.mktemp("workers")
    plan = _single_worker_plan(model, tmp / "plan")
    url, mark = postgres.new_database(), sp.new_mark()
    a_out, b_out = tmp / "a", tmp / "b"
    started: list[procs.Search] = []
    a_servers: dict[int, Server] = {}
    t0 = time.monotonic()
    try:
        a_argv = [*_pinned(cpus[0]), *_search_argv(model, a_out, url)]
        a = procs.start(a_argv, _env(mark, 0, cpus[0]), a_out, model, "a", new_session=True)
        started.append(a)
        study = _wait_for_config(url, a, timeout=STARTUP_S + 120)
        b_argv = [*_pinned(cpus[1]), *_other_host(), *_worker_argv(url, study, b_out)]
        b_env = _env(mark, 1, cpus[1])
        b = procs.start(b_argv, b_env, b_out, model, "b", new_session=True)
        started.append(b)
        killed = _kill_under_load(a, b, url, study, a_servers)
        t_kill = time.monotonic()
        print(f"B killed in trial {killed.number} ({killed.candidate}) after {t_kill - t0:.0f} s")
        deadline = time.monotonic() + RUN_S
        while a.proc.poll() is None and time.monotonic() < deadline:
            a_servers.update({s.pid: s for s in _servers(a)})
            time.sleep(0.5)
        a_ran = a.ended(timeout=max(1.0, deadline - time.monotonic()))
        print(f"A ended {time.monotonic() - t_kill:.0f} s after the kill")
        b_ran = b.ended(timeout=10)
        b_logs_before_again = [p.name for p in b.pdir.rglob("*.log")]
        trials_before_again = len(_trials(url, study))
        t1 = time.monotonic()
        again = sp.run(b_argv, b_env, timeout=300)  # B's command again
        again_s = time.monotonic() - t1
        print(f"B again: {again_s:.1f} s; the whole scenario {time.monotonic() - t0:.0f} s")
    finally:
        for search in started:
            search.kill()
    for search in started:
        procs.assert_gone(search.remember())
    sp.assert_no_process_left(mark, grace_s=GONE_S)
    yield Scenario(
        url,
        postgres.password,
        study,
        plan,
        cpus,
        a,
        b,
        a_ran,
        b_ran,
        killed,
        again,
        again_s,
        b_logs_before_again,
        trials_before_again,
        a_servers,
    )


def _table(trials: list[Any]) -> str:
    return "\n".join(
        f"  #{t.number} {t.state.name} {t.user_attrs.get('candidate')} "
        f"by {str(t.user_attrs.get('worker_id'))[:8]}@{t.user_attrs.get('worker')} "
        f"{sorted(k for k in t.user_attrs if k not in ('record', 'knobs', 'candidate'))}"
        for t in trials
    )


# --- the tests ---------------------------------------------------------------------------------


def test_a_finished_b_was_killed_and_its_rerun_ended_at_once(scenario: Scenario) -> None:
    s = scenario
    assert s.a_ran.returncode == 0, s.describe()
    assert "Traceback" not in s.a_ran.stdout + s.a_ran.stderr, s.describe()
    assert ELSEWHERE not in s.a_ran.stderr, s.describe()  # A wrote the profile
    assert s.b_ran.returncode == -signal.SIGKILL, s.describe()
    assert s.killed.servers, "B's trial had no vLLM server running when it was killed"
    # B's command again: the study finished, A holds the lease; nothing measured, nothing
    # written, no trial asked, no vLLM launched.
    again = s.again
    assert again.returncode == 0, again.describe()
    assert ELSEWHERE in again.stderr and "Traceback" not in again.stderr, again.describe()
    assert str(s.a.pdir / "cpu.yaml") in again.stderr, again.describe()  # who wrote it
    assert sorted(p.name for p in s.b.pdir.rglob("*.log")) == sorted(s.b_logs_before_again)
    assert len(s.trials()) == s.trials_before_again
    assert s.again_s < 90, s.again_s  # vtune's start-up and the study's look, no vLLM


def test_each_candidate_measured_exactly_once(scenario: Scenario) -> None:
    import optuna

    s = scenario
    trials = s.trials()
    table = _table(trials)
    print(f"study:\n{table}")
    context = f"study:\n{table}\n{s.describe()}"
    complete = optuna.trial.TrialState.COMPLETE
    with_record = [t for t in trials if "record" in t.user_attrs]
    assert all(t.state == complete for t in with_record), context
    measured = collections.Counter(t.user_attrs["candidate"] for t in with_record)
    assert measured == dict.fromkeys(CANDIDATES, 1), context
    running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert not running, f"{LEFT_RUNNING}\n{context}"
    assert [t.number for t in trials if t.user_attrs.get("stale")] == [s.killed.number], context
    # One trial log per candidate across both --out, but the killed trial's.
    a_logs = [p.name for p in _trial_logs(s.a.pdir)]
    b_logs = [p.name for p in _trial_logs(s.b.pdir)]
    assert b_logs == [f"{s.killed.number:03d}-{s.killed.candidate}.log"], (b_logs, context)
    assert collections.Counter(map(_candidate, a_logs)) == dict.fromkeys(CANDIDATES, 1), a_logs
    # Nothing of B's is a result: no trial file, no record.
    assert not list(s.b.pdir.glob("cpu.study/*/trials/*.json"))


def test_the_killed_trial_was_run_again_by_the_other_worker(scenario: Scenario) -> None:
    import optuna

    s, killed = scenario, scenario.killed
    trials = {t.number: t for t in s.trials()}
    context = f"study:\n{_table(list(trials.values()))}\n{s.describe()}"
    assert killed.state == "RUNNING" and killed.worker_id, (killed, context)
    dead = trials[killed.number]
    assert dead.state == optuna.trial.TrialState.FAIL, f"{LEFT_RUNNING}\n{context}"
    assert dead.user_attrs.get("stale") is True and "record" not in dead.user_attrs, context
    assert dead.user_attrs.get("worker_id") == killed.worker_id, context
    if _other_host():
        assert dead.user_attrs.get("worker") == OTHER_HOST, context
    # Its candidate: COMPLETE in a later trial, measured by A (its log is in A's --out); A
    # measured every candidate, one worker id for all of them, not B's.
    again = [
        t
        for t in trials.values()
        if t.user_attrs.get("candidate") == killed.candidate and "record" in t.user_attrs
    ]
    assert len(again) == 1 and again[0].number > killed.number, context
    rerun = again[0]
    assert list(s.a.pdir.glob(f"cpu.study/*/logs/{rerun.number:03d}-{killed.candidate}.log"))
    ids = {t.user_attrs["worker_id"] for t in trials.values() if "record" in t.user_attrs}
    assert len(ids) == 1 and killed.worker_id not in ids, context


def test_one_profile_and_finalists_once(scenario: Scenario) -> None:
    s = scenario
    outs = (s.a.out, s.b.out)
    assert [p for o in outs for p in o.rglob("*.yaml")] == [s.a.pdir / "cpu.yaml"]
    assert [p for o in outs for p in o.rglob("cpu.json")] == [s.a.pdir / "cpu.json"]
    for out in outs:
        sp.assert_nothing_half_written(out, killed=out == s.b.out)
    record = sp.assert_pair_from_one_run(s.a.pdir)
    assert record is not None
    trials = {t["name"]: t for t in record["trials"]}
    assert sorted(trials) == sorted(CANDIDATES), sorted(trials)
    for trial in trials.values():
        assert trial["state"] == "complete" and trial["objective"] > 0, trial
    assert trials[s.killed.candidate]["number"] > s.killed.number
    # Each finalist re-measured once: its trial's sample and REPEATS more (in its trial's
    # launch, or relaunched by the profile's writer after the trials), never twice.
    finalists = {f["name"]: f for f in record["finalists"]}
    assert len(finalists) >= 2 and set(finalists) <= set(CANDIDATES), finalists
    for name, finalist in finalists.items():
        assert len(finalist["samples"]) == 1 + REPEATS, (name, finalist)
    relaunched = [p.name for p in s.a.pdir.glob("cpu.study/*/logs/finalist-*.log")]
    names = [n for log in relaunched for n in log.removeprefix("finalist-")[:-4].split("+")]
    assert len(names) == len(set(names)) and set(names) <= set(finalists), relaunched
    assert not list(s.b.out.rglob("finalist-*.log")), "B relaunched a finalist"
    assert set(sp.saved_samples(s.a.pdir)) == set(finalists)
    assert not sp.saved_samples(s.b.pdir)
    engine = record["study"]["finalist_engine_time_s"]
    assert (engine > 0) == bool(relaunched), (engine, relaunched)


def test_record_matches_a_single_worker_plan(scenario: Scenario) -> None:
    """The single worker's plan of the same command: the same study, the same four candidates,
    each queued (a grid measures every one); the record holds exactly those."""
    s, plan = scenario, scenario.plan
    assert plan["study"] == s.study, (plan["study"], s.study)
    assert plan["sampler"] is None and plan["counts"]["pruned"] == 0, plan["counts"]
    planned = [c["name"] for c in plan["candidates"] if c["queued"]]
    assert sorted(planned) == sorted(CANDIDATES), planned
    record = json.loads((s.a.pdir / "cpu.json").read_text())
    assert sorted(t["name"] for t in record["trials"]) == sorted(planned)
    assert not record["plan"]["pruned"], record["plan"]["pruned"]
    assert record["study"]["name"] == s.study


def test_each_worker_on_its_own_cpu_and_ports(scenario: Scenario) -> None:
    s = scenario
    a_servers, b_servers = list(s.a_servers.values()), list(s.killed.servers)
    assert a_servers and b_servers, (a_servers, b_servers)
    workers = zip((a_servers, b_servers), (s.a, s.b), s.cpus, PORTS, strict=True)
    for servers, worker, cpu, (first, last) in workers:
        for server in servers:
            assert server.cpus == {cpu}, server
            # vLLM retitles its processes (VLLM::APIServer, VLLM::EngineCore): their argv and
            # environment are overwritten then; what is readable must agree.
            assert server.bind == str(cpu) if FAKE else server.bind in (None, str(cpu)), server
            assert server.port is None or first <= server.port <= last, server
        logs = list(worker.pdir.glob("cpu.study/*/logs/*.log"))
        ports = [_log_port(p) for p in logs]
        assert ports and all(p is not None and first <= p <= last for p in ports), ports
        if not FAKE:  # vLLM logs the binding its engine took: only this worker's CPU
            for log in logs:
                text = log.read_text(errors="replace")
                if "core ids=" not in text:
                    continue  # killed before its engine started
                assert f"VLLM_CPU_OMP_THREADS_BIND='{cpu}'" in text, log
                assert f"core ids=[{cpu}]" in text, log


def test_no_password_anywhere(scenario: Scenario) -> None:
    """Not in any output, any file under either --out, nor anywhere in the storage's studies."""
    s, secret = scenario, scenario.password
    for ran in (s.a_ran, s.b_ran, s.again):
        assert secret not in ran.stdout + ran.stderr
    for root in (s.a.out, s.b.out):
        for path in root.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    storage = _storage(s.url)
    try:
        studies = storage.get_all_studies()
        assert {x.study_name for x in studies} == {s.study, f"{s.study}/profile-lease"}
        for summary in studies:
            assert secret not in json.dumps([summary.user_attrs, summary.system_attrs], default=str)
            trials = storage.get_all_trials(summary._study_id)
            assert secret not in json.dumps([t.user_attrs for t in trials], default=str)
    finally:
        storage.remove_session()
