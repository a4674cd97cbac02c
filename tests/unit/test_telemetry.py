"""Telemetry samplers: the sampler's contract (never raises, fixed period, statistics), psutil
over a real process tree, NVML against a fake ``pynvml``, dcgm-exporter against a local server."""

from __future__ import annotations

import http.server
import itertools
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from tuner.measure.telemetry import (
    PART_SEP,
    CombinedSource,
    Sampler,
    Telemetry,
    downsample_series,
)
from tuner.measure.telemetry_cpu import ProcessTreeSource
from tuner.measure.telemetry_nvidia import (
    DcgmSource,
    NvmlSource,
    cuda_visible_devices,
    parse_dcgm,
    scrape_dcgm,
)

BUSY = "import time\nend = time.perf_counter() + {s}\nwhile time.perf_counter() < end: pass\n"


class ListSource:
    """Returns the next values of a list each reading; raises where the list holds an error."""

    def __init__(self, values: list, fail_start: bool = False, device: str = "fake") -> None:
        self.values = list(values)
        self.fail_start = fail_start
        self.device = device
        self.closed = False
        self.reads = 0

    def start(self) -> None:
        if self.fail_start:
            raise RuntimeError("no such device")

    def read(self) -> dict[str, float]:
        self.reads += 1
        value = self.values.pop(0) if self.values else {"x": 0.0}
        if isinstance(value, Exception):
            raise value
        return value

    def errors(self) -> list[str]:
        return []

    def close(self) -> None:
        self.closed = True


def _wait_for(predicate, timeout_s: float = 5.0) -> None:
    end = time.perf_counter() + timeout_s
    while not predicate():
        assert time.perf_counter() < end, "timed out"
        time.sleep(0.01)


# --- the sampler -------------------------------------------------------------------------------


def test_statistics_per_key_over_the_samples_that_hold_it() -> None:
    series = [
        (1.0, {"a": 1.0, "p/b": 10.0}),
        (2.0, {"a": 2.0}),
        (3.0, {"a": 6.0, "p/b": 30.0}),
    ]
    t = Telemetry.from_series("cpu", 0.1, series)
    assert t.samples == 3
    assert t.mean == {"a": 3.0, "p/b": 20.0}
    assert t.p50 == {"a": 2.0, "p/b": 20.0}
    assert t.max == {"a": 6.0, "p/b": 30.0}
    assert t.totals == {"a": 3.0}
    assert t.parts == {"p": {"b": 20.0}}
    window = t.between(1.5, 3.0)
    assert window.samples == 2 and window.mean["a"] == 4.0 and window.max["p/b"] == 30.0
    out = t.to_json()
    assert set(out) == {
        "device",
        "period_s",
        "samples",
        "errors",
        "last_error",
        "mean",
        "p50",
        "max",
    }
    assert t.to_json(series=True)["series"] == [
        [0.0, {"a": 1.0}],
        [1.0, {"a": 2.0}],
        [2.0, {"a": 6.0}],
    ]


def test_downsample_keeps_first_and_last_and_at_most_n_points() -> None:
    series = [(float(i), {"a": float(i)}) for i in range(1000)]
    points = downsample_series(series, 10)
    assert len(points) == 10
    assert points[0] == [0.0, {"a": 0.0}] and points[-1] == [999.0, {"a": 999.0}]
    assert downsample_series([], 10) == [] and len(downsample_series(series, 1)) == 1


def test_sampler_reads_at_its_period_and_counts_errors_without_raising() -> None:
    source = ListSource([{"x": 1.0}, RuntimeError("flaky"), {"x": 3.0}] + [{"x": 2.0}] * 100)
    with Sampler(source, period_s=0.02) as sampler:
        _wait_for(lambda: source.reads >= 8)
    t = sampler.result
    assert t.errors == 1 and t.last_error == "RuntimeError: flaky"
    assert t.samples == source.reads - 1  # the failed reading is not a sample
    assert t.max["x"] == 3.0 and t.device == "fake" and t.period_s == 0.02
    assert source.closed
    times = [s[0] for s in t.series]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 0.005  # on a schedule, not a busy loop
    assert sampler.stop() is t  # stopping twice returns the same result


def test_a_source_that_does_not_start_gives_an_empty_result_not_an_exception() -> None:
    source = ListSource([], fail_start=True)
    with Sampler(source, period_s=0.01) as sampler:
        time.sleep(0.05)
    t = sampler.result
    assert t.samples == 0 and t.errors == 1 and "no such device" in (t.last_error or "")
    assert source.reads == 0 and source.closed
    assert t.mean == {} and t.to_json()["samples"] == 0


def test_a_stuck_reading_does_not_hold_up_stop() -> None:
    release = threading.Event()

    class Stuck(ListSource):
        def read(self) -> dict[str, float]:
            release.wait(10)
            return {"x": 1.0}

    sampler = Sampler(Stuck([]), period_s=0.01).start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    t = sampler.stop(timeout_s=0.2)
    release.set()
    assert time.perf_counter() - t0 < 2.0
    assert t.errors == 1 and "did not stop" in (t.last_error or "")


def test_period_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Sampler(ListSource([]), period_s=0)


def test_combined_source_drops_a_source_that_does_not_start() -> None:
    good = ListSource([{"a": 1.0}] * 50, device="good")
    bad = ListSource([], fail_start=True, device="bad")
    with Sampler(CombinedSource([bad, good]), period_s=0.01) as sampler:
        _wait_for(lambda: good.reads >= 3)
    t = sampler.result
    assert t.mean["a"] == 1.0 and t.device == "bad,good"
    assert t.errors == 1 and "bad" in (t.last_error or "")


# --- psutil over a real process tree ----------------------------------------------------------


@pytest.mark.parametrize("proc_children", [None, False])
def test_process_tree_sees_a_busy_child_started_after_sampling_began(
    proc_children: bool | None,
) -> None:
    source = ProcessTreeSource(os.getpid(), proc_children=proc_children)
    with Sampler(source, period_s=0.1) as sampler:
        time.sleep(0.25)  # sampling runs before the child exists
        child = subprocess.Popen([sys.executable, "-c", BUSY.format(s=1.5)])
        child.wait(timeout=30)
        time.sleep(0.15)
    t = sampler.result
    assert t.errors == 0, t.last_error
    assert t.samples >= 10
    assert t.max["cpu_percent_total"] > 0
    assert t.max["rss_bytes_total"] > 10 * 2**20
    assert t.max["num_processes"] >= 2
    child_keys = [k for k in t.mean if k.endswith(f"[{child.pid}]{PART_SEP}cpu_percent")]
    assert child_keys, sorted(t.mean)
    assert t.max[child_keys[0]] > 10  # a busy loop: well above idle even on shared cores
    # The child did not exist for the first readings: its statistics are over fewer samples.
    with_child = [s for s in t.series if child_keys[0] in s[1]]
    assert 0 < len(with_child) < t.samples


def test_processes_that_come_and_go_are_not_errors() -> None:
    source = ProcessTreeSource(os.getpid())
    with Sampler(source, period_s=0.02) as sampler:
        for _ in range(5):
            subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=30)
    assert sampler.result.errors == 0, sampler.result.last_error
    assert sampler.result.samples > 0


def test_a_root_process_that_is_gone_is_counted_not_raised() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    with Sampler(ProcessTreeSource(gone.pid), period_s=0.01) as sampler:
        time.sleep(0.05)
    assert sampler.result.samples == 0 and sampler.result.errors == 1


# --- NVML against a fake pynvml ---------------------------------------------------------------


class FakeNvml:
    """The slice of ``pynvml`` that NvmlSource calls; device 1 does not report power."""

    NVML_CLOCK_SM = 1

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"h{i}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return {"GPU-aaa": "h0", "GPU-bbb": "h1"}[uuid]

    def nvmlDeviceGetIndex(self, handle: str) -> int:
        return int(handle[1:])

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(
            gpu={"h0": 90, "h1": 70}[handle], memory={"h0": 60, "h1": 40}[handle]
        )

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(used={"h0": 10 * 2**30, "h1": 20 * 2**30}[handle], total=80 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        if handle == "h1":
            raise self.NVMLError("Not Supported")
        return 350_000  # milliwatts

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        assert clock == self.NVML_CLOCK_SM
        return {"h0": 1980, "h1": 1400}[handle]


def test_nvml_totals_per_gpu_keys_and_units() -> None:
    nv = FakeNvml()
    source = NvmlSource([0, 1], nvml=nv)
    source.start()
    values = source.read()
    source.close()
    assert values["gpu0/gpu_util_percent"] == 90 and values["gpu1/mem_util_percent"] == 40
    assert values["gpu_util_percent"] == 80.0  # mean over GPUs
    assert values["mem_util_percent"] == 50.0
    assert values["memory_used_bytes"] == 30 * 2**30  # summed
    assert values["power_w"] == 350.0 and "gpu1/power_w" not in values  # W, from mW
    assert values["sm_clock_mhz"] == 1690.0
    assert source.device == "cuda:0,1"
    assert nv.calls == ["init", "shutdown"]
    assert source.errors() == ["NVML gpu1 power_w: NVMLError: Not Supported"]
    source.read()
    assert source.errors() == []  # an unsupported metric is reported once


def test_nvml_through_the_sampler_from_sys_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbb")
    with Sampler(NvmlSource(), period_s=0.01) as sampler:
        time.sleep(0.1)
    t = sampler.result
    assert t.device == "cuda:1" and t.samples >= 3
    assert t.mean["gpu_util_percent"] == 70 and "gpu0/gpu_util_percent" not in t.mean
    assert t.errors == 1  # gpu1's power, once
    assert nv.calls[0] == "init" and nv.calls[-1] == "shutdown"


def test_nvml_missing_is_an_error_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with Sampler(NvmlSource([0]), period_s=0.01) as sampler:
        time.sleep(0.03)
    assert sampler.result.samples == 0 and sampler.result.errors == 1


def test_cuda_visible_devices() -> None:
    assert cuda_visible_devices({}) is None
    assert cuda_visible_devices({"CUDA_VISIBLE_DEVICES": "2,0"}) == [2, 0]
    assert cuda_visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-x, 1"}) == ["GPU-x", 1]
    assert cuda_visible_devices({"CUDA_VISIBLE_DEVICES": "0,bad,1"}) == [0]
    assert cuda_visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []


# --- dcgm-exporter ----------------------------------------------------------------------------

DCGM_TEXT = """\
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-aaa",device="nvidia0"} 97
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-bbb",device="nvidia1"} 12
# HELP DCGM_FI_PROF_SM_ACTIVE The ratio of cycles an SM has at least 1 warp assigned.
# TYPE DCGM_FI_PROF_SM_ACTIVE gauge
DCGM_FI_PROF_SM_ACTIVE{gpu="0",UUID="GPU-aaa",device="nvidia0"} 0.8
DCGM_FI_PROF_SM_ACTIVE{gpu="1",UUID="GPU-bbb",device="nvidia1"} 0.2
# HELP DCGM_FI_PROF_DRAM_ACTIVE The ratio of cycles the device memory interface is active.
# TYPE DCGM_FI_PROF_DRAM_ACTIVE gauge
DCGM_FI_PROF_DRAM_ACTIVE{gpu="0",UUID="GPU-aaa",device="nvidia0"} 0.7
DCGM_FI_PROF_DRAM_ACTIVE{gpu="1",UUID="GPU-bbb",device="nvidia1"} 0.1
# HELP DCGM_FI_PROF_PIPE_TENSOR_ACTIVE Ratio of cycles the tensor pipe is active.
# TYPE DCGM_FI_PROF_PIPE_TENSOR_ACTIVE gauge
DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{gpu="0",UUID="GPU-aaa",device="nvidia0"} 0.25
DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{gpu="1",UUID="GPU-bbb",device="nvidia1"} 0.05
"""


@pytest.fixture
def dcgm_url():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = DCGM_TEXT.encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_parse_dcgm_keeps_the_profiling_ratios_of_the_chosen_gpus() -> None:
    everything = parse_dcgm(DCGM_TEXT)
    assert everything["dcgm_sm_active"] == pytest.approx(0.5)
    assert everything["gpu1/dcgm_dram_active"] == pytest.approx(0.1)
    assert not any("GPU_UTIL" in k or "gpu_util" in k for k in everything)
    only_first = parse_dcgm(DCGM_TEXT, gpus=["GPU-aaa"])
    assert only_first == {
        "gpu0/dcgm_sm_active": 0.8,
        "gpu0/dcgm_dram_active": 0.7,
        "gpu0/dcgm_tensor_active": 0.25,
        "dcgm_sm_active": 0.8,
        "dcgm_dram_active": 0.7,
        "dcgm_tensor_active": 0.25,
    }


def test_scrape_dcgm_over_http(dcgm_url: str) -> None:
    values = scrape_dcgm(dcgm_url + "/metrics", gpus=[1])
    assert values["dcgm_tensor_active"] == pytest.approx(0.05)
    with Sampler(DcgmSource(dcgm_url + "/metrics", gpus=[0]), period_s=0.02) as sampler:
        time.sleep(0.15)
    assert sampler.result.samples >= 2 and sampler.result.mean["dcgm_sm_active"] == 0.8
    with Sampler(DcgmSource(dcgm_url + "/nothing-here", timeout_s=1), period_s=0.02) as sampler:
        time.sleep(0.1)
    assert sampler.result.samples == 0 and sampler.result.errors >= 1
    assert "404" in (sampler.result.last_error or "")
