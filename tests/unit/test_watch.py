"""Every load point is watched (issue 12): telemetry sampled around the load and kept for the
measured window only, the point's roofline from its measured tokens, and the notes on what
could not be watched; through ``measure``, ``vtune bench`` (--url and launched) and a search
trial, against the fake server (CPU: this test process's own tree; NVML: a fake ``pynvml``)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import tuner.engine.server
from tests.fake_vllm import ThreadedFake, fake_vllm
from tests.fakes import Behaviour
from tuner.engine.server import EngineSettings, LaunchConfig
from tuner.load.generator import LoadConfig, LoadResult, Window
from tuner.load.stream import RequestRecord
from tuner.load.workload import LengthRange, Request, WorkloadSpec
from tuner.measure.bench import BenchConfig, measure, run_bench
from tuner.measure.ratesearch import RateSearchConfig
from tuner.measure.scrape import ServerStats
from tuner.measure.watch import (
    TelemetryOptions,
    Watch,
    WatchPlan,
    client_in_flight,
    mean_batch,
    mean_decode_context,
    watch_plan,
)
from tuner.plan.prune import Planned, Variant
from tuner.plan.space import Candidate
from tuner.search.trial import TrialSetup, VllmTrialRunner
from tuner.specs.gpu import get_gpu
from tuner.specs.model import load_model

FAST = TelemetryOptions(period_s=0.02)


def _record(start: float, end: float | None, prompt: int = 10, out: int = 4) -> RequestRecord:
    return RequestRecord(0, start, end, start + 0.01, (), prompt, out, out, None)


def _load(records: list[RequestRecord], start: float = 0.0, end: float = 10.0) -> LoadResult:
    return LoadResult(tuple(records), Window(start, end), "count")


def _stats(series: list[tuple[float, float | None, float | None, float | None]]) -> ServerStats:
    return ServerStats(3, 0, None, None, None, None, None, None, None, None, series=tuple(series))


# --- the roofline's inputs ---------------------------------------------------------------------


def test_mean_batch_is_vllms_running_requests_inside_the_window_else_the_clients() -> None:
    load = _load([_record(0.0, 10.0), _record(5.0, 10.0), _record(-2.0, 1.0)])
    # scrapes before the window (t < 0) and after it (t > 10) are left out
    stats = _stats(
        [(-0.5, None, 99.0, 0), (1.0, None, 4.0, 0), (6.0, None, 2.0, 0), (11, None, 99, 0)]
    )
    assert mean_batch(load, stats) == (3.0, "server")
    # no scrape: the client's in-flight mean (10 s + 5 s + 1 s inside a 10 s window)
    assert mean_batch(load, None) == (pytest.approx(1.6), "client")
    assert client_in_flight(load) == pytest.approx(1.6)
    # a server that never reported running requests is no better than no scrape
    assert mean_batch(load, _stats([(1.0, None, 0.0, 0)]))[1] == "client"


def test_mean_context_weights_each_decode_step_by_its_context() -> None:
    # 10 prompt tokens, 4 output tokens: decoded at contexts 10, 11, 12, 13
    assert mean_decode_context(_load([_record(1.0, 2.0, 10, 4)])) == pytest.approx(11.5)
    # warm-up (before the window) and failed requests do not count
    failed = RequestRecord(1, 2.0, 3.0, None, (), 500, 0, 4, "HTTP 500")
    load = _load([_record(-1.0, 0.5, 1000, 4), _record(1.0, 2.0, 10, 4), failed])
    assert mean_decode_context(load) == pytest.approx(11.5)


# --- what a watch samples -------------------------------------------------------------------


def test_a_server_vtune_did_not_start_has_no_process_tree_and_says_so() -> None:
    plan = watch_plan(None, get_gpu("cpu"), FAST)
    watch = plan.for_url("http://127.0.0.1:8000")
    sampler, notes = watch.sampler()
    assert sampler is None
    assert any("no vLLM process tree" in n and "CPU skipped" in n for n in notes)
    assert any("roofline skipped" in n for n in notes)  # no model to place the point with


def test_a_remote_gpu_server_gets_no_local_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    plan = watch_plan(None, get_gpu("h100"), FAST)
    remote = plan.for_url("http://10.1.2.3:8000")
    assert remote.device == "cuda" and not remote.local_gpus
    assert any("not on this machine" in n for n in remote.sampler()[1])
    local = plan.for_url("http://localhost:8000")
    sampler, _ = local.sampler()
    assert sampler is not None and sampler.source.device.startswith("cuda")


def test_dcgm_is_sampled_beside_the_process_tree_when_a_url_is_given() -> None:
    watch = Watch(TelemetryOptions(dcgm_url="http://127.0.0.1:9/metrics"), root_pid=os.getpid())
    sampler, notes = watch.sampler()
    assert sampler is not None and notes == ()
    assert [type(s).__name__ for s in sampler.source.sources] == [
        "ProcessTreeSource",
        "DcgmSource",
    ]


def test_telemetry_off_samples_nothing_and_writes_no_block() -> None:
    assert Watch(None, root_pid=os.getpid()).sampler() == (None, ())


# --- measure() ----------------------------------------------------------------------------------


def _requests(n: int, out: int = 12) -> list[Request]:
    return [Request(tuple(range(1, 17)), 16, out) for _ in range(n)]


def test_measure_samples_the_tree_inside_the_measured_window_and_places_the_point(
    tiny_model_dir: Path,
) -> None:
    plan = watch_plan(str(tiny_model_dir), get_gpu("cpu"), FAST)
    server = SimpleNamespace(
        pid=os.getpid(),
        settings=EngineSettings(str(tiny_model_dir)),
        launch=LaunchConfig(device="cpu"),
    )
    watch = plan.for_server(server)
    # warm-up: 2 requests x 12 tokens x 20 ms, about 0.25 s sampled and then dropped
    with ThreadedFake(Behaviour(token_delay_s=0.02)) as fake:
        cfg = LoadConfig(concurrency=4, warmup=2, num_requests=16)
        m = asyncio.run(measure(fake.url, "tiny", _requests(18), cfg, watch=watch))
    assert m.summary.completed == 16 and m.telemetry is not None
    series = m.telemetry.series
    assert series and all(m.window.start <= t <= m.window.end for t, _ in series)
    # one sample per period over the window, give or take the scheduler
    expected = m.window.duration / FAST.period_s
    assert 0.5 * expected <= m.telemetry.samples <= expected + 2
    assert m.telemetry.max["cpu_percent_total"] > 0  # this process drove the load
    block = m.telemetry_json()
    assert block is not None and block["device"] == "cpu" and block["notes"] == []
    assert {"device", "period_s", "samples", "mean", "p50", "max", "series"} <= set(block)
    roof = m.roofline_json()
    assert roof is not None and roof["regime"] in (
        "memory-bound",
        "compute-bound",
        "overhead-bound",
    )
    assert roof["batch_source"] == "server"  # the fake serves vllm:num_requests_running
    assert roof["peaks"]["source"] == "datasheet"
    assert roof["achieved_flops_per_s"] == pytest.approx(
        2 * load_model(str(tiny_model_dir)).active_param_count * m.summary.output_throughput
    )
    assert roof["bandwidth_fraction"] > 0 and roof["flops_fraction"] > 0


class FakeNvml:
    """Just enough of pynvml for NvmlSource: two GPUs, 80 % busy, 30 % memory controller."""

    NVML_CLOCK_SM = 1

    def __init__(self) -> None:
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=80.0, memory=30.0)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=40 * 2**30)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return 350_000

    def nvmlDeviceGetClockInfo(self, h: int, kind: int) -> int:
        return 1980


def test_a_cuda_server_is_sampled_through_nvml_on_the_gpus_of_its_tp(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    plan = watch_plan(str(tiny_model_dir), get_gpu("h100"), FAST)
    server = SimpleNamespace(
        pid=None,
        settings=EngineSettings(str(tiny_model_dir), tensor_parallel_size=2),
        launch=LaunchConfig(device="cuda", cuda_visible_devices="3,1"),
    )
    watch = plan.for_server(server)
    assert watch.gpus == (3, 1) and watch.device == "cuda"
    with ThreadedFake(Behaviour(token_delay_s=0.01)) as fake:
        cfg = LoadConfig(concurrency=2, num_requests=8)
        m = asyncio.run(measure(fake.url, "tiny", _requests(8), cfg, watch=watch))
    assert m.telemetry is not None and m.telemetry.samples > 0
    assert m.telemetry.mean["gpu_util_percent"] == 80.0
    assert m.telemetry.mean["power_w"] == 700.0  # summed over the two GPUs
    assert set(m.telemetry.parts) == {"gpu3", "gpu1"}
    assert nvml.shutdowns == 1
    roof = m.roofline_json()
    assert roof is not None  # two H100s together: twice one card's peaks
    assert roof["peak_bandwidth_bytes_per_s"] == 2 * get_gpu("h100").memory_bandwidth


# --- vtune bench and a search trial -------------------------------------------------------------


def _bench_cfg(model: Path, **kw: Any) -> BenchConfig:
    workload = WorkloadSpec(
        input_len=LengthRange.fixed(8), output_len=LengthRange.fixed(6), num_prompts=20
    )
    return BenchConfig(
        model=str(model),
        workload=workload,
        load=LoadConfig(concurrency=4, num_requests=20, warmup=2),
        watch=watch_plan(str(model), get_gpu("cpu"), FAST),
        **kw,
    )


def test_a_launched_bench_writes_telemetry_roofline_and_peaks(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = fake_vllm(behaviour=Behaviour(token_delay_s=0.02), pid=os.getpid())
    monkeypatch.setattr(tuner.engine.server, "VllmServer", cls)
    cfg = _bench_cfg(
        tiny_model_dir,
        engine=EngineSettings(str(tiny_model_dir)),
        launch=LaunchConfig(device="cpu"),
    )
    data = json.loads(json.dumps(run_bench(cfg).to_json()))
    assert data["status"] == "ok"
    assert data["telemetry"]["samples"] > 0 and data["telemetry"]["mean"]["cpu_percent_total"] > 0
    assert data["roofline"]["regime"] and data["roofline"]["batch"] > 0
    assert data["peaks"]["source"] == "datasheet" and data["config"]["peaks"] == data["peaks"]


def test_a_bench_of_a_url_notes_the_missing_process_tree(tiny_model_dir: Path) -> None:
    with ThreadedFake(Behaviour(token_delay_s=0.002)) as fake:
        data = run_bench(_bench_cfg(tiny_model_dir, url=fake.url)).to_json()
    assert data["telemetry"]["samples"] == 0
    assert any("no vLLM process tree" in n for n in data["telemetry"]["notes"])
    assert data["roofline"]["regime"]  # the roofline needs no process: it is still there


def test_a_trial_keeps_each_points_telemetry_and_roofline_and_its_regime(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = fake_vllm(behaviour=Behaviour(token_delay_s=0.01), pid=os.getpid())
    monkeypatch.setattr(tuner.engine.server, "VllmServer", cls)
    setup = TrialSetup(
        tokenizer=str(tiny_model_dir),
        workload=WorkloadSpec(input_len=LengthRange.fixed(8), output_len=LengthRange.fixed(10)),
        launch=LaunchConfig(device="cpu"),
        log_dir=tmp_path,
        rate=RateSearchConfig(concurrency=4, seconds_per_point=0.6, min_requests=8),
        watch=watch_plan(str(tiny_model_dir), get_gpu("cpu"), FAST),
    )
    seen: list[dict[str, Any]] = []
    observer = SimpleNamespace(on_point=lambda name, point: seen.append(point))
    runner = VllmTrialRunner(setup, observer)
    planned = Planned(Candidate(max_num_seqs=4), 1.0, 100_000, 4.0, None, 1)
    variant = Variant("none", str(tiny_model_dir), load_model(str(tiny_model_dir)))
    t0 = time.monotonic()
    record = runner.measure(0, planned, variant)
    assert time.monotonic() - t0 < 30
    assert record.state == "complete" and record.points
    for point in record.points:
        assert point["telemetry"]["samples"] > 0
        assert point["roofline"]["regime"] == record.regime or point is not record.chosen_point
    assert record.regime == record.chosen_point["roofline"]["regime"]
    assert seen and seen[0]["roofline"] is not None  # the exporter saw it live


def test_a_variant_server_is_placed_with_its_own_model(tiny_model_dir: Path) -> None:
    plan = WatchPlan(FAST, get_gpu("cpu"), watch_plan(None, get_gpu("cpu")).figures, None, None)
    server = SimpleNamespace(
        pid=None, settings=EngineSettings(str(tiny_model_dir)), launch=LaunchConfig(device="cpu")
    )
    watch = plan.for_server(server)
    assert watch.roofline_model is not None
    assert watch.roofline_model.model.name == load_model(str(tiny_model_dir)).name
    gone = SimpleNamespace(
        pid=None, settings=EngineSettings("/no/such/model"), launch=LaunchConfig(device="cpu")
    )
    missing = plan.for_server(gone)
    assert missing.roofline_model is None and "unreadable" in missing.notes[0]


def test_a_model_that_cannot_be_read_is_tried_once_and_named_in_the_notes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tuner.measure.watch as watch_mod

    calls: list[str] = []
    real = watch_mod.load_model

    def counting(path: str) -> Any:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(watch_mod, "load_model", counting)
    plan = watch_plan("/no/such/model-dir", get_gpu("cpu"), FAST)
    assert plan.model is None and plan.model_error
    for _ in range(3):
        watch = plan.for_url("http://127.0.0.1:8000")
        assert watch.roofline_model is None
        assert any("unreadable" in n for n in watch.sampler()[1])
    assert calls == ["/no/such/model-dir"]
