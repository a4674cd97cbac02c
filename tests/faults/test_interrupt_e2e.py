"""SIGTERM to ``vtune search`` as PID 1 of its own PID namespace, on real vLLM CPU (the tiny
model), as a Kubernetes pod without an init gets it on eviction: once while vLLM loads, once
while the baseline is under load. Each time vtune must end within seconds with 143, leave no
vLLM process and no new /dev/shm file, save nothing for the cut trial; and the same command
again (PID 1 again) must measure every candidate, the cut one included, to a complete record.

Small on purpose (each vLLM start is about a minute on two cores): two candidates, one rate
step, no finalist re-runs. Marked e2e: run them under ``flock /tmp/vtune-vllm.lock``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.faults import procs

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

STOP_S = 45.0  # vLLM stops in seconds; SIGKILL after the 10 s grace at worst
LINE = "vtune: interrupted by SIGTERM; finished trials are saved — rerun the same command to resume"


def _argv(model: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tuner",
        "search",
        "--model",
        str(model),
        "--gpu",
        "cpu",
        "--slo",
        "ttft:p95<2s;tpot:p95<200ms",
        "--param",
        "max_num_seqs=4",
        "--input-len",
        "64",
        "--output-len",
        "32",
        "--seconds-per-point",
        "3",
        "--iterations",
        "1",
        "--repeats",
        "0",
        "--out",
        str(out),
    ]


# Only this module's vLLM processes count (other tests may run vLLM or its fake beside them).
MARK = "VTUNE_FAULT_TEST_MARK"
MARK_VALUE = uuid.uuid4().hex


def _vllm_pids() -> set[int]:
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "vllm.entrypoints" in cmd or "VLLM::" in cmd:
            try:
                if proc.environ().get(MARK) == MARK_VALUE:
                    found.add(proc.pid)
            except psutil.Error:
                continue
    return found


def _shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()}


def _shm_of_ours() -> set[str]:
    """The /dev/shm files this module's processes have mapped or open (read just before the
    signal): under pytest-xdist, fault tests beside this one make their own."""
    names: set[str] = set()
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) != MARK_VALUE:
                continue
            paths = [m.path for m in proc.memory_maps()] + [f.path for f in proc.open_files()]
        except psutil.Error:
            continue
        names |= {p.split("/dev/shm/", 1)[1].split()[0] for p in paths if "/dev/shm/" in p}
    return names


def _port(log: Path) -> int:
    match = re.search(r"--port (\d+)", log.read_text(errors="replace"))
    assert match, log.read_text()[-2000:]
    return int(match.group(1))


def _stopped_cleanly(
    search: procs.Search,
    before_vllm: set[int],
    before_shm: set[str],
    took: float,
    ours: set[str],
) -> None:
    ran = search.ended()
    assert ran.returncode == 143, ran.describe()
    assert took < STOP_S, f"{took:.0f} s\n{ran.describe()}"
    assert LINE in ran.stderr.splitlines() and "Traceback" not in ran.stderr, ran.describe()
    procs.assert_gone(search.remember(), grace_s=20)
    assert not _vllm_pids() - before_vllm

    def left() -> set[str]:  # only ours: `make test` runs fault tests beside this one
        return (_shm() - before_shm) & ours

    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left(), f"/dev/shm files left: {sorted(left())}"
    assert not list(search.pdir.glob("cpu.study/*/trials/*.json"))  # the cut trial: not saved


def _rerun_completes(model: Path, out: Path) -> None:
    search = procs.start(_argv(model, out), _env(), out, model, "rerun", pid1=True)
    try:
        ran = search.ended(timeout=1200)
    finally:
        search.kill()
    assert ran.returncode == 0, ran.describe()
    record = json.loads((search.pdir / "cpu.json").read_text())
    trials = {t["name"]: t for t in record["trials"]}
    assert sorted(trials) == ["seqs4", "vllm-defaults"]
    assert all(t["state"] == "complete" and t["objective"] > 0 for t in trials.values())
    assert trials["vllm-defaults"]["number"] == 1  # trial 0 was cut: measured again
    procs.assert_gone(search.remember(), grace_s=20)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "100", MARK: MARK_VALUE}


def _start(model: Path, out: Path) -> tuple[procs.Search, set[int], set[str]]:
    before_vllm, before_shm = _vllm_pids(), _shm()
    return (
        procs.start(_argv(model, out), _env(), out, model, "a", pid1=True),
        before_vllm,
        before_shm,
    )


def test_sigterm_to_pid_1_while_vllm_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    search, before_vllm, before_shm = _start(tiny_model_dir, out)
    try:
        log = search.wait_log("000", "# vtune:", timeout=300)
        time.sleep(5)  # vLLM is importing and loading (about a minute in all)
        assert "Application startup complete" not in log.read_text(errors="replace")
        assert _vllm_pids() - before_vllm, "vLLM is not running"
        ours = _shm_of_ours()
        _, took = search.signal(signal.SIGTERM)
    finally:
        search.kill()
    _stopped_cleanly(search, before_vllm, before_shm, took, ours)
    _rerun_completes(tiny_model_dir, out)


def test_sigterm_to_pid_1_under_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    search, before_vllm, before_shm = _start(tiny_model_dir, out)
    try:
        log = search.wait_log("000", "# vtune:", timeout=300)
        port = _port(log)
        deadline = time.monotonic() + 600
        while not procs.vllm_under_load(port):
            assert time.monotonic() < deadline, "the baseline never came under load"
            assert search.proc.poll() is None, search.ended().describe()
            search.remember()
            time.sleep(0.2)
        ours = _shm_of_ours()
        _, took = search.signal(signal.SIGTERM)
    finally:
        search.kill()
    _stopped_cleanly(search, before_vllm, before_shm, took, ours)
    _rerun_completes(tiny_model_dir, out)
