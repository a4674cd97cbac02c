"""The analytic model's building blocks: one formula each (pure functions, no I/O).

Each function's docstring states its formula; ``tuner.analytic.estimate`` chains them into one
estimate (and re-exports them: callers may import the whole model from there).
"""

from __future__ import annotations

from tuner.analytic.weights import HALF
from tuner.specs.model import ModelSpec, kv_width_per_layer


def kv_bytes_per_token(model: ModelSpec, kv_dtype_bytes: int, tensor_parallel_size: int = 1) -> int:
    """KV bytes one token costs across all layers (one GPU's share under TP).

    MHA/GQA/MQA: 2 (K and V) x L x n_kv x d x b; MLA: L x (kv_lora_rank + rope dim) x b.
    Sliding-window layers cost the same per token but hold at most ``window`` tokens.
    """
    return model.num_layers * kv_width_per_layer(model, tensor_parallel_size) * kv_dtype_bytes


def kv_bytes_per_sequence(
    model: ModelSpec,
    context: int,
    kv_dtype_bytes: int,
    block_size: int = 1,
    tensor_parallel_size: int = 1,
) -> int:
    """KV bytes of one sequence of ``context`` tokens, rounded up to whole blocks, with
    sliding-window layers capped at their window (rounded up to blocks, plus one block)."""
    per_layer = kv_width_per_layer(model, tensor_parallel_size) * kv_dtype_bytes
    full = _round_up(context, block_size)
    sliding = full
    if model.sliding_window and model.num_sliding_layers:
        sliding = min(full, _round_up(model.sliding_window, block_size) + block_size)
    return per_layer * (model.num_full_attention_layers * full + model.num_sliding_layers * sliding)


def activation_bytes(
    model: ModelSpec, max_num_batched_tokens: int, max_num_seqs: int, tensor_parallel_size: int = 1
) -> int:
    """Peak activation memory of vLLM's profiling run: a forward pass of
    ``max_num_batched_tokens`` tokens (MLP gate/up output, activation, residual stream, q/k/v)
    plus the sampler's fp32 logits and probabilities for ``max_num_seqs`` sequences."""
    inter = model.intermediate_size
    if model.is_moe:
        expert_inter = max(g.out_features for g in model.linear_groups if g.kind == "expert")
        inter = max(inter, model.num_experts_per_tok * expert_inter)
    q_kv = (model.num_attention_heads + 2 * model.num_kv_heads) * model.head_dim
    per_token = (3 * inter + q_kv) // tensor_parallel_size + 4 * model.hidden_size
    logits = max_num_seqs * model.vocab_size * 4 * 2
    return max_num_batched_tokens * per_token * HALF + logits


def naive_max_batch(memory_bytes: int, weights: int, per_sequence: int) -> int:
    """The seed's bound: whole card, no overhead: floor((memory - weights) / KV per sequence)."""
    return max(0, (memory_bytes - weights) // per_sequence)


def kv_capacity_tokens(pool_bytes: int, block_size: int, per_token: int) -> int:
    """vLLM's capacity: floor(pool / (block_size x KV bytes per token)) x block_size."""
    if pool_bytes <= 0:
        return 0
    return (pool_bytes // (block_size * per_token)) * block_size


def roofline_knee(
    weight_read: float,
    params: float,
    bandwidth: float,
    flops: float,
    context: int = 0,
    kv_per_token: int = 0,
) -> float | None:
    """Batch where a decode step's compute time catches up with its memory time.

    Without KV reads: B* = F x W / (2 x P x BW) (for bf16 weights, F / BW). With KV reads at
    context C: B* = W / (2 P BW / F - C x kv_bytes_per_token); None when that denominator is
    <= 0 (KV reads grow as fast as compute: no knee at any batch).
    """
    denom = 2.0 * params * bandwidth / flops - context * kv_per_token
    if denom <= 0:
        return None
    return weight_read / denom


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
