"""Where a measured load point sits on the roofline (pure; no I/O).

A decode step at batch B reads the weights once and the KV cache of every sequence in the
batch, and does about 2 x P_active x B FLOPs. From a load point's measured output tokens/s and
its mean batch (vLLM's ``num_requests_running``, or the client's mean concurrency when that is
all there is):

    decode steps/s     = output tokens/s / B
    bytes per step     = W_read(B) + B x C x kv_bytes_per_token      (C: mean context, tokens)
    achieved bandwidth = bytes per step x steps/s
    achieved FLOP/s    = 2 x P_active x B x steps/s  (= 2 x P_active x output tokens/s)
    fractions          = achieved / peak (the probed peaks where there are some, else datasheet)

and a regime (:func:`classify`): the resource nearer its peak is the bound when it is at least
:data:`HIGH_FRACTION` of it; when neither is, the step is spent elsewhere (scheduling,
sampling, Python, launches): ``overhead-bound``. Prefill work is not counted: the figures are a
decode roofline, exact for long outputs and an underestimate of FLOPs when prompts dominate.
When ``B`` is a mean over a window in which the server sometimes idled, steps/s is the rate
while busy (tokens/s = rate x mean running holds over idle periods too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuner.analytic.estimate import KV_DTYPE_BYTES
from tuner.analytic.formulas import kv_bytes_per_token
from tuner.analytic.weights import resolve_scheme, step_weight_read_bytes
from tuner.errors import ParameterError, UnsupportedError
from tuner.specs.gpu import GpuSpec
from tuner.specs.model import ModelSpec

if TYPE_CHECKING:
    from tuner.specs.probe import ProbeResult

HIGH_FRACTION = 0.5
"""A resource used at or above this fraction of its peak bounds the step. Decode kernels reach
0.7-0.8 of the datasheet bandwidth and 0.6-0.7 of the dense peak (``Efficiency``'s calibration),
so a step that reaches half of neither is dominated by something other than its kernels."""

MEMORY_BOUND = "memory-bound"
COMPUTE_BOUND = "compute-bound"
OVERHEAD_BOUND = "overhead-bound"
REGIMES = (MEMORY_BOUND, COMPUTE_BOUND, OVERHEAD_BOUND)


@dataclass(frozen=True)
class Peaks:
    """The ceilings a point is measured against: bytes/s and FLOP/s of all devices serving it
    together, and where they came from ("datasheet" or "probe")."""

    bandwidth_bytes_per_s: float
    flops_per_s: float
    source: str = "datasheet"

    def __post_init__(self) -> None:
        if not (self.bandwidth_bytes_per_s > 0 and self.flops_per_s > 0):
            raise ParameterError(
                f"roofline peaks must be positive, got {self.bandwidth_bytes_per_s} B/s and "
                f"{self.flops_per_s} FLOP/s"
            )

    @classmethod
    def from_gpu(cls, gpu: GpuSpec, compute_dtype: str = "bf16", devices: int = 1) -> Peaks:
        """The registry's dense datasheet peaks of ``devices`` cards (tensor parallel size)."""
        return cls(
            gpu.memory_bandwidth * devices, gpu.flops_for(compute_dtype) * devices, "datasheet"
        )

    @classmethod
    def from_probe(cls, probe: ProbeResult, compute_dtype: str = "bf16", devices: int = 1) -> Peaks:
        """The peaks ``vtune probe`` measured on one device, times ``devices``; fp16 and bf16
        stand in for each other. UnsupportedError when the probe has no figure for the dtype."""
        flops = probe.peak_flops.get(compute_dtype)
        if flops is None:
            flops = probe.peak_flops.get({"bf16": "fp16", "fp16": "bf16"}.get(compute_dtype, ""))
        if flops is None:
            have = ", ".join(sorted(probe.peak_flops)) or "none"
            raise UnsupportedError(
                f"the probe of {probe.device_name} has no {compute_dtype} FLOP/s (it has: {have})"
            )
        return cls(probe.memory_bandwidth * devices, flops * devices, "probe")


@dataclass(frozen=True)
class StepInputs:
    """What one decode step moves and computes, from the model: weight bytes read at this
    batch, KV bytes per token of context (all layers, all devices), active parameters."""

    weight_read_bytes: float
    kv_bytes_per_token: int
    active_params: int


@dataclass(frozen=True)
class RooflinePoint:
    """One load point on the roofline; see the module docstring for the formulas."""

    batch: float
    decode_steps_per_s: float
    bytes_per_step: float
    flops_per_step: float
    achieved_bandwidth_bytes_per_s: float
    achieved_flops_per_s: float
    bandwidth_fraction: float
    flops_fraction: float
    regime: str

    def to_json(self) -> dict[str, Any]:
        return {
            "achieved_bandwidth_bytes_per_s": self.achieved_bandwidth_bytes_per_s,
            "achieved_flops_per_s": self.achieved_flops_per_s,
            "bandwidth_fraction": self.bandwidth_fraction,
            "flops_fraction": self.flops_fraction,
            "regime": self.regime,
            "decode_steps_per_s": self.decode_steps_per_s,
            "bytes_per_step": self.bytes_per_step,
            "batch": self.batch,
        }


def classify(bandwidth_fraction: float, flops_fraction: float, high: float = HIGH_FRACTION) -> str:
    """``memory-bound`` when the bandwidth fraction is >= ``high`` and >= the FLOP fraction,
    ``compute-bound`` when the FLOP fraction is >= ``high`` and above it, else
    ``overhead-bound``."""
    if max(bandwidth_fraction, flops_fraction) < high:
        return OVERHEAD_BOUND
    return MEMORY_BOUND if bandwidth_fraction >= flops_fraction else COMPUTE_BOUND


def roofline_point(
    *,
    output_tokens_per_s: float,
    mean_batch: float,
    weight_read_bytes: float,
    kv_bytes_per_token: float,
    mean_context: float,
    active_params: float,
    peaks: Peaks,
    high: float = HIGH_FRACTION,
) -> RooflinePoint | None:
    """The roofline figures of one load point, or None when nothing was decoded (no output
    tokens or an empty batch). Byte and parameter counts are for the whole model across its
    devices, and ``peaks`` for all devices together. Negative inputs are a ParameterError."""
    named = {
        "output_tokens_per_s": output_tokens_per_s,
        "mean_batch": mean_batch,
        "weight_read_bytes": weight_read_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "mean_context": mean_context,
        "active_params": active_params,
    }
    for name, value in named.items():
        if not value >= 0:  # also catches NaN
            raise ParameterError(f"roofline: {name} must be >= 0, got {value}")
    if output_tokens_per_s == 0 or mean_batch == 0:
        return None
    steps = output_tokens_per_s / mean_batch
    step_bytes = weight_read_bytes + mean_batch * mean_context * kv_bytes_per_token
    step_flops = 2.0 * active_params * mean_batch
    bandwidth = step_bytes * steps
    flops = step_flops * steps
    bw_frac = bandwidth / peaks.bandwidth_bytes_per_s
    fl_frac = flops / peaks.flops_per_s
    return RooflinePoint(
        batch=mean_batch,
        decode_steps_per_s=steps,
        bytes_per_step=step_bytes,
        flops_per_step=step_flops,
        achieved_bandwidth_bytes_per_s=bandwidth,
        achieved_flops_per_s=flops,
        bandwidth_fraction=bw_frac,
        flops_fraction=fl_frac,
        regime=classify(bw_frac, fl_frac, high),
    )


def step_inputs(
    model: ModelSpec,
    batch: float,
    *,
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
) -> StepInputs:
    """The model's side of :func:`roofline_point` at a (mean) batch, from the estimator's own
    building blocks: ``step_weight_read_bytes`` (MoE: the experts a batch of that size
    touches, at the batch rounded to a whole one, at least 1), ``kv_bytes_per_token`` and the
    active parameter count."""
    if kv_cache_dtype not in KV_DTYPE_BYTES:
        raise ParameterError(
            f"unknown --kv-cache-dtype {kv_cache_dtype!r}; choose from {', '.join(KV_DTYPE_BYTES)}"
        )
    scheme = resolve_scheme(model, quantization)
    return StepInputs(
        weight_read_bytes=step_weight_read_bytes(model, scheme, max(1, round(batch))),
        kv_bytes_per_token=kv_bytes_per_token(model, KV_DTYPE_BYTES[kv_cache_dtype]),
        active_params=model.active_param_count,
    )


def model_roofline_point(
    model: ModelSpec,
    peaks: Peaks,
    *,
    output_tokens_per_s: float,
    mean_batch: float,
    mean_context: float,
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
    high: float = HIGH_FRACTION,
) -> RooflinePoint | None:
    """:func:`roofline_point` with the byte and parameter counts taken from ``model``."""
    inputs = step_inputs(
        model, mean_batch, quantization=quantization, kv_cache_dtype=kv_cache_dtype
    )
    return roofline_point(
        output_tokens_per_s=output_tokens_per_s,
        mean_batch=mean_batch,
        weight_read_bytes=inputs.weight_read_bytes,
        kv_bytes_per_token=inputs.kv_bytes_per_token,
        mean_context=mean_context,
        active_params=inputs.active_params,
        peaks=peaks,
        high=high,
    )
