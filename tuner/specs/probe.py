"""What this machine's device really does: measured bandwidth, matmul FLOP/s and memory.

:func:`probe` measures with torch on the device vtune would tune (CUDA device 0 when
``torch.cuda.is_available()``, else the CPU):

- memory bandwidth: a device-to-device copy of one large buffer (2 GiB on a GPU, 256 MiB on a
  CPU), best of a few repeats, counting the bytes read and written (2 x size);
- dense matmul FLOP/s per dtype: 2 n^3 / time of an n x n x n matmul, best of a few, n sized
  to run in about a quarter second (up to 8192 on a GPU, 1024 on a CPU) (GPU: bf16,
  fp16 and, on compute capability 8.9+, fp8 through ``torch._scaled_mm``; CPU: fp32 and bf16);
- memory: what the driver reports (``torch.cuda.mem_get_info``; on a CPU the host's memory,
  capped by a cgroup limit, and psutil's available figure).

Results are cached per machine, one JSON file per device: ``$XDG_CACHE_HOME/vtune/probe/
<device-key>.json`` (``~/.cache`` without XDG_CACHE_HOME; ``$VTUNE_PROBE_DIR`` instead when
set), where the key is the GPU's name or
the CPU's model and core count (:func:`local_device_key` works it out without torch, so the
estimate path stays fast). :func:`load_probe` returns None for a missing file and warns (one
log line) and returns None for an unreadable one. torch is imported only to measure.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuner.errors import UnsupportedError
from tuner.files import atomic_write_json, read_json
from tuner.specs.detect import DetectedGpu, detect_gpus, match_detected
from tuner.specs.gpu import GpuSpec, get_gpu, host_memory_bytes

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
SCHEMA = 1  # bump when the file's fields change; files of another schema are ignored


@dataclass(frozen=True)
class ProbeSizes:
    """How big the probe's work is: bytes copied, matmul side n, timed repeats."""

    copy_bytes: int
    matmul_n: int
    repeats: int = 3

    @classmethod
    def default(cls, kind: str) -> ProbeSizes:
        """Seconds in all: 2 GiB / n <= 8192 on a GPU; 256 MiB / n <= 1024 on a CPU; best of 5."""
        return cls(2 * GiB, 8192, 5) if kind == "cuda" else cls(256 * MiB, 1024, 5)


@dataclass(frozen=True)
class ProbeResult:
    """One probe of one device. ``peak_flops`` is keyed by dtype ("fp32", "bf16", "fp16",
    "fp8"); a dtype that could not run is in ``skipped`` with the reason."""

    device_key: str
    device_name: str
    kind: str  # "cuda" or "cpu"
    memory_bandwidth: float  # bytes/s, reads plus writes
    peak_flops: dict[str, float]
    memory_total_bytes: int
    memory_free_bytes: int
    measured_at: str  # ISO 8601, UTC
    torch_version: str
    sizes: ProbeSizes
    matmul_n: dict[str, int]  # the matmul side each dtype was timed at
    seconds: float  # how long the probe took
    skipped: dict[str, str] = field(default_factory=dict)
    schema: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ProbeResult:
        """Rebuild from :meth:`to_json`; ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("schema") != SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, expected {SCHEMA}")
        try:
            sizes = ProbeSizes(**data["sizes"])
            result = cls(**{**data, "sizes": sizes})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or unexpected fields ({exc})") from None
        if not (result.memory_bandwidth > 0 and all(v > 0 for v in result.peak_flops.values())):
            raise ValueError("bandwidth and FLOP/s must be positive")
        return result


# --- where results live -----------------------------------------------------------------------


def device_key(name: str) -> str:
    """A file-name-safe key: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    key = re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")
    return key or "unknown"


def cpu_name() -> str:
    """This host's CPU as a device name: model from /proc/cpuinfo and the cores this process
    may use ("AMD EPYC 7B13 (2 cores)")."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("model name", "Model", "Hardware")):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    return f"{model or 'cpu'} ({_cores()} cores)"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_device_key(kind: str | None = None) -> str:
    """This machine's key without importing torch: the first NVIDIA GPU's name from NVML or
    nvidia-smi (the name torch reports too), else the CPU's. ``kind="cpu"`` forces the CPU."""
    if kind != "cpu":
        found = detect_gpus()
        if found:
            return device_key(found[0].name)
    return device_key("cpu " + cpu_name())


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$VTUNE_PROBE_DIR`` when set (the tests point it at a scratch directory), else
    ``$XDG_CACHE_HOME/vtune/probe`` (``~/.cache/vtune/probe`` when unset or empty)."""
    env = os.environ if env is None else env
    if env.get("VTUNE_PROBE_DIR"):
        return Path(env["VTUNE_PROBE_DIR"])
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vtune" / "probe"


def cache_path(key: str, env: Mapping[str, str] | None = None) -> Path:
    """The cache file of one device key."""
    return cache_dir(env) / f"{device_key(key)}.json"


def save_probe(result: ProbeResult, env: Mapping[str, str] | None = None) -> Path:
    """Write ``result`` to its cache file atomically; returns the path."""
    return atomic_write_json(cache_path(result.device_key, env), result)


def load_probe(key: str, env: Mapping[str, str] | None = None) -> ProbeResult | None:
    """The cached probe of ``key``; None when there is none. A file that cannot be read or
    does not hold a probe is ignored with one warning (the caller falls back to datasheets)."""
    path = cache_path(key, env)
    if not path.exists():
        return None
    try:
        return ProbeResult.from_json(read_json(path))
    except Exception as exc:  # ParameterError from read_json, ValueError from from_json
        log.warning("ignoring the probe cache %s: %s (run `vtune probe` again)", path, exc)
        return None


# --- measuring --------------------------------------------------------------------------------


def probe(
    kind: str | None = None,
    sizes: ProbeSizes | None = None,
    *,
    dtypes: tuple[str, ...] | None = None,
) -> ProbeResult:
    """Measure this machine's device. ``kind`` "cuda" or "cpu" (None: CUDA when available);
    ``sizes`` default to :meth:`ProbeSizes.default`; ``dtypes`` default to fp32 and bf16 on a
    CPU, bf16, fp16 and fp8 on a GPU. Raises RuntimeError when CUDA is asked for and absent."""
    import torch

    if kind is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: torch.cuda.is_available() is False")
    sizes = sizes or ProbeSizes.default(kind)
    dtypes = dtypes or (("bf16", "fp16", "fp8") if kind == "cuda" else ("fp32", "bf16"))
    started = time.perf_counter()
    if kind == "cuda":
        name = torch.cuda.get_device_name(0)
        free, total = (int(x) for x in torch.cuda.mem_get_info(0))
    else:
        name = cpu_name()
        total, free = _host_memory()
    bandwidth = _copy_bandwidth(torch, kind, sizes)
    flops: dict[str, float] = {}
    matmul_n: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for dtype in dtypes:
        try:
            flops[dtype], matmul_n[dtype] = _matmul_flops(torch, kind, dtype, sizes)
        except Exception as exc:  # a dtype this device or build cannot run
            first = (str(exc).strip().splitlines() or [""])[0]
            skipped[dtype] = f"{type(exc).__name__}: {first}".rstrip(": ")
    key = device_key(name if kind == "cuda" else "cpu " + name)
    return ProbeResult(
        device_key=key,
        device_name=name,
        kind=kind,
        memory_bandwidth=bandwidth,
        peak_flops=flops,
        memory_total_bytes=total,
        memory_free_bytes=free,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        torch_version=str(torch.__version__),
        sizes=sizes,
        matmul_n=matmul_n,
        seconds=time.perf_counter() - started,
        skipped=skipped,
    )


def _host_memory() -> tuple[int, int]:
    """(total, available) bytes of host memory; total capped by a cgroup limit."""
    import psutil

    vm = psutil.virtual_memory()
    total = min(int(vm.total), host_memory_bytes() or int(vm.total))
    return total, min(int(vm.available), total)


def best_seconds(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    """The fastest of ``repeats`` timed runs of ``fn`` after one warm-up (``sync`` waits for
    the device); the best run is the one least disturbed by anything else on the machine."""
    fn()
    sync()
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def _sync(torch: Any, kind: str) -> Callable[[], None]:
    return torch.cuda.synchronize if kind == "cuda" else (lambda: None)


def _copy_bandwidth(torch: Any, kind: str, sizes: ProbeSizes) -> float:
    """Bytes/s of ``dst.copy_(src)``, counting the read and the write."""
    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=kind)
    src.fill_(1)  # touch every page before timing, so first-touch faults are not measured
    dst = torch.empty_like(src)
    dst.fill_(0)
    seconds = best_seconds(lambda: dst.copy_(src), _sync(torch, kind), sizes.repeats)
    return 2 * sizes.copy_bytes / seconds


_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MATMUL_TARGET_S = 0.25
"""About how long one timed matmul of the probe takes (at most ``ProbeSizes.matmul_n``)."""


def _matmul_flops(torch: Any, kind: str, dtype: str, sizes: ProbeSizes) -> tuple[float, int]:
    """(2 n^3 / the best time of an n x n by n x n matmul in ``dtype``, n). n starts at 256 and
    doubles, up to ``sizes.matmul_n``, while one matmul takes under an eighth of
    :data:`MATMUL_TARGET_S` (a CPU without bf16 units is 50x slower at bf16 than at fp32: the
    probe must not spend a minute finding that out)."""
    sync = _sync(torch, kind)
    n = min(256, sizes.matmul_n)
    fn = _matmul(torch, kind, dtype, n)
    seconds = best_seconds(fn, sync, 2)
    while n < sizes.matmul_n and seconds < MATMUL_TARGET_S / 8:
        n = min(sizes.matmul_n, 2 * n)
        fn = _matmul(torch, kind, dtype, n)
        seconds = best_seconds(fn, sync, 2)
    if sizes.repeats > 2:
        seconds = min(seconds, best_seconds(fn, sync, sizes.repeats - 2))
    return 2.0 * n**3 / seconds, n


def _matmul(torch: Any, kind: str, dtype: str, n: int) -> Callable[[], object]:
    if dtype == "fp8":
        return _fp8_matmul(torch, kind, n)
    tdtype = getattr(torch, _TORCH_DTYPES[dtype])
    a = torch.randn(n, n, device=kind).to(tdtype)
    b = torch.randn(n, n, device=kind).to(tdtype)
    return lambda: a @ b


def _fp8_matmul(torch: Any, kind: str, n: int) -> Callable[[], object]:
    """An e4m3 matmul with per-tensor scales and bf16 output, as vLLM's fp8 linear layers
    run it (``torch._scaled_mm``; the second operand column-major). GPUs of compute
    capability 8.9+ only."""
    if kind != "cuda":
        raise RuntimeError("fp8 matmul is probed on GPUs only")
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (8, 9):
        raise RuntimeError(f"compute capability {major}.{minor} < 8.9 has no fp8 tensor cores")
    a = torch.randn(n, n, device=kind).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=kind).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=kind, dtype=torch.float32)

    def fn() -> object:
        return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    fn()  # fail here, inside the caller's try, when this build cannot run it
    return fn


# --- the command's job ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRun:
    """What ``vtune probe`` did: the result, where it was cached, the registry entry it is
    compared with (None for the CPU, whose registry figures are nominal) and a warning when
    the measured card is not the one asked for."""

    result: ProbeResult
    path: Path
    spec: GpuSpec | None
    warning: str | None = None

    def comparison(self) -> list[tuple[str, float, float | None]]:
        """Rows ``(quantity, measured, datasheet or None)``: "bandwidth" then each dtype."""
        spec = self.spec
        rows: list[tuple[str, float, float | None]] = [
            ("bandwidth", self.result.memory_bandwidth, spec.memory_bandwidth if spec else None)
        ]
        for dtype, measured in self.result.peak_flops.items():
            sheet = spec.peak_flops.get(dtype) if spec else None
            rows.append((dtype, measured, sheet))
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "probe": self.result.to_json(),
            "cache_path": str(self.path),
            "datasheet": None if self.spec is None else self.spec.name,
            "fractions_of_datasheet": {
                name: measured / sheet for name, measured, sheet in self.comparison() if sheet
            },
            "warning": self.warning,
        }


def run_probe(
    gpu_name: str | None = None,
    *,
    sizes: ProbeSizes | None = None,
    env: Mapping[str, str] | None = None,
) -> ProbeRun:
    """Probe the device vtune would tune and cache the result. ``gpu_name`` "cpu" probes the
    CPU even where there is a GPU; a registry GPU name needs CUDA (UnsupportedError without)
    and is the datasheet the measurement is compared with; None picks CUDA when available,
    compared with the registry entry of the card found, if any."""
    try:
        import torch
    except ImportError:
        raise UnsupportedError("vtune probe measures with torch, which is not installed") from None
    spec = get_gpu(gpu_name) if gpu_name else None
    if spec is not None and not spec.is_cpu and not torch.cuda.is_available():
        raise UnsupportedError(
            f"--gpu {spec.name} asks for a CUDA device, and torch sees none "
            "(torch.cuda.is_available() is False); use --gpu cpu to probe the CPU"
        )
    kind = "cpu" if (spec is not None and spec.is_cpu) or not torch.cuda.is_available() else "cuda"
    result = probe(kind, sizes)
    warning = None
    if kind == "cuda":
        found = match_detected(DetectedGpu(0, result.device_name, result.memory_total_bytes))
        if spec is None:
            spec = found
        elif found is None or found.name != spec.name:
            warning = (
                f"--gpu {spec.name}, but CUDA device 0 is '{result.device_name}'; "
                f"the datasheet figures shown are {spec.name}'s"
            )
    return ProbeRun(result, save_probe(result, env), None if kind == "cpu" else spec, warning)
