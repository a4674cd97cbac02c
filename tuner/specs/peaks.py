"""Which ceilings vtune uses for a device: the figures ``vtune probe`` measured here, else the
registry's datasheet figures, and a record of which (``PeakFigures.to_json()``).

``vtune estimate``, ``search`` and ``bench`` call :func:`with_peaks` on the registry entry: when
a probe of that device is cached (:mod:`tuner.specs.probe`), the entry comes back with the
probed memory bandwidth and FLOP/s in place of the datasheet's, so every formula downstream
(the knee, the predicted step times, each load point's roofline) uses measured figures.

How a probe becomes a registry entry's figures:

- bandwidth: the probe's copy bandwidth (reads plus writes);
- FLOP/s of each dtype the probe timed (bf16, fp16, fp8 on a GPU);
- on a CPU, bf16 and fp16 are the faster of the probe's bf16 and fp32 rates: on a CPU without
  bf16 units (no AVX-512-BF16 or AMX), torch's own bf16 matmul falls back to a slow loop,
  while vLLM's CPU GEMMs (oneDNN) convert to fp32 and run at the fp32 rate. A decode on such
  a CPU does reach more FLOP/s than the bf16 probe (seen on a 2-core AVX2 EPYC: the demo's
  2,930 tok/s x 2 x 2.2 M active parameters = 13 GFLOP/s, against a 2 GFLOP/s bf16 matmul and
  128 GFLOP/s in fp32), so the bf16 figure alone cannot be its ceiling;
- a dtype the probe did not time (int8; fp8 where it was skipped) keeps its datasheet ratio
  to bf16, scaled by the probed bf16 rate; a dtype the datasheet lacks stays absent (the
  registry's keys say what the card supports).

Which cached probe belongs to an entry: on the CPU, this host's
(:func:`~tuner.specs.probe.local_device_key`); for a GPU, the newest cached CUDA probe whose
card the registry matches to that entry (``match_detected``), so an estimate for an H100 on a
machine that probed an A100 keeps the H100's datasheet.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from tuner.specs.detect import DetectedGpu, match_detected
from tuner.specs.gpu import GpuSpec
from tuner.specs.probe import ProbeResult, cache_dir, load_probe, local_device_key

log = logging.getLogger(__name__)

PROBE = "probe"
DATASHEET = "datasheet"


@dataclass(frozen=True)
class PeakFigures:
    """The ceilings in use for one device and where they came from. ``flops`` is by compute
    dtype (the registry's keys); ``measured_at`` and ``device`` are the probe's (None for the
    datasheet)."""

    source: str
    memory_bandwidth: float
    flops: Mapping[str, float] = field(hash=False)
    measured_at: str | None = None
    device: str | None = None

    @property
    def probed(self) -> bool:
        return self.source == PROBE

    def to_json(self, compute_dtype: str | None = None) -> dict[str, Any]:
        """``{source, measured_at, device, memory_bandwidth, flops, flops_by_dtype}``;
        ``flops`` is the figure of ``compute_dtype`` (bf16 when not given)."""
        dtype = compute_dtype or "bf16"
        return {
            "source": self.source,
            "measured_at": self.measured_at,
            "device": self.device,
            "memory_bandwidth": self.memory_bandwidth,
            "flops": self.flops.get(dtype, self.flops.get("bf16")),
            "compute_dtype": dtype,
            "flops_by_dtype": dict(self.flops),
        }


def datasheet_figures(spec: GpuSpec) -> PeakFigures:
    """The registry's own figures of ``spec``."""
    return PeakFigures(DATASHEET, spec.memory_bandwidth, dict(spec.peak_flops))


def probed_flops(probe: ProbeResult, spec: GpuSpec) -> dict[str, float]:
    """FLOP/s per registry dtype of ``spec`` from ``probe`` (see the module docstring)."""
    timed = dict(probe.peak_flops)
    if probe.kind == "cpu" and "fp32" in timed:
        fastest = max(timed.get("bf16", 0.0), timed["fp32"])
        timed["bf16"] = timed["fp16"] = fastest
    if "bf16" not in timed and "fp16" in timed:
        timed["bf16"] = timed["fp16"]
    if "fp16" not in timed and "bf16" in timed:
        timed["fp16"] = timed["bf16"]
    sheet = spec.peak_flops
    scale = timed["bf16"] / sheet["bf16"] if "bf16" in timed and sheet.get("bf16") else None
    out: dict[str, float] = {}
    for dtype, figure in sheet.items():
        if dtype in timed:
            out[dtype] = timed[dtype]
        elif scale is not None:
            out[dtype] = figure * scale
    return out


def probe_for(spec: GpuSpec, env: Mapping[str, str] | None = None) -> ProbeResult | None:
    """The cached probe that measured a device of ``spec``'s kind, or None (see the module
    docstring). Unreadable cache files are skipped (``load_probe`` warns once each)."""
    if spec.is_cpu:
        found = load_probe(local_device_key("cpu"), env)
        return found if found is not None and found.kind == "cpu" else None
    directory = cache_dir(env)
    if not directory.is_dir():
        return None
    matches = []
    for path in sorted(directory.glob("*.json")):
        found = load_probe(path.stem, env)
        if found is None or found.kind != "cuda":
            continue
        card = match_detected(DetectedGpu(0, found.device_name, found.memory_total_bytes))
        if card is not None and card.name == spec.name:
            matches.append(found)
    return max(matches, key=lambda p: p.measured_at) if matches else None


def with_peaks(
    spec: GpuSpec, env: Mapping[str, str] | None = None, *, use_probe: bool = True
) -> tuple[GpuSpec, PeakFigures]:
    """``spec`` with the probed bandwidth and FLOP/s when a probe of it is cached (and
    ``use_probe``), else unchanged; and the figures in use with their source."""
    probe = probe_for(spec, env) if use_probe else None
    if probe is None:
        return spec, datasheet_figures(spec)
    flops = probed_flops(probe, spec)
    if "bf16" not in flops:  # a probe with no usable matmul figure: the datasheet stands
        log.warning("the probe of %s has no bf16/fp16 figure; using datasheet peaks", spec.name)
        return spec, datasheet_figures(spec)
    probed = replace(
        spec, memory_bandwidth=probe.memory_bandwidth, peak_flops=MappingProxyType(flops)
    )
    figures = PeakFigures(
        PROBE, probe.memory_bandwidth, flops, probe.measured_at, probe.device_name
    )
    return probed, figures


def probed_gpu(name: str, env: Mapping[str, str] | None = None) -> tuple[GpuSpec, PeakFigures]:
    """``get_gpu(name)`` with :func:`with_peaks` applied."""
    from tuner.specs.gpu import get_gpu

    return with_peaks(get_gpu(name), env)
