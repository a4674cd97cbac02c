"""``--explain`` text: each estimate formula with its values (formatting only, no new math)."""

from __future__ import annotations

from dataclasses import dataclass

from tuner.analytic.estimate import Estimate
from tuner.specs.model import ModelSpec

GiB = 2**30


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _gib(value: float) -> str:
    return f"{value / GiB:.3f} GiB"


@dataclass(frozen=True)
class ExplainLine:
    """One formula shown with its values: ``label = formula = values = result``."""

    label: str
    formula: str
    values: str
    result: str

    def __str__(self) -> str:
        return f"{self.label} = {self.formula} = {self.values} = {self.result}"


def explain_lines(model: ModelSpec, est: Estimate) -> list[ExplainLine]:
    """Each figure of ``est`` (an estimate of ``model``) as its formula with the values."""
    kv_b, flops, compute_dtype = est.kv_dtype_bytes, est.peak_flops, est.compute_dtype
    lines: list[ExplainLine] = []
    add = lambda *a: lines.append(ExplainLine(*a))  # noqa: E731 - local shorthand
    L = model.num_layers
    if model.attention == "mla":
        add(
            "KV bytes per token",
            "L x (kv_lora_rank + qk_rope_head_dim) x b_kv",
            f"{L} x ({model.kv_lora_rank} + {model.qk_rope_head_dim}) x {kv_b}",
            f"{_n(est.kv_bytes_per_token)} B",
        )
    else:
        add(
            "KV bytes per token",
            "2 (K,V) x L x n_kv x d x b_kv",
            f"2 x {L} x {model.num_kv_heads} x {model.head_dim} x {kv_b}",
            f"{_n(est.kv_bytes_per_token)} B",
        )
    if model.num_sliding_layers:
        add(
            "KV bytes per sequence",
            "per-layer bytes x (full layers x S + sliding layers x min(S, window))",
            f"{model.num_full_attention_layers} full, "
            f"{model.num_sliding_layers} sliding (window {model.sliding_window}), S = "
            f"{est.context_len}",
            f"{_n(est.kv_bytes_per_sequence)} B ({_gib(est.kv_bytes_per_sequence)})",
        )
    else:
        add(
            "KV bytes per sequence",
            "KV bytes per token x S",
            f"{_n(est.kv_bytes_per_token)} x {_n(est.context_len)}",
            f"{_n(est.kv_bytes_per_sequence)} B ({_gib(est.kv_bytes_per_sequence)})",
        )
    source = "checkpoint tensors" if est.weights_from_checkpoint else "formula"
    add(
        "weights",
        f"linear ({est.quantization}) + embedding + lm_head + norms/biases [{source}]",
        " + ".join(_n(v) for v in est.weight_breakdown.values()),
        f"{_n(est.weight_bytes)} B ({_gib(est.weight_bytes)}, {est.weight_bytes / 1e9:.2f} GB)",
    )
    mem = est.gpu_memory_bytes * est.tensor_parallel_size
    add(
        "naive max batch (whole card, no overhead)",
        "floor((GPU memory - weights) / KV per seq)",
        f"floor(({_n(mem)} - {_n(est.weight_bytes)}) / {_n(est.kv_bytes_per_sequence)})",
        f"{est.naive_max_batch}",
    )
    if mem % GiB == 0:
        decimal = (mem // GiB) * 10**9
        alt = max(0, (decimal - est.weight_bytes) // est.kv_bytes_per_sequence)
        add(
            "  units",
            f"{est.gpu} has {mem // GiB} GiB = {_n(mem)} B; counted as "
            f"{mem // GiB} GB (decimal) it would be {_n(decimal)} B",
            f"floor(({_n(decimal)} - {_n(est.weight_bytes)}) / {_n(est.kv_bytes_per_sequence)})",
            f"{alt} (the GB-vs-GiB difference alone)",
        )
    if est.kv_pool_fixed:
        add(
            "KV pool",
            "--kv-cache-memory-bytes (fixed by the user or the CPU default)",
            _n(est.kv_pool_bytes),
            f"{_n(est.kv_pool_bytes)} B",
        )
    else:
        add(
            "KV pool",
            "driver-visible GPU memory x gpu_memory_utilization - weights/TP - activations "
            "- non-torch (CUDA context, graphs)",
            f"{_n(est.gpu_usable_memory_bytes)} x {est.gpu_memory_utilization} - "
            f"{_n(est.weight_bytes // est.tensor_parallel_size)} - {_n(est.activation_bytes)} - "
            f"{_n(est.non_torch_bytes)}",
            f"{_n(est.kv_pool_bytes)} B ({_gib(est.kv_pool_bytes)})",
        )
        add(
            "  activations",
            "profiled at max_num_batched_tokens (+ sampler logits for max_num_seqs)",
            f"T = {est.max_num_batched_tokens}, seqs = {est.max_num_seqs}",
            f"{_n(est.activation_bytes)} B",
        )
    per_block = est.block_size * (
        est.kv_bytes_per_token // est.tensor_parallel_size
        if model.attention != "mla"
        else est.kv_bytes_per_token
    )
    add(
        "KV capacity (tokens)",
        "floor(pool / (block_size x KV bytes per token)) x block_size",
        f"floor({_n(est.kv_pool_bytes)} / {_n(per_block)}) x {est.block_size}",
        f"{_n(est.kv_capacity_tokens)} tokens",
    )
    add(
        "max concurrency at S",
        "capacity / (ceil(S / block_size) x block_size)",
        f"{_n(est.kv_capacity_tokens)} / {_n(_round_up(est.context_len, est.block_size))}",
        f"{est.max_concurrency:.2f} sequences",
    )
    add(
        "roofline knee (weights only)",
        "F x W / (2 x P x BW)  (bf16: F / BW)",
        f"{flops / 1e12:.1f} TFLOP/s ({compute_dtype}) x W / (2 x {_n(est.active_param_count)} "
        f"x {est.memory_bandwidth / 1e12:.2f} TB/s)",
        "none" if est.roofline_knee_batch is None else f"{est.roofline_knee_batch:.1f}",
    )
    add(
        "roofline knee (with KV reads at S)",
        "W / (2 P BW / F - S x KV bytes per token)",
        f"S = {_n(est.context_len)}, KV = {_n(est.kv_bytes_per_token)} B/token",
        "none (KV reads outgrow compute: memory-bound at every batch)"
        if est.roofline_knee_batch_with_kv is None
        else f"{est.roofline_knee_batch_with_kv:.1f}",
    )
    return lines
