"""The analytic model (pure functions, no I/O): memory, KV cache, capacity, roofline.

Each formula is stated in the docstring of the function that computes it; each result carries an
``explain`` list that shows the formula with its values, which ``vtune estimate --explain`` prints.

Calibratable constants are the fields of :class:`Efficiency` and :class:`Overheads`; their
defaults are documented where they are defined and can be fitted from measured trials.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from tuner.analytic.formulas import (
    activation_bytes,
    kv_bytes_per_sequence,
    kv_bytes_per_token,
    kv_capacity_tokens,
    naive_max_batch,
    roofline_knee,
)
from tuner.analytic.weights import (
    HALF,
    QuantScheme,
    WeightBytes,
    resolve_scheme,
    step_weight_read_bytes,
    weight_bytes,
)
from tuner.errors import ParameterError, UnsupportedError
from tuner.specs.gpu import GpuSpec
from tuner.specs.knobs import find_knob
from tuner.specs.model import ModelSpec
from tuner.specs.vllm_defaults import vllm_defaults

GiB = 2**30
# On vLLM CPU the pool is fixed by --kv-cache-memory-bytes; 1 GiB is plenty for the tiny
# model and leaves the NUMA node's memory to everything else. vtune's choice, not vLLM's.
CPU_DEFAULT_KV_CACHE_BYTES = GiB
VLLM = vllm_defaults()  # what vLLM uses for knobs left unset (tuner.specs.vllm_defaults)
KV_DTYPE_BYTES = {
    "auto": HALF,
    "bfloat16": 2,
    "float16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
}


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet peaks a decode step reaches, and its fixed cost.

    Calibrated on an H100 SXM (benchmarks/gpu_roofline.py, 2026-11-25): one decode step of
    Llama-3.1-8B's matmuls in a CUDA graph read its 15.0 GB of weights at 76 % of the 3.35 TB/s
    datasheet bandwidth (5.9 ms at batch 1) and reached 65 % of the 989 TFLOP/s dense bf16 peak
    at batch 1024-2048; the measured knee, 254, matched these factors (252). The fixed cost per
    step (scheduling, sampling, launches outside the graph) is a typical vLLM figure.
    Only the predicted step times use these; ``roofline_knee_batch`` uses the peaks.
    """

    memory_bandwidth: float = 0.76
    compute: float = 0.65
    step_overhead_s: float = 0.002


@dataclass(frozen=True)
class Overheads:
    """Memory vLLM holds besides weights and KV on a GPU.

    non_torch_bytes: CUDA context, NCCL and allocator slack measured outside torch (~0.5-1 GiB).
    cuda_graph_bytes: captured CUDA graphs (vLLM logs "took X GiB" after capture).
    Activations are not a constant: see :func:`activation_bytes`.
    """

    non_torch_bytes: int = int(0.75 * GiB)
    cuda_graph_bytes: int = int(0.5 * GiB)


@dataclass(frozen=True)
class ServingConfig:
    """The vLLM settings an estimate depends on: knobs of ``tuner.specs.knobs`` (plus
    ``context_len``, the workload's). None and the defaults here are vLLM's own defaults, from
    ``tuner.specs.vllm_defaults``."""

    max_model_len: int | None = None
    context_len: int | None = None  # S for max concurrency and KV reads; default max_model_len
    quantization: str | None = None
    kv_cache_dtype: str = VLLM.kv_cache_dtype
    gpu_memory_utilization: float = VLLM.gpu_memory_utilization
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    block_size: int | None = None  # None: the platform's (VllmDefaults.block_size_for)
    kv_cache_memory_bytes: int | None = None
    tensor_parallel_size: int = VLLM.tensor_parallel_size


@dataclass(frozen=True)
class LadderPoint:
    batch: int
    step_time_s: float
    tokens_per_s: float
    bound: str  # "memory" or "compute"
    fits_kv: bool


@dataclass(frozen=True)
class Estimate:
    """Everything ``vtune estimate`` reports; byte and count fields are exact integers."""

    model: str
    gpu: str
    quantization: str
    kv_cache_dtype: str
    max_model_len: int
    context_len: int
    block_size: int
    tensor_parallel_size: int
    param_count: int
    active_param_count: int
    weight_bytes: int
    weight_breakdown: dict[str, int]
    kv_bytes_per_token: int
    kv_bytes_per_sequence: int
    naive_max_batch: int
    gpu_memory_bytes: int
    gpu_usable_memory_bytes: int  # what the driver reports: vLLM scales this by the utilization
    activation_bytes: int
    non_torch_bytes: int
    kv_pool_bytes: int
    kv_capacity_tokens: int
    num_gpu_blocks: int
    max_concurrency: float
    max_num_batched_tokens: int
    max_num_seqs: int
    roofline_knee_batch: float | None
    roofline_knee_batch_with_kv: float | None
    ladder: tuple[LadderPoint, ...]
    # What ``tuner.analytic.explain`` needs to show the formulas with their values.
    kv_dtype_bytes: int = 2
    compute_dtype: str = "bf16"
    peak_flops: float = 0.0
    memory_bandwidth: float = 0.0
    gpu_memory_utilization: float = 0.9
    kv_pool_fixed: bool = False
    weights_from_checkpoint: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The whole estimate


def check_config(model: ModelSpec, gpu: GpuSpec, cfg: ServingConfig) -> None:
    """Raise ParameterError / UnsupportedError with one line for an impossible configuration."""
    for name in (
        "max_model_len",
        "context_len",
        "max_num_batched_tokens",
        "max_num_seqs",
        "block_size",
        "kv_cache_memory_bytes",
        "tensor_parallel_size",
    ):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            known = find_knob(name)  # context_len is vtune's own: --context-len
            flag = known.flag if known else "--" + name.replace("_", "-")
            raise ParameterError(f"{flag} must be positive, got {value}")
    if not 0.0 < cfg.gpu_memory_utilization <= 1.0:
        raise ParameterError(
            f"--gpu-memory-utilization must be in (0, 1], got {cfg.gpu_memory_utilization}"
        )
    if cfg.kv_cache_dtype not in KV_DTYPE_BYTES:
        raise ParameterError(
            f"unknown --kv-cache-dtype {cfg.kv_cache_dtype!r}; choose from "
            f"{', '.join(KV_DTYPE_BYTES)}"
        )
    if not gpu.supports_kv_cache_dtype(cfg.kv_cache_dtype):
        raise UnsupportedError(
            f"--kv-cache-dtype {cfg.kv_cache_dtype} is not supported on "
            f"{gpu.name} (supported: {', '.join(gpu.kv_cache_dtypes)})"
        )
    method = cfg.quantization
    if method not in (None, "", "none", "auto") and not gpu.supports_quantization(method):
        raise UnsupportedError(
            f"--quantization {method} is not supported on {gpu.name} "
            f"(supported: {', '.join(gpu.quantization_methods) or 'none'})"
        )
    if model.quantization and not gpu.supports_quantization(model.quantization.method):
        raise UnsupportedError(
            f"model {model.name!r} is quantized with "
            f"{model.quantization.method}, which {gpu.name} does not support"
        )
    if cfg.max_model_len and cfg.max_model_len > model.max_position_embeddings:
        raise ParameterError(
            f"--max-model-len {cfg.max_model_len} exceeds the model's "
            f"max_position_embeddings ({model.max_position_embeddings})"
        )


def estimate(
    model: ModelSpec,
    gpu: GpuSpec,
    cfg: ServingConfig | None = None,
    *,
    efficiency: Efficiency | None = None,
    overheads: Overheads | None = None,
    ladder: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
) -> Estimate:
    """Estimate memory, KV capacity and the roofline for ``model`` on ``gpu`` under ``cfg``."""
    cfg = cfg or ServingConfig()
    eff = efficiency or Efficiency()
    ovh = overheads or Overheads()
    check_config(model, gpu, cfg)
    tp = cfg.tensor_parallel_size
    scheme = resolve_scheme(model, cfg.quantization)
    max_model_len = cfg.max_model_len or model.max_position_embeddings
    context = cfg.context_len or max_model_len
    default_tokens, default_seqs = VLLM.batch_limits(gpu, tp)
    max_seqs = cfg.max_num_seqs or default_seqs
    batched = cfg.max_num_batched_tokens or default_tokens
    kv_b = (
        KV_DTYPE_BYTES["auto"]
        if cfg.kv_cache_dtype == "auto"
        else KV_DTYPE_BYTES[cfg.kv_cache_dtype]
    )
    bs = cfg.block_size or VLLM.block_size_for(gpu, model)

    weights = _served_weight_bytes(model, scheme)
    per_token = kv_bytes_per_token(model, kv_b, tp)
    per_token_total = kv_bytes_per_token(model, kv_b, 1)
    per_seq_total = kv_bytes_per_sequence(model, context, kv_b, 1, 1)
    naive = naive_max_batch(gpu.memory_bytes * tp, weights.total, per_seq_total)

    kv_fixed = cfg.kv_cache_memory_bytes
    if kv_fixed is None and gpu.is_cpu:
        kv_fixed = CPU_DEFAULT_KV_CACHE_BYTES
    acts = activation_bytes(model, batched, max_seqs, tp)
    if kv_fixed is not None:
        pool = kv_fixed
        acts_used, non_torch = 0, 0
    else:
        acts_used, non_torch = acts, ovh.non_torch_bytes + ovh.cuda_graph_bytes
        pool = (
            int(gpu.usable_memory_bytes * cfg.gpu_memory_utilization)
            - weights.total // tp
            - acts_used
            - non_torch
        )
    capacity = kv_capacity_tokens(pool, bs, per_token)
    blocks = capacity // bs
    per_seq_gpu = kv_bytes_per_sequence(model, context, kv_b, bs, tp)
    concurrency = (blocks * bs * per_token) / per_seq_gpu if capacity else 0.0

    compute_dtype = scheme.compute_dtype if scheme.compute_dtype in gpu.peak_flops else "bf16"
    flops = gpu.flops_for(compute_dtype)
    bw = gpu.memory_bandwidth
    active = model.active_param_count
    knee = _knee(model, scheme, active, bw, flops, 0, 0)
    knee_kv = _knee(model, scheme, active, bw, flops, context, per_token_total)

    points = []
    for batch in sorted(set(ladder)):
        mem = (
            step_weight_read_bytes(model, scheme, batch) + batch * context * per_token_total
        ) / tp
        comp = 2.0 * active * batch / tp
        t_mem = mem / (bw * eff.memory_bandwidth)
        t_comp = comp / (flops * eff.compute)
        step = max(t_mem, t_comp) + eff.step_overhead_s
        points.append(
            LadderPoint(
                batch,
                step,
                batch / step,
                "memory" if t_mem >= t_comp else "compute",
                batch <= concurrency,
            )
        )

    return Estimate(
        model=model.name,
        gpu=gpu.name,
        quantization=scheme.method,
        kv_cache_dtype=cfg.kv_cache_dtype,
        max_model_len=max_model_len,
        context_len=context,
        block_size=bs,
        tensor_parallel_size=tp,
        param_count=model.param_count,
        active_param_count=active,
        weight_bytes=weights.total,
        weight_breakdown={
            "linear": weights.linear,
            "embedding": weights.embedding,
            "lm_head": weights.lm_head,
            "other": weights.other,
        },
        kv_bytes_per_token=per_token_total,
        kv_bytes_per_sequence=per_seq_total,
        naive_max_batch=naive,
        gpu_memory_bytes=gpu.memory_bytes,
        gpu_usable_memory_bytes=gpu.usable_memory_bytes,
        activation_bytes=acts_used,
        non_torch_bytes=non_torch,
        kv_pool_bytes=pool,
        kv_capacity_tokens=capacity,
        num_gpu_blocks=blocks,
        max_concurrency=concurrency,
        max_num_batched_tokens=batched,
        max_num_seqs=max_seqs,
        roofline_knee_batch=knee,
        roofline_knee_batch_with_kv=knee_kv,
        ladder=tuple(points),
        kv_dtype_bytes=kv_b,
        compute_dtype=compute_dtype,
        peak_flops=flops,
        memory_bandwidth=bw,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        kv_pool_fixed=kv_fixed is not None,
        weights_from_checkpoint=bool(scheme.from_checkpoint and model.checkpoint),
    )


def _served_weight_bytes(model: ModelSpec, scheme: QuantScheme) -> WeightBytes:
    """Weight bytes as served. A quantized checkpoint's own tensor bytes are the truth when
    there are safetensors to read; otherwise the per-matrix formula."""
    predicted = weight_bytes(model, scheme)
    ckpt = model.checkpoint
    if scheme.from_checkpoint and ckpt is not None and ckpt.tensor_bytes:
        return replace(predicted, linear=predicted.linear + ckpt.tensor_bytes - predicted.total)
    return predicted


def _knee(
    model: ModelSpec,
    scheme: QuantScheme,
    active: int,
    bw: float,
    flops: float,
    context: int,
    kv_per_token: int,
) -> float | None:
    """Knee batch. Dense models use the closed form; for MoE the weights read grow with the
    batch (more experts touched), so solve compute(B) = memory(B) by bisection."""
    if not model.is_moe:
        return roofline_knee(
            step_weight_read_bytes(model, scheme, 1), active, bw, flops, context, kv_per_token
        )

    def gap(batch: float) -> float:  # > 0 once compute-bound
        mem = (
            step_weight_read_bytes(model, scheme, max(1, round(batch)))
            + batch * context * kv_per_token
        )
        return 2.0 * active * batch / flops - mem / bw

    lo, hi = 1.0, 1e7
    if gap(hi) <= 0:
        return None
    if gap(lo) > 0:
        return lo
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gap(mid) <= 0 else (lo, mid)
    return hi
