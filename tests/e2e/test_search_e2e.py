"""`vtune search` end to end on vLLM CPU with the tiny model.

One search, as a user runs it: killed (SIGKILL) after its first trial, started again — it resumes
without repeating that trial while a real Prometheus scrapes its exporter — and finishes with a
profile that a fresh `vllm ... --config` serves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.prom import free_port, running_prometheus

pytestmark = pytest.mark.e2e

SLO = "ttft:p95<2s;tpot:p95<200ms"


def search_argv(model: Path, out: Path, *extra: str) -> list[str]:
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
        SLO,
        "--param",
        "max_num_seqs=4,16,64",
        "--input-len",
        "64",
        "--output-len",
        "32",
        "--seconds-per-point",
        "3",
        "--iterations",
        "1",
        "--finalists",
        "2",
        "--repeats",
        "1",
        "--screen",  # a space this small is otherwise measured whole, as a grid
        "--out",
        str(out),
        *extra,
    ]


def vllm_processes(ignore: frozenset[int] = frozenset()) -> list[int]:
    """PIDs of vLLM processes, except ``ignore`` (e.g. the session's shared test server) and
    the fake engine's (fault tests beside this one under pytest-xdist run it through a guard
    whose argv names vllm.entrypoints)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "fake-vllm-python" in cmd or "fake_vllm_process" in cmd:
            continue
        if ("vllm.entrypoints" in cmd or "VLLM::" in cmd) and proc.pid not in ignore:
            found.append(proc.pid)
    return found


def wait_until(cond, timeout_s: float, step: float = 0.5) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


def test_search_resumes_after_kill_writes_profile_and_is_scraped(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "profiles"
    before = frozenset(vllm_processes())  # the session's shared server, if it is up

    # 1. Start, and SIGKILL vtune as soon as its first trial is saved.
    log1 = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        search_argv(tiny_model_dir, out), stdout=log1, stderr=log1, start_new_session=True
    )
    trial_files = lambda: sorted(out.glob("*/cpu.study/*/trials/*.json"))  # noqa: E731
    assert wait_until(lambda: trial_files() or first.poll() is not None, 400), "no trial saved"
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    saved = trial_files()
    assert len(saved) == 1
    first_trial = json.loads(saved[0].read_text())
    assert first_trial["name"] == "vllm-defaults" and first_trial["state"] == "complete"
    # vtune died hard; its guard must still take vLLM down (parent-death signal).
    assert wait_until(lambda: not vllm_processes(before), 30), vllm_processes(before)

    # 2. The same command again, watched by a real Prometheus.
    port = free_port()
    with running_prometheus([f"127.0.0.1:{port}"]) as prom:
        second = subprocess.run(
            search_argv(tiny_model_dir, out, "--metrics-port", str(port)),
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        # The exporter is gone once vtune exits; look back over the run, not at "now".
        trials = prom.query('max_over_time(vtune_trials_total{state="complete"}[30m])')
        points = prom.query("max_over_time(vtune_points_measured_total[30m])")
    assert trials, "Prometheus found no vtune_trials_total series while the search ran"
    # Live progress, scraped while a trial measured. (Not the trials' count: the resumed run's
    # last trial may end a fraction of a second before vtune exits, after the last scrape; a
    # run's final values reach Prometheus through --pushgateway, which pushes at the finish.)
    assert points and max(float(s["value"][1]) for s in points) >= 1, points

    yaml_path = out / tiny_model_dir.name / "cpu.yaml"
    record = json.loads(yaml_path.with_suffix(".json").read_text())
    names = [t["name"] for t in record["trials"]]
    # The model learns from the trials: a candidate the in-launch max_num_seqs screen or the
    # calibrated prediction rules out is pruned (rule "screened" / "calibrated", with its
    # reason), not launched; a launched one whose capacity probe cannot reach the incumbent
    # stops early (state pruned, rule "early_stop"); every other one is measured in full.
    ruled_out = {p["name"]: p for p in record["plan"]["pruned"]}
    assert {p["rule"] for p in ruled_out.values()} <= {"calibrated", "screened"}
    assert all(p["reason"] for p in ruled_out.values())
    assert sorted(names + list(ruled_out)) == sorted(["vllm-defaults", "seqs4", "seqs16", "seqs64"])
    assert "vllm-defaults" in names
    assert record["calibration"]["points_used"] >= 1
    baseline = next(t for t in record["trials"] if t["name"] == "vllm-defaults")
    assert baseline["started_at"] == first_trial["started_at"]  # resumed, not repeated
    logs = list(out.glob("*/cpu.study/*/logs/[0-9]*-vllm-defaults.log"))  # finalists aside
    assert len(logs) == 1
    assert record["best"] in names and record["gain"]["baseline"] is not None
    for trial in record["trials"]:
        assert trial["server_info"]["kv_cache_size_tokens"] == 1048576
        if trial["state"] == "pruned":
            assert trial["failure"]["rule"] == "early_stop", trial["failure"]
            assert len(trial["rate_search"]["points"]) == 1  # the capacity probe, no more
            continue
        assert trial["state"] == "complete", trial.get("failure")
        assert trial["best"]["p95_tpot_ms"] < 200 and trial["best"]["p95_ttft_ms"] < 2000
    # The screen: one launch at the group's largest max_num_seqs, a closed loop per rung, and
    # larger batches measured more throughput on this model (batching pays on CPU too).
    screen = record["screen"]
    assert screen["failure"] is None and screen["engine_time_s"] > 0
    screened = {r["max_num_seqs"]: r["output_throughput"] for r in screen["results"]}
    assert {4, 16, 64} <= set(screened)
    assert screened[64] > screened[4]
    assert set(screen["pruned"]) == {n for n, p in ruled_out.items() if p["rule"] == "screened"}
    assert record["cost"]["output_tokens_per_s_per_gpu"] > 0
    assert not vllm_processes(before)

    # 3. A fresh vLLM loads the profile unchanged and answers.
    profile = yaml_path.read_text()
    assert "max-num-seqs" in profile or record["best"] == "vllm-defaults"
    assert "kv-cache-memory-bytes: 1073741824" in profile
    from tuner.engine.server import EngineSettings, LaunchConfig, VllmServer

    launch = LaunchConfig(
        command=(
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--config",
            str(yaml_path),
        ),
        device="cpu",
        log_dir=tmp_path / "fresh",
        startup_timeout_s=600,
    )
    with VllmServer(EngineSettings(model=str(tiny_model_dir)), launch) as server:
        body = json.dumps({"model": str(tiny_model_dir), "prompt": "Hello", "max_tokens": 4})
        req = urllib.request.Request(
            server.url + "/v1/completions",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        assert answer["choices"][0]["text"] is not None
        assert answer["usage"]["completion_tokens"] == 4
        log = server.log_path.read_text()
        config = record["profile"]["config"]
        if "max-num-seqs" in config:
            assert f"'max_num_seqs': {config['max-num-seqs']}" in log
    assert server.survivors == []
