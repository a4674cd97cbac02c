"""The analytic model: the seed's worked example, KV per attention kind, capacity, roofline."""

from __future__ import annotations

import pytest

from tuner.analytic.estimate import (
    ServingConfig,
    estimate,
    kv_bytes_per_sequence,
    kv_bytes_per_token,
    kv_capacity_tokens,
    roofline_knee,
)
from tuner.analytic.explain import explain_lines
from tuner.errors import ParameterError, UnsupportedError
from tuner.specs.gpu import get_gpu
from tuner.specs.model import load_model, spec_from_config

GiB = 2**30


def test_seed_worked_example_llama2_13b() -> None:
    """README's seed: 2 x 2 x 40 x 5120 x 4096 = 3,355,443,200 B (3.125 GiB) per sequence; with
    ~26 GB of weights a 40 GB (decimal) card holds 4 sequences; a real 40 GiB A100 holds 5."""
    model = load_model("meta-llama/Llama-2-13b-hf")
    cfg = ServingConfig(max_model_len=4096)
    seed_card = get_gpu("a100-40gb").with_memory(40 * 10**9)
    est = estimate(model, seed_card, cfg)
    assert est.kv_bytes_per_sequence == 3_355_443_200 == 2 * 2 * 40 * 5120 * 4096
    assert est.kv_bytes_per_sequence / GiB == 3.125
    assert 25.5e9 < est.weight_bytes < 26.5e9
    assert est.naive_max_batch == 4

    real = estimate(model, get_gpu("a100-40gb"), cfg)
    assert real.gpu_memory_bytes == 40 * GiB
    assert real.naive_max_batch == 5
    # vLLM's real bound is smaller: utilization, activations and overhead come off first.
    assert real.max_concurrency < real.naive_max_batch
    units = [line for line in explain_lines(model, real) if "units" in line.label]
    assert units and "GiB" in units[0].formula and units[0].result.startswith("4 ")


def test_gqa_kv_per_token() -> None:
    model = load_model("llama-3.1-8b")
    assert kv_bytes_per_token(model, 2) == 2 * 32 * 8 * 128 * 2 == 131072
    assert kv_bytes_per_token(model, 1) == 65536  # fp8 KV halves it


def test_mha_is_four_bytes_times_layers_times_hidden() -> None:
    model = load_model("llama-2-7b")
    assert kv_bytes_per_token(model, 2) == 2 * 2 * model.num_layers * model.hidden_size


def test_mqa_kv_per_token() -> None:
    base = load_model("llama-3.1-8b").raw_config
    mqa = spec_from_config({**base, "num_key_value_heads": 1}, name="mqa", source="t")
    assert kv_bytes_per_token(mqa, 2) == 2 * 32 * 1 * 128 * 2


def test_mla_kv_per_token() -> None:
    model = load_model("deepseek-v2-lite")
    assert kv_bytes_per_token(model, 2) == 27 * (512 + 64) * 2
    # MLA's latent is replicated, not split, under tensor parallelism.
    assert kv_bytes_per_token(model, 2, tensor_parallel_size=4) == 27 * 576 * 2


def test_sliding_window_layers_hold_at_most_the_window() -> None:
    gemma = load_model("gemma-2-9b")
    per_layer = 2 * 8 * 256 * 2
    short = kv_bytes_per_sequence(gemma, 1024, 2, 16)
    assert short == 42 * per_layer * 1024  # below the window every layer holds S tokens
    long = kv_bytes_per_sequence(gemma, 8192, 2, 16)
    assert long == per_layer * (21 * 8192 + 21 * (4096 + 16))
    assert long < 42 * per_layer * 8192


def test_tensor_parallel_splits_kv_heads_and_replicates_when_fewer() -> None:
    model = load_model("llama-3.1-8b")
    assert kv_bytes_per_token(model, 2, 2) == kv_bytes_per_token(model, 2) // 2
    assert kv_bytes_per_token(model, 2, 16) == kv_bytes_per_token(model, 2, 8)


def test_capacity_is_block_rounded() -> None:
    assert kv_capacity_tokens(GiB, 16, 131072) == (GiB // (16 * 131072)) * 16
    assert kv_capacity_tokens(16 * 131072 * 3 - 1, 16, 131072) == 32
    assert kv_capacity_tokens(-5, 16, 100) == 0


def test_fixed_pool_and_max_concurrency() -> None:
    model = load_model("llama-3.1-8b")
    cfg = ServingConfig(max_model_len=4000, kv_cache_memory_bytes=4 * GiB)
    est = estimate(model, get_gpu("h100"), cfg)
    assert est.kv_pool_bytes == 4 * GiB
    assert est.kv_capacity_tokens == (4 * GiB // (16 * 131072)) * 16
    # S = 4000 rounds up to 250 blocks of 16 = 4000 tokens.
    assert est.max_concurrency == pytest.approx(est.kv_capacity_tokens / 4000)


def test_cpu_defaults_to_a_one_gib_pool() -> None:
    model = load_model("qwen2.5-0.5b")
    est = estimate(model, get_gpu("cpu"), ServingConfig(max_model_len=2048))
    assert est.kv_pool_bytes == GiB


def test_pool_shrinks_with_utilization_and_batched_tokens() -> None:
    model = load_model("llama-3.1-8b")
    gpu = get_gpu("h100")
    base = estimate(model, gpu, ServingConfig(max_model_len=8192))
    lower = estimate(model, gpu, ServingConfig(max_model_len=8192, gpu_memory_utilization=0.5))
    bigger_batch = estimate(
        model, gpu, ServingConfig(max_model_len=8192, max_num_batched_tokens=32768)
    )
    assert lower.kv_pool_bytes < base.kv_pool_bytes
    assert bigger_batch.activation_bytes > base.activation_bytes
    assert bigger_batch.kv_pool_bytes < base.kv_pool_bytes
    assert base.kv_pool_bytes < gpu.memory_bytes * 0.92 - base.weight_bytes


def test_knee_is_flops_over_bandwidth_for_bf16() -> None:
    gpu = get_gpu("h100")
    est = estimate(load_model("llama-3.1-8b"), gpu, ServingConfig(max_model_len=4096))
    assert est.roofline_knee_batch == pytest.approx(gpu.flops_for("bf16") / gpu.memory_bandwidth)


def test_knee_with_kv_reads() -> None:
    """W / (2 P BW / F - C k): larger than the weights-only knee at short context, and absent
    once KV reads grow as fast as compute (Llama-3.1-8B at 4K context on an H100)."""
    gpu = get_gpu("h100")
    model = load_model("llama-3.1-8b")
    short = estimate(model, gpu, ServingConfig(max_model_len=4096, context_len=128))
    assert short.roofline_knee_batch_with_kv > short.roofline_knee_batch
    long = estimate(model, gpu, ServingConfig(max_model_len=4096))
    assert long.roofline_knee_batch_with_kv is None
    assert roofline_knee(100.0, 10.0, 1.0, 1.0, context=20, kv_per_token=1) is None
    assert roofline_knee(100.0, 10.0, 1.0, 1.0) == pytest.approx(5.0)


def test_awq_moves_the_knee_down_and_frees_kv() -> None:
    gpu = get_gpu("h100")
    model = load_model("llama-3.1-8b")
    bf16 = estimate(model, gpu, ServingConfig(max_model_len=4096))
    awq = estimate(model, gpu, ServingConfig(max_model_len=4096, quantization="awq"))
    assert awq.roofline_knee_batch < bf16.roofline_knee_batch / 2
    assert awq.kv_capacity_tokens > bf16.kv_capacity_tokens


def test_fp8_w8a8_uses_fp8_flops() -> None:
    gpu = get_gpu("h100")
    model = load_model("llama-3.1-8b")
    fp8 = estimate(model, gpu, ServingConfig(max_model_len=4096, quantization="fp8"))
    bf16 = estimate(model, gpu, ServingConfig(max_model_len=4096))
    # Half the bytes but twice the FLOP/s: the knee stays near where it was, a little later
    # because the lm_head stays 16-bit (more than one byte per parameter read).
    assert bf16.roofline_knee_batch < fp8.roofline_knee_batch < 1.15 * bf16.roofline_knee_batch
    assert fp8.weight_bytes < 0.6 * bf16.weight_bytes  # embeddings and lm_head stay 16-bit


def test_moe_knee_is_later_than_dense() -> None:
    gpu = get_gpu("h100")
    est = estimate(load_model("mixtral-8x7b"), gpu, ServingConfig(max_model_len=4096))
    assert est.roofline_knee_batch > gpu.flops_for("bf16") / gpu.memory_bandwidth


def test_ladder_throughput_rises_then_flattens() -> None:
    est = estimate(
        load_model("llama-3.1-8b"),
        get_gpu("h100"),
        ServingConfig(max_model_len=2048, context_len=512),
    )
    tps = [p.tokens_per_s for p in est.ladder]
    assert tps == sorted(tps)
    assert est.ladder[0].bound == "memory"
    assert tps[1] / tps[0] > 1.8  # memory-bound: doubling the batch nearly doubles throughput
    assert not est.ladder[-1].fits_kv or est.ladder[-1].batch <= est.max_concurrency


@pytest.mark.parametrize(
    "cfg,error,match",
    [
        (ServingConfig(max_model_len=0), ParameterError, "max-model-len"),
        (ServingConfig(max_model_len=-5), ParameterError, "positive"),
        (ServingConfig(gpu_memory_utilization=1.5), ParameterError, "utilization"),
        (ServingConfig(gpu_memory_utilization=0.0), ParameterError, "utilization"),
        (ServingConfig(block_size=0), ParameterError, "block-size"),
        (ServingConfig(max_model_len=10**7), ParameterError, "max_position_embeddings"),
        (ServingConfig(quantization="fp8"), UnsupportedError, "not supported on a100"),
        (ServingConfig(kv_cache_dtype="fp8"), UnsupportedError, "kv-cache-dtype"),
        (ServingConfig(kv_cache_dtype="int3"), ParameterError, "unknown --kv-cache-dtype"),
    ],
)
def test_impossible_configurations(cfg: ServingConfig, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        estimate(load_model("llama-3.1-8b"), get_gpu("a100-40gb"), cfg)


def test_json_has_the_documented_keys() -> None:
    data = estimate(
        load_model("llama-2-13b"), get_gpu("a100-40gb"), ServingConfig(max_model_len=4096)
    ).to_json()
    for key in (
        "param_count",
        "weight_bytes",
        "kv_bytes_per_token",
        "kv_bytes_per_sequence",
        "naive_max_batch",
        "kv_pool_bytes",
        "kv_capacity_tokens",
        "max_concurrency",
        "roofline_knee_batch",
    ):
        assert key in data
    assert isinstance(data["kv_capacity_tokens"], int)
