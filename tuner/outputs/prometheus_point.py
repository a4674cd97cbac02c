"""Gauges of one load point's telemetry and roofline, shared by the search's and the bench's
exporters (each keeps them in its own registry).

=================================================  ===========================================
vtune_telemetry_cpu_percent                        mean CPU of the vLLM process tree over the
                                                   point (100 = one core busy)
vtune_telemetry_rss_bytes                          mean resident memory of that tree
vtune_gpu_utilization_ratio                        NVML kernel-busy fraction (0-1), mean of GPUs
vtune_gpu_memory_controller_utilization_ratio      NVML memory-controller busy fraction (0-1)
vtune_gpu_power_watts                              board power, summed over the GPUs
vtune_gpu_sm_active_ratio                          DCGM SM activity (0-1; with --dcgm-url)
vtune_gpu_dram_active_ratio                        DCGM DRAM activity (0-1; with --dcgm-url)
vtune_bandwidth_fraction                           achieved / peak memory bandwidth (roofline)
vtune_flops_fraction                               achieved / peak FLOP/s (roofline)
vtune_achieved_bandwidth_bytes_per_second          bytes a decode step moves x steps per second
vtune_achieved_flops_per_second                    2 x active params x output tokens/s
vtune_decode_batch                                 the point's mean batch (running requests)
vtune_regime{regime}                               1 for the point's regime, 0 for the others
=================================================  ===========================================

A figure the point does not have (no GPU, no DCGM, nothing decoded) reads NaN, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from tuner.analytic.roofline import REGIMES
from tuner.outputs.prometheus_serve import set_gauge

# gauge name -> (help, telemetry mean key, scale to the gauge's unit)
TELEMETRY_GAUGES: dict[str, tuple[str, str, float]] = {
    "vtune_telemetry_cpu_percent": (
        "Mean CPU of the vLLM process tree over the last load point (100 = one core busy)",
        "cpu_percent_total",
        1.0,
    ),
    "vtune_telemetry_rss_bytes": (
        "Mean resident memory of the vLLM process tree over the last load point",
        "rss_bytes_total",
        1.0,
    ),
    "vtune_gpu_utilization_ratio": (
        "NVML kernel-busy fraction of the last load point (0-1, mean over GPUs)",
        "gpu_util_percent",
        0.01,
    ),
    "vtune_gpu_memory_controller_utilization_ratio": (
        "NVML memory-controller busy fraction of the last load point (0-1, mean over GPUs)",
        "mem_util_percent",
        0.01,
    ),
    "vtune_gpu_power_watts": (
        "Board power over the last load point (sum over GPUs)",
        "power_w",
        1.0,
    ),
    "vtune_gpu_sm_active_ratio": (
        "DCGM SM activity of the last load point (0-1, mean over GPUs)",
        "dcgm_sm_active",
        1.0,
    ),
    "vtune_gpu_dram_active_ratio": (
        "DCGM DRAM activity of the last load point (0-1, mean over GPUs)",
        "dcgm_dram_active",
        1.0,
    ),
}

# gauge name -> (help, roofline key)
ROOFLINE_GAUGES: dict[str, tuple[str, str]] = {
    "vtune_bandwidth_fraction": (
        "Achieved / peak memory bandwidth of the last load point",
        "bandwidth_fraction",
    ),
    "vtune_flops_fraction": ("Achieved / peak FLOP/s of the last load point", "flops_fraction"),
    "vtune_achieved_bandwidth_bytes_per_second": (
        "Memory bandwidth the last load point's decode steps achieved",
        "achieved_bandwidth_bytes_per_s",
    ),
    "vtune_achieved_flops_per_second": (
        "FLOP/s the last load point's decode steps achieved",
        "achieved_flops_per_s",
    ),
    "vtune_decode_batch": ("Mean batch (running requests) of the last load point", "batch"),
}


class PointGauges:
    """The gauges of the module table in ``registry``; :meth:`set` shows one point."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.telemetry = {
            name: Gauge(name, text, registry=registry)
            for name, (text, _, _) in TELEMETRY_GAUGES.items()
        }
        self.roofline = {
            name: Gauge(name, text, registry=registry)
            for name, (text, _) in ROOFLINE_GAUGES.items()
        }
        self.regime = Gauge(
            "vtune_regime",
            "1 for the last load point's roofline regime",
            ["regime"],
            registry=registry,
        )
        self.clear()

    def clear(self) -> None:
        """Every figure NaN, every regime 0."""
        for gauge in (*self.telemetry.values(), *self.roofline.values()):
            gauge.set(math.nan)
        for regime in REGIMES:
            self.regime.labels(regime).set(0)

    def set(self, telemetry: Mapping[str, Any] | None, roofline: Mapping[str, Any] | None) -> None:
        """Show one point: its ``telemetry`` block (the means) and its ``roofline`` block, as
        a point's JSON holds them. Missing figures read NaN; never raises on odd values."""
        means = (telemetry or {}).get("mean")
        means = means if isinstance(means, Mapping) else {}
        for name, (_, key, scale) in TELEMETRY_GAUGES.items():
            value = means.get(key)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            set_gauge(self.telemetry[name], value * scale if ok else None)
        roof = roofline or {}
        for name, (_, key) in ROOFLINE_GAUGES.items():
            set_gauge(self.roofline[name], roof.get(key))
        current = roof.get("regime")
        for regime in REGIMES:
            self.regime.labels(regime).set(1 if regime == current else 0)
