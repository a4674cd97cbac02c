"""NVIDIA telemetry sources for :class:`tuner.measure.telemetry.Sampler`: NVML and dcgm-exporter.

:class:`NvmlSource` reads NVML through ``nvidia-ml-py`` (import name ``pynvml``, optional) for
the GPUs the server uses. Per GPU ``gpu<i>/<key>`` and, over them, the totals:

- ``gpu_util_percent``: percent of the last sample period in which a kernel ran (mean over GPUs);
- ``mem_util_percent``: memory-controller busy percent (mean);
- ``memory_used_bytes``: device memory in use (sum);
- ``power_w``: board power in watts (sum; NVML reports milliwatts);
- ``sm_clock_mhz``: SM clock (mean; a falling clock under load is power or thermal throttling).

A metric the card does not report (power on some boards, everything on a MIG slice) is left out
and reported once as an error; the rest are still sampled.

:func:`scrape_dcgm` reads a dcgm-exporter ``/metrics`` page for the profiling ratios NVML lacks
(``DCGM_FI_PROF_SM_ACTIVE``, ``..._DRAM_ACTIVE``, ``..._PIPE_TENSOR_ACTIVE``: fractions 0-1 of
the sample period); :class:`DcgmSource` samples it. Both need dcgm-exporter running beside the
server (the Kubernetes deployment's DaemonSet); without one, don't sample it.
"""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tuner.measure.telemetry import PART_SEP

NVML_KEYS = ("gpu_util_percent", "mem_util_percent", "memory_used_bytes", "power_w", "sm_clock_mhz")
_SUMMED = frozenset({"memory_used_bytes", "power_w"})  # the other totals are means over GPUs

DCGM_FIELDS = {
    "DCGM_FI_PROF_SM_ACTIVE": "dcgm_sm_active",
    "DCGM_FI_PROF_DRAM_ACTIVE": "dcgm_dram_active",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "dcgm_tensor_active",
}
"""dcgm-exporter metric -> telemetry key (all fractions 0-1; totals are means over GPUs)."""
DCGM_TIMEOUT_S = 2.0


def cuda_visible_devices(env: Mapping[str, str] | None = None) -> list[int | str] | None:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` names: indices as ints, UUIDs ("GPU-…", "MIG-…") as
    strings; None when unset (every GPU). NVML numbers GPUs in PCI bus order, as CUDA does
    with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (set by the NVIDIA device plugin on Kubernetes)."""
    raw = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    out: list[int | str] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        if item.isdigit():
            out.append(int(item))
        elif item.startswith(("GPU-", "MIG-")):
            out.append(item)
        else:  # CUDA stops at the first entry it cannot read
            break
    return out


class NvmlSource:
    """NVML readings of ``devices`` (NVML indices or UUIDs; None: ``CUDA_VISIBLE_DEVICES``,
    else every GPU). ``nvml`` is the ``pynvml`` module, injectable for tests; by default it is
    imported in :meth:`start`, which raises ImportError without ``nvidia-ml-py`` (the sampler
    counts it)."""

    def __init__(self, devices: Sequence[int | str] | None = None, *, nvml: Any = None) -> None:
        self._requested = None if devices is None else list(devices)
        self._nvml = nvml
        self._handles: list[tuple[str, Any]] = []
        self._unsupported: set[tuple[str, str]] = set()
        self._pending: list[str] = []
        self._initialised = False
        shown = "all" if devices is None else ",".join(str(d) for d in devices)
        self.device = f"cuda:{shown}"

    def start(self) -> None:
        if self._nvml is None:
            import pynvml  # nvidia-ml-py; optional

            self._nvml = pynvml
        nv = self._nvml
        nv.nvmlInit()
        self._initialised = True
        devices = self._requested
        if devices is None:
            devices = cuda_visible_devices()
        if devices is None:
            devices = list(range(nv.nvmlDeviceGetCount()))
        self._handles = []
        for dev in devices:
            if isinstance(dev, int):
                self._handles.append((f"gpu{dev}", nv.nvmlDeviceGetHandleByIndex(dev)))
                continue
            handle = nv.nvmlDeviceGetHandleByUUID(dev)
            try:
                name = f"gpu{nv.nvmlDeviceGetIndex(handle)}"
            except Exception:  # a MIG slice has no device index of its own
                name = dev
            self._handles.append((name, handle))
        self.device = "cuda:" + ",".join(name.removeprefix("gpu") for name, _ in self._handles)

    def _one(self, name: str, handle: Any) -> dict[str, float]:
        nv = self._nvml
        readers = {
            "utilization": lambda: nv.nvmlDeviceGetUtilizationRates(handle),
            "memory_used_bytes": lambda: float(nv.nvmlDeviceGetMemoryInfo(handle).used),
            "power_w": lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "sm_clock_mhz": lambda: float(nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM)),
        }
        out: dict[str, float] = {}
        for key, read in readers.items():
            try:
                value = read()
            except Exception as exc:
                self._unsupported_once(name, key, exc)
                continue
            if key == "utilization":
                out["gpu_util_percent"] = float(value.gpu)
                out["mem_util_percent"] = float(value.memory)
            else:
                out[key] = value
        return out

    def _unsupported_once(self, name: str, key: str, exc: Exception) -> None:
        if (name, key) not in self._unsupported:
            self._unsupported.add((name, key))
            self._pending.append(f"NVML {name} {key}: {type(exc).__name__}: {exc}")

    def read(self) -> dict[str, float]:
        per_gpu = {name: self._one(name, handle) for name, handle in self._handles}
        return combine_parts(per_gpu, _SUMMED)

    def errors(self) -> list[str]:
        pending, self._pending = self._pending, []
        return pending

    def close(self) -> None:
        if self._initialised:
            self._initialised = False
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


def combine_parts(
    per_part: Mapping[str, Mapping[str, float]], summed: frozenset[str] = frozenset()
) -> dict[str, float]:
    """Per-part readings as one flat reading: every ``part/key``, and per key the total over
    the parts that have it (a sum for keys in ``summed``, else the mean)."""
    out: dict[str, float] = {}
    columns: dict[str, list[float]] = {}
    for part, values in per_part.items():
        for key, value in values.items():
            out[f"{part}{PART_SEP}{key}"] = value
            columns.setdefault(key, []).append(value)
    for key, values in columns.items():
        out[key] = sum(values) if key in summed else sum(values) / len(values)
    return out


# --- dcgm-exporter -----------------------------------------------------------------------------


def parse_dcgm(text: str, gpus: Sequence[int | str] | None = None) -> dict[str, float]:
    """The DCGM profiling ratios in a dcgm-exporter page, per GPU (``gpu<i>/dcgm_sm_active``)
    and as means over GPUs (``dcgm_sm_active``). ``gpus`` keeps only those GPUs (the ``gpu``
    label's index, or the ``UUID`` label); None keeps all. Other metrics are ignored."""
    wanted = None if gpus is None else {str(g) for g in gpus}
    per_gpu: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        key = DCGM_FIELDS.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            index = sample.labels.get("gpu", "")
            uuid = sample.labels.get("UUID", "")
            if wanted is not None and index not in wanted and uuid not in wanted:
                continue
            per_gpu.setdefault(f"gpu{index}", {})[key] = float(sample.value)
    return combine_parts(per_gpu)


def scrape_dcgm(
    url: str, gpus: Sequence[int | str] | None = None, timeout_s: float = DCGM_TIMEOUT_S
) -> dict[str, float]:
    """GET a dcgm-exporter ``/metrics`` URL and :func:`parse_dcgm` it. Raises on a network
    error or a non-200 answer (the sampler counts it)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return parse_dcgm(resp.read().decode("utf-8", "replace"), gpus)


class DcgmSource:
    """:func:`scrape_dcgm` as a sampler source (one GET per reading; keep the period >= the
    exporter's collection interval, 1 s by default, or readings repeat)."""

    def __init__(
        self, url: str, gpus: Sequence[int | str] | None = None, timeout_s: float = DCGM_TIMEOUT_S
    ) -> None:
        self.url = url
        self.gpus = None if gpus is None else list(gpus)
        self.timeout_s = timeout_s
        self.device = f"dcgm:{url}"

    def start(self) -> None:
        pass

    def read(self) -> dict[str, float]:
        return scrape_dcgm(self.url, self.gpus, self.timeout_s)

    def errors(self) -> list[str]:
        return []

    def close(self) -> None:
        pass
