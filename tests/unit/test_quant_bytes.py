"""Weight bytes by quantization method, matrix by matrix."""

from __future__ import annotations

import pytest

from tuner.analytic.weights import (
    QuantScheme,
    default_scheme,
    linear_bytes,
    resolve_scheme,
    weight_bytes,
)
from tuner.errors import ParameterError
from tuner.specs.architecture import LinearGroup
from tuner.specs.model import load_model

G = LinearGroup("w", 4096, 11008, 1, "mlp")
N = 4096 * 11008


def test_bf16_is_two_bytes_a_weight() -> None:
    assert linear_bytes(G, default_scheme("none")) == 2 * N


def test_fp8_online_is_one_byte_plus_a_tensor_scale() -> None:
    assert linear_bytes(G, default_scheme("fp8")) == N + 4


def test_int8_w8a8_adds_a_scale_per_output_channel() -> None:
    w8a8 = QuantScheme("compressed-tensors", 8, from_checkpoint=True)
    assert linear_bytes(G, w8a8) == N + 11008 * 4
    assert w8a8.compute_dtype == "int8"


def test_awq_4bit_group_128() -> None:
    groups = 4096 // 128
    expected = N // 2 + groups * 11008 * 2 + groups * 11008 // 2
    assert linear_bytes(G, default_scheme("awq")) == expected
    # about 0.5 + (2 + 0.5)/128 bytes a weight
    assert linear_bytes(G, default_scheme("awq")) / N == pytest.approx(0.5 + 2.5 / 128)


def test_gptq_adds_g_idx_per_input_row() -> None:
    awq = linear_bytes(G, default_scheme("awq"))
    assert linear_bytes(G, default_scheme("gptq")) == awq + 4096 * 4


def test_bitsandbytes_nf4_absmax_per_64() -> None:
    assert linear_bytes(G, default_scheme("bitsandbytes")) == N // 2 + (N // 64) * 4


def test_routers_stay_16_bit() -> None:
    router = LinearGroup("router", 4096, 8, 32, "router")
    assert linear_bytes(router, default_scheme("awq")) == router.params * 2


def test_embeddings_and_lm_head_stay_16_bit_under_awq() -> None:
    spec = load_model("llama-3.1-8b")
    bf16, awq = (
        weight_bytes(spec, default_scheme("none")),
        weight_bytes(spec, default_scheme("awq")),
    )
    assert awq.embedding == bf16.embedding == spec.vocab_size * spec.hidden_size * 2
    assert awq.lm_head == bf16.lm_head
    assert awq.linear < bf16.linear / 3.5
    # A 4-bit 8B model: about 5.7 GB (16-bit embeddings and lm_head are 2.1 GB of it).
    assert 5.5e9 < awq.total < 6.0e9


def test_moe_counts_all_experts_for_memory() -> None:
    mixtral = load_model("mixtral-8x7b")
    assert weight_bytes(mixtral, default_scheme("none")).total == pytest.approx(
        2 * mixtral.param_count
    )


def test_checkpoint_quantization_wins_and_conflicts_are_errors() -> None:
    v3 = load_model("deepseek-v3")
    scheme = resolve_scheme(v3, None)
    assert scheme.method == "fp8" and scheme.from_checkpoint
    with pytest.raises(ParameterError, match="already quantized"):
        resolve_scheme(v3, "awq")


def test_unknown_method() -> None:
    with pytest.raises(ParameterError, match="unknown quantization"):
        default_scheme("q3_k")
