"""Bytes a model's weights take under each quantization method (pure).

Exact per-matrix storage of the formats vLLM loads, so that a prediction can be checked against a
checkpoint's tensor bytes:

- none (bf16/fp16): 2 bytes a weight.
- fp8: 1 byte a weight plus fp32 scales — one per tensor when vLLM quantizes online, one per
  128x128 block (DeepSeek-V3 style) or per output channel for checkpoints.
- 8-bit compressed-tensors (INT8 W8A8; vLLM has no plain ``int8`` method): 1 byte a weight plus
  one fp32 scale per output channel.
- awq (4-bit): packed int32 qweight (bits/8 a weight), fp16 scales and packed int32 zeros per group
  of g input rows.
- gptq: as awq, plus an int32 g_idx per input row.
- bitsandbytes nf4: half a byte a weight plus an fp32 absmax per block of 64 weights (no double
  quantization); 8-bit: 1 byte plus an fp32 scale per row.

Embeddings, lm_head, norms, biases and MoE routers stay 16-bit under every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuner.errors import ParameterError
from tuner.specs.architecture import LinearGroup
from tuner.specs.model import ModelSpec, QuantConfig

HALF = 2  # bytes of a bf16/fp16 value
FP32 = 4
ONLINE_METHODS = ("fp8", "bitsandbytes")  # vLLM quantizes these at load time from 16-bit weights
METHODS = ("none", "fp8", "awq", "gptq", "bitsandbytes")  # what --quantization can ask for


@dataclass(frozen=True)
class QuantScheme:
    """How the served weights are stored: method, bits, group size, and where it came from."""

    method: str = "none"
    bits: int = 16
    group_size: int | None = None
    weight_block_size: tuple[int, int] | None = None
    has_zero_points: bool = False
    has_g_idx: bool = False
    from_checkpoint: bool = False

    @property
    def compute_dtype(self) -> str:
        """The tensor-core dtype the matmuls run in: W8A8 methods use fp8/int8, weight-only
        methods dequantize to bf16."""
        if self.method == "fp8":
            return "fp8"
        if self.method == "compressed-tensors" and self.bits == 8:
            return "int8"
        return "bf16"


def default_scheme(
    method: str, *, bits: int | None = None, group_size: int | None = 128
) -> QuantScheme:
    """The scheme vLLM uses for ``--quantization method`` on an unquantized checkpoint, or for a
    checkpoint to be built with that method (awq/gptq: 4-bit, group 128 unless told)."""
    method = (method or "none").lower()
    if method == "none":
        return QuantScheme()
    if method == "fp8":
        return QuantScheme("fp8", 8)
    if method == "awq":
        return QuantScheme("awq", bits or 4, group_size, has_zero_points=True)
    if method == "gptq":
        return QuantScheme("gptq", bits or 4, group_size, has_zero_points=True, has_g_idx=True)
    if method == "bitsandbytes":
        return QuantScheme("bitsandbytes", bits or 4, 64 if (bits or 4) == 4 else None)
    raise ParameterError(
        f"unknown quantization method {method!r}; choose from {', '.join(METHODS)}"
    )


def scheme_from_checkpoint(qc: QuantConfig) -> QuantScheme:
    return QuantScheme(
        qc.method,
        qc.bits,
        qc.group_size,
        qc.weight_block_size,
        qc.has_zero_points,
        qc.has_g_idx,
        from_checkpoint=True,
    )


def resolve_scheme(model: ModelSpec, requested: str | None) -> QuantScheme:
    """The scheme the server will run: the checkpoint's own quantization wins; asking for a
    different method on an already-quantized checkpoint is a ParameterError."""
    requested = None if requested in (None, "", "none", "auto") else requested.lower()
    if model.quantization is not None:
        if requested and requested != model.quantization.method:
            raise ParameterError(
                f"model {model.name!r} is already quantized with {model.quantization.method}; "
                f"--quantization {requested} conflicts "
                f"(omit it or pass {model.quantization.method})"
            )
        return scheme_from_checkpoint(model.quantization)
    return default_scheme(requested or "none")


def linear_bytes(group: LinearGroup, scheme: QuantScheme) -> int:
    """Stored bytes of one linear group under ``scheme``."""
    n_in, n_out, count = group.in_features, group.out_features, group.count
    weights = n_in * n_out
    if scheme.method == "none" or not group.quantizable:
        return weights * HALF * count
    if scheme.method == "fp8":
        if scheme.weight_block_size:
            bi, bo = scheme.weight_block_size
            scales = math.ceil(n_in / bi) * math.ceil(n_out / bo)
        elif scheme.from_checkpoint:
            scales = n_out
        else:
            scales = 1
        return (weights + scales * FP32) * count
    if scheme.method in ("awq", "gptq") or (
        scheme.method == "compressed-tensors" and scheme.bits < 8
    ):
        group_rows = scheme.group_size or n_in
        groups = math.ceil(n_in / group_rows)
        packed = weights * scheme.bits // 8
        scales = groups * n_out * HALF
        zeros = groups * n_out * scheme.bits // 8 if scheme.has_zero_points else 0
        g_idx = n_in * FP32 if scheme.has_g_idx else 0
        return (packed + scales + zeros + g_idx) * count
    if scheme.method == "bitsandbytes" and scheme.bits == 4:
        return (weights // 2 + math.ceil(weights / 64) * FP32) * count
    # 8-bit compressed-tensors (W8A8) and 8-bit bitsandbytes: a byte a weight + row scales.
    return (weights + n_out * FP32) * count


@dataclass(frozen=True)
class WeightBytes:
    """Weight memory split by what quantization touches."""

    linear: int
    embedding: int
    lm_head: int
    other: int  # norms, biases

    @property
    def total(self) -> int:
        return self.linear + self.embedding + self.lm_head + self.other


def weight_bytes(model: ModelSpec, scheme: QuantScheme) -> WeightBytes:
    """Weight bytes of ``model`` served under ``scheme`` (all experts count)."""
    return WeightBytes(
        linear=sum(linear_bytes(g, scheme) for g in model.linear_groups),
        embedding=model.embedding_params * HALF,
        lm_head=model.lm_head_params * HALF,
        other=model.norm_params * HALF,
    )


def step_weight_read_bytes(model: ModelSpec, scheme: QuantScheme, batch: int) -> float:
    """Weight bytes one decode step of ``batch`` sequences reads: every dense matrix, the expected
    share of routed experts, and the output projection (the tied embedding when tied). The input
    embedding is a gather of B rows: negligible."""
    linear = sum(
        linear_bytes(g, scheme) * g.touched_fraction(batch, model.num_experts_per_tok)
        for g in model.linear_groups
    )
    return linear + model.vocab_size * model.hidden_size * HALF + model.norm_params * HALF
