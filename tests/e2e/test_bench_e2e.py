"""``vtune bench`` and the load generator against real vLLM CPU with the tiny model.

    flock /tmp/vtune-vllm.lock .venv/bin/pytest -m e2e tests/e2e/test_bench_e2e.py

The tests that launch their own vLLM come first (before the session server of
tests/conftest.py exists, so two vLLMs never share the two cores); they pass --enforce-eager,
which halves the start. The measurements share the session server and keep each load to a few
seconds. Every launched process is checked to be gone afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from tuner.engine.server import EngineSettings, LaunchConfig
from tuner.load.generator import LoadConfig
from tuner.load.workload import LengthRange, load_tokenizer, random_requests
from tuner.measure.bench import BenchConfig, WorkloadSpec, measure, run_bench
from tuner.measure.scrape import SUCCESS, parse_metrics
from tuner.measure.slo import parse_slo

pytestmark = pytest.mark.e2e
MARK = "VTUNE_BENCH_E2E_MARK"
KILL_AFTER = 8  # requests of the load the server has finished when it is killed


def _marked(mark: str) -> list[str]:
    """Live processes that carry ``MARK=mark`` in their environment (children of one run)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARK) == mark:
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:100]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _vtune(args: list[str], mark: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, MARK: mark}
    return subprocess.run(
        [sys.executable, "-m", "tuner", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# --- launching its own vLLM ---------------------------------------------------------------------


def test_invalid_engine_flag_is_an_invalid_option_result(tiny_model_dir: Path, tmp_path: Path):
    mark = uuid.uuid4().hex
    out = tmp_path / "bad.json"
    proc = _vtune(
        [
            "bench",
            "--model",
            str(tiny_model_dir),
            "--engine-arg",
            "no_such_flag=1",
            "--num-prompts",
            "2",
            "--json",
            str(out),
        ],
        mark,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    data = json.loads(out.read_text())
    assert data["status"] == "failed" and data["failure"] == "invalid_option"
    assert "no-such-flag" in data["message"]
    assert _marked(mark) == []


def test_bench_starts_measures_writes_and_stops(tiny_model_dir: Path, tmp_path: Path):
    mark = uuid.uuid4().hex
    out = tmp_path / "run.json"
    proc = _vtune(
        [
            "bench",
            "--model",
            str(tiny_model_dir),
            "--engine-arg",
            "enforce_eager",
            "--engine-arg",
            "max_num_seqs=8",
            "--num-prompts",
            "16",
            "--input-len",
            "32",
            "--output-len",
            "16",
            "--concurrency",
            "4",
            "--slo",
            "ttft:p99<10s",
            "--json",
            str(out),
        ],
        mark,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "request throughput" in proc.stdout and "TTFT" in proc.stdout
    data = json.loads(out.read_text())
    assert data["status"] == "ok" and data["completed"] == 16 and data["failed"] == 0
    assert data["total_output_tokens"] == 16 * 16
    assert data["server_metrics"]["generation_tokens"] == 16 * 16
    assert data["server_metrics"]["max_running"] <= 8  # max_num_seqs reached vLLM
    assert "max-num-seqs" in data["config"]["engine"]
    assert data["request_goodput"] is not None
    assert _marked(mark) == [], "vLLM outlived vtune bench"


def test_bench_watches_the_vllm_tree_and_prometheus_scrapes_the_knee_gauges(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Issue 12: a probe is cached; `vtune bench` samples the vLLM process tree through the
    measured window (CPU % > 0 for the vLLM processes), places the point on the roofline
    against the probed peaks, and pushes the gauges, which a real Prometheus then holds."""
    from tests.prom import running_prometheus, running_pushgateway
    from tuner.analytic.roofline import REGIMES

    monkeypatch.setenv("VTUNE_PROBE_DIR", str(tmp_path / "probe"))
    mark = uuid.uuid4().hex
    probed = _vtune(["probe", "--gpu", "cpu", "--json"], mark, timeout=120)
    assert probed.returncode == 0, probed.stderr[-2000:]
    bandwidth = json.loads(probed.stdout)["probe"]["memory_bandwidth"]
    out = tmp_path / "knee.json"
    with running_pushgateway() as gw, running_prometheus({"pushgateway": [gw.address]}) as prom:
        proc = _vtune(
            [
                "bench",
                "--model",
                str(tiny_model_dir),
                "--gpu",
                "cpu",
                "--engine-arg",
                "enforce_eager",
                "--engine-arg",
                "max_num_seqs=8",
                "--num-prompts",
                "48",
                "--input-len",
                "32",
                "--output-len",
                "32",
                "--concurrency",
                "8",
                "--pushgateway",
                gw.url,
                "--json",
                str(out),
            ],
            mark,
            timeout=400,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        data = json.loads(out.read_text())
        tel = data["telemetry"]
        assert tel["device"] == "cpu" and tel["errors"] == 0, tel
        assert tel["samples"] >= 0.3 * data["duration"] / tel["period_s"]  # two busy cores
        assert tel["mean"]["cpu_percent_total"] > 0 and tel["max"]["num_processes"] >= 3
        per_process = {k: v for k, v in tel["mean"].items() if k.endswith("/cpu_percent")}
        assert len(per_process) >= 3 and max(per_process.values()) > 0, per_process
        assert len(tel["series"]) >= 2
        roof = data["roofline"]
        assert roof["regime"] in REGIMES and roof["batch_source"] == "server"
        assert 0 < roof["batch"] <= 8 and roof["bandwidth_fraction"] > 0
        assert data["peaks"]["source"] == "probe" and data["peaks"]["memory_bandwidth"] == bandwidth
        assert roof["peak_bandwidth_bytes_per_s"] == bandwidth

        job = 'job="vtune-bench"'
        cpu = prom.wait_for(f"vtune_telemetry_cpu_percent{{{job}}} > 0")
        assert float(cpu[0]["value"][1]) == pytest.approx(tel["mean"]["cpu_percent_total"])
        prom.wait_for(f'vtune_regime{{{job},regime="{roof["regime"]}"}} == 1')
        fraction = prom.wait_for(f"vtune_bandwidth_fraction{{{job}}}")
        assert float(fraction[0]["value"][1]) == pytest.approx(roof["bandwidth_fraction"])
        prom.wait_for(f"vtune_flops_fraction{{{job}}} > 0")
    assert _marked(mark) == [], "vLLM outlived vtune bench"


def test_server_killed_mid_run_gives_a_partial_crashed_result(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    cfg = BenchConfig(
        model=str(tiny_model_dir),
        workload=WorkloadSpec(
            num_prompts=200, input_len=LengthRange.fixed(32), output_len=LengthRange.fixed(32)
        ),
        load=LoadConfig(rate=10.0, warmup=1, timeout_s=30),
        engine=EngineSettings(model=str(tiny_model_dir), extra=(("--enforce-eager", None),)),
        launch=LaunchConfig(device="cpu", startup_timeout_s=300),
    )
    measuring = threading.Event()

    def progress(msg: str) -> None:
        if msg.startswith("vLLM is up"):
            measuring.set()

    def server() -> tuple[psutil.Process, int] | None:
        for proc in psutil.process_iter(["cmdline"]):
            argv = proc.info["cmdline"] or []
            try:
                # The API server itself, not vtune's guard (whose argv holds the same command):
                # a guard killed from outside is another failure class ("killed").
                cmd = " ".join(argv)
                is_server = "vllm.entrypoints.openai.api_server" in cmd and "guard.py" not in cmd
                if is_server and "--port" in argv and proc.environ().get(MARK) == mark:
                    return proc, int(argv[argv.index("--port") + 1])
            except psutil.Error:
                continue
        return None

    def killer() -> None:
        measuring.wait(400)
        found = server()
        assert found is not None, "no vLLM server of this run"
        proc, port = found
        # Kill once the server has finished the warm-up and KILL_AFTER requests of the load (its
        # own count), not after fixed seconds: on a loaded CI machine 3 s saw only 4 finish.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    done = parse_metrics(r.read(), (SUCCESS,)).get(SUCCESS, 0.0)
            except OSError:
                done = 0.0
            if done >= 1 + KILL_AFTER:
                break
            time.sleep(0.1)
        proc.kill()

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = run_bench(cfg, progress=progress)
    t.join(5)
    assert result.status == "failed" and result.failure == "crashed", result.message
    assert result.partial
    m = result.measurement
    assert m is not None and m.load.stopped == "aborted"
    # The client may not have read the last few answers the server counted before the kill.
    assert m.summary.completed >= KILL_AFTER - 3
    assert m.window.duration < 15  # stopped early: 200 requests at 10/s would take 20 s
    assert result.to_json()["partial"] is True
    time.sleep(1)
    assert _marked(mark) == []


def test_health_timeout_is_a_result_and_leaves_nothing(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    cfg = BenchConfig(
        model=str(tiny_model_dir),
        workload=WorkloadSpec(
            num_prompts=2, input_len=LengthRange.fixed(8), output_len=LengthRange.fixed(4)
        ),
        load=LoadConfig(),
        engine=EngineSettings(model=str(tiny_model_dir)),
        launch=LaunchConfig(device="cpu", startup_timeout_s=4, stop_grace_s=2),
    )
    t0 = time.monotonic()
    result = run_bench(cfg)
    assert time.monotonic() - t0 < 30
    assert result.status == "failed" and result.failure == "health_timeout"
    assert _marked(mark) == []


# --- on the session server ----------------------------------------------------------------------


def _measure(
    server, tiny_model_dir: Path, n: int, n_in: int, n_out: int, load: LoadConfig, seed: int, **kw
):
    import asyncio

    tok = load_tokenizer(tiny_model_dir)
    reqs = random_requests(
        tok, n + load.warmup, LengthRange.fixed(n_in), LengthRange.fixed(n_out), seed=seed
    )
    kw.setdefault("scrape_interval", 0.1)
    return asyncio.run(measure(server.url, server.info.model, reqs, load, **kw))


def test_client_token_count_equals_server_generation_tokens(vllm_server, tiny_model_dir: Path):
    load = LoadConfig(concurrency=4, warmup=2)
    m = _measure(vllm_server, tiny_model_dir, 24, 24, 64, load, seed=11)
    s, sv = m.summary, m.server
    assert s.completed == 24 and s.failed == 0
    assert all(r.output_tokens == 64 for r in m.records)  # exact lengths (ignore_eos, min_tokens)
    # one SSE chunk per token, unless vLLM's API server fell behind and merged some
    assert all(1 <= len(r.chunk_times) <= 64 for r in m.records)
    assert sv is not None and sv.failures == 0
    assert sv.generation_tokens == s.total_output_tokens == 24 * 64  # warm-up not counted
    assert sv.prompt_tokens == s.total_input_tokens == 24 * 24
    assert sv.requests_finished == 24
    # gauges are sampled (every 0.1 s here), so they are seen only if a poll hits the run
    assert sv.samples >= 3, f"run too short to sample: {m.window.duration:.2f} s"
    assert sv.max_running is not None and 1 <= sv.max_running <= 4
    assert sv.peak_kv_cache_usage is not None and 0 < sv.peak_kv_cache_usage <= 1


def test_client_ttft_never_below_the_servers_and_close_at_low_load(
    vllm_server, tiny_model_dir: Path
):
    gaps = []
    for attempt in range(3):  # "close" needs a quiet machine; "never below" must always hold
        load = LoadConfig(rate=4.0, warmup=1, seed=3 + attempt)
        m = _measure(vllm_server, tiny_model_dir, 12, 32, 4, load, seed=12 + attempt)
        s, sv = m.summary, m.server
        assert s.completed == 12 and sv is not None and sv.server_ttft_mean is not None
        client = sorted(r.ttft for r in m.records if r in m.window)
        # Per request, "never below": for every histogram bound, no more client TTFTs than
        # server TTFTs fit under it (the client's clock starts before the server's and stops
        # after it).
        assert sv.ttft_buckets
        for bound, server_count in sv.ttft_buckets:
            assert sum(t <= bound for t in client) <= server_count, (bound, client)
        assert s.ttft.mean >= sv.server_ttft_mean
        # ...and close to it at low load: HTTP, JSON and the API server's own queueing only.
        gaps.append(s.ttft.mean - sv.server_ttft_mean)
        if gaps[-1] < 0.030:
            break
    assert min(gaps) < 0.030, f"client - server mean TTFT per attempt (s): {gaps}"


def test_higher_concurrency_gives_higher_throughput_and_latency(vllm_server, tiny_model_dir: Path):
    one = _measure(
        vllm_server, tiny_model_dir, 8, 64, 32, LoadConfig(concurrency=1, warmup=1), seed=21
    ).summary
    many = _measure(
        vllm_server, tiny_model_dir, 48, 64, 32, LoadConfig(concurrency=16, warmup=2), seed=22
    ).summary
    assert one.failed == many.failed == 0
    assert many.output_throughput > 1.5 * one.output_throughput, (
        one.output_throughput,
        many.output_throughput,
    )
    # Latency end to end. Not TTFT or TPOT: vLLM CPU on two cores often streams a request's
    # tokens in one burst at its end, so TTFT ~ E2E and TPOT ~ 0 for such a request (CI saw a
    # median TPOT of 0 at concurrency 16, its mean below the one at concurrency 1).
    assert many.e2el.mean > one.e2el.mean and many.e2el.median > one.e2el.median
    assert one.peak_in_flight == 1 and 8 < many.peak_in_flight <= 16


def test_goodput_and_duration_stop_on_a_real_server(vllm_server, tiny_model_dir: Path):
    slo = parse_slo("ttft:p99<60s;e2el<60s")
    load = LoadConfig(rate=8.0, duration_s=2.0, burstiness=4.0, warmup=1)
    m = _measure(vllm_server, tiny_model_dir, 10, 16, 8, load, seed=31, slo=slo)
    assert m.load.stopped == "duration"
    assert 8 <= m.summary.completed <= 30  # about 16 at 8/s for 2 s, the set cycled
    assert m.summary.request_goodput == pytest.approx(m.summary.request_throughput)
    assert slo.met(m.summary)


def test_chat_endpoint_streams_exact_lengths(vllm_server, tiny_model_dir: Path):
    import asyncio

    tok = load_tokenizer(tiny_model_dir)
    reqs = random_requests(
        tok, 5, LengthRange.fixed(20), LengthRange.fixed(10), seed=41, endpoint="chat"
    )
    load = LoadConfig(concurrency=2, warmup=1, endpoint="chat")
    m = asyncio.run(
        measure(vllm_server.url, vllm_server.info.model, reqs, load, scrape_interval=0.1)
    )
    assert m.summary.completed == 4 and m.summary.failed == 0
    # Exact lengths by the server's usage count. The chunks: one per token when vLLM's API
    # server keeps up; when it lags (a loaded machine) vLLM merges the pending tokens of a
    # request into one delta, so fewer chunks carry the same 10 tokens.
    assert all(r.output_tokens == 10 and 1 <= len(r.chunk_times) <= 10 for r in m.records)
    assert all(r.prompt_len > 20 for r in m.records)  # the server counts the chat template too
    assert m.server is not None and m.server.generation_tokens == 40
