"""The per-load-point roofline: hand-computed figures for each regime, and the model helpers."""

from __future__ import annotations

import math

import pytest

from tuner.analytic.formulas import kv_bytes_per_token
from tuner.analytic.roofline import (
    COMPUTE_BOUND,
    HIGH_FRACTION,
    MEMORY_BOUND,
    OVERHEAD_BOUND,
    Peaks,
    classify,
    model_roofline_point,
    roofline_point,
    step_inputs,
)
from tuner.analytic.weights import resolve_scheme, step_weight_read_bytes
from tuner.errors import ParameterError, UnsupportedError
from tuner.specs.gpu import get_gpu
from tuner.specs.model import load_model
from tuner.specs.probe import ProbeResult, ProbeSizes

PEAKS = Peaks(bandwidth_bytes_per_s=4e12, flops_per_s=1e15)
W = 16e9  # weight bytes read per step
P = 8e9  # active parameters
KV = 131_072  # KV bytes per token (Llama-3.1-8B, bf16)


def _point(tokens_per_s: float, batch: float, context: float):
    return roofline_point(
        output_tokens_per_s=tokens_per_s,
        mean_batch=batch,
        weight_read_bytes=W,
        kv_bytes_per_token=KV,
        mean_context=context,
        active_params=P,
        peaks=PEAKS,
    )


def test_memory_bound_point() -> None:
    # batch 8 at 1200 tokens/s: 150 steps/s; a step reads 16e9 + 8 x 1000 x 131072 bytes.
    p = _point(1200.0, 8, 1000)
    assert p is not None
    assert p.decode_steps_per_s == 150.0
    assert p.bytes_per_step == 17_048_576_000
    assert p.achieved_bandwidth_bytes_per_s == pytest.approx(2.5572864e12)
    assert p.bandwidth_fraction == pytest.approx(0.6393216)
    assert p.flops_per_step == 2 * P * 8
    assert p.achieved_flops_per_s == pytest.approx(1.92e13)  # = 2 x P x tokens/s
    assert p.flops_fraction == pytest.approx(0.0192)
    assert p.regime == MEMORY_BOUND


def test_compute_bound_point() -> None:
    # batch 1024 at 50 steps/s, no KV: 8e11 B/s (0.2 of peak), 2 x 8e9 x 51200 = 8.192e14 FLOP/s.
    p = _point(51_200.0, 1024, 0)
    assert p is not None
    assert p.decode_steps_per_s == 50.0
    assert p.bandwidth_fraction == pytest.approx(0.2)
    assert p.flops_fraction == pytest.approx(0.8192)
    assert p.regime == COMPUTE_BOUND


def test_overhead_bound_point() -> None:
    # batch 4 at 25 steps/s: (16e9 + 4 x 500 x 131072) x 25 = 4.065536e11 B/s, 0.10 of peak.
    p = _point(100.0, 4, 500)
    assert p is not None
    assert p.bytes_per_step == 16_262_144_000
    assert p.bandwidth_fraction == pytest.approx(0.1016384)
    assert p.flops_fraction == pytest.approx(0.0016)
    assert p.regime == OVERHEAD_BOUND
    assert p.to_json() == {
        "achieved_bandwidth_bytes_per_s": p.achieved_bandwidth_bytes_per_s,
        "achieved_flops_per_s": p.achieved_flops_per_s,
        "bandwidth_fraction": p.bandwidth_fraction,
        "flops_fraction": p.flops_fraction,
        "regime": OVERHEAD_BOUND,
        "decode_steps_per_s": 25.0,
        "bytes_per_step": 16_262_144_000,
        "batch": 4,
    }


def test_classify_thresholds() -> None:
    assert HIGH_FRACTION == 0.5
    assert classify(0.5, 0.1) == MEMORY_BOUND  # at the threshold counts as bound
    assert classify(0.499, 0.45) == OVERHEAD_BOUND
    assert classify(0.6, 0.6) == MEMORY_BOUND  # a tie goes to memory
    assert classify(0.5, 0.7) == COMPUTE_BOUND
    assert classify(0.3, 0.1, high=0.25) == MEMORY_BOUND


def test_nothing_decoded_is_none_and_bad_inputs_are_errors() -> None:
    assert _point(0.0, 4, 100) is None
    assert _point(100.0, 0, 100) is None
    with pytest.raises(ParameterError, match="mean_batch"):
        _point(100.0, -1, 100)
    with pytest.raises(ParameterError, match="output_tokens_per_s"):
        _point(math.nan, 4, 100)
    with pytest.raises(ParameterError, match="positive"):
        Peaks(0, 1e15)


def test_peaks_from_the_registry_and_from_a_probe() -> None:
    h100 = get_gpu("h100")
    peaks = Peaks.from_gpu(h100, "bf16", devices=2)
    assert peaks.bandwidth_bytes_per_s == 2 * h100.memory_bandwidth
    assert peaks.flops_per_s == 2 * h100.flops_for("bf16")
    assert peaks.source == "datasheet"
    probe = ProbeResult(
        device_key="cpu-x",
        device_name="x",
        kind="cpu",
        memory_bandwidth=2e10,
        peak_flops={"fp32": 5e10, "fp16": 1e9},
        memory_total_bytes=1,
        memory_free_bytes=1,
        measured_at="2026-01-01T00:00:00+00:00",
        torch_version="t",
        sizes=ProbeSizes(1, 1),
        matmul_n={"fp32": 1, "fp16": 1},
        seconds=1.0,
    )
    measured = Peaks.from_probe(probe, "bf16")  # fp16 stands in for bf16
    assert (measured.bandwidth_bytes_per_s, measured.flops_per_s) == (2e10, 1e9)
    assert measured.source == "probe"
    assert Peaks.from_probe(probe, "fp32", devices=2).flops_per_s == 1e11
    with pytest.raises(UnsupportedError, match="fp8"):
        Peaks.from_probe(probe, "fp8")


def test_model_helpers_use_the_estimators_building_blocks() -> None:
    model = load_model("llama-3.1-8b")
    inputs = step_inputs(model, 8)
    assert inputs.weight_read_bytes == step_weight_read_bytes(model, resolve_scheme(model, None), 8)
    assert inputs.kv_bytes_per_token == kv_bytes_per_token(model, 2) == KV
    assert inputs.active_params == model.active_param_count
    assert step_inputs(model, 8, kv_cache_dtype="fp8").kv_bytes_per_token == KV // 2
    peaks = Peaks.from_gpu(get_gpu("h100"))
    p = model_roofline_point(
        model, peaks, output_tokens_per_s=1200.0, mean_batch=8, mean_context=1000
    )
    assert p is not None and p.regime == MEMORY_BOUND
    assert p.bytes_per_step == inputs.weight_read_bytes + 8 * 1000 * KV
    with pytest.raises(ParameterError, match="kv-cache-dtype"):
        step_inputs(model, 8, kv_cache_dtype="int3")


def test_moe_weight_reads_grow_with_the_batch() -> None:
    model = load_model("mixtral-8x7b")
    small, large = step_inputs(model, 1), step_inputs(model, 64)
    assert small.weight_read_bytes < large.weight_read_bytes
    assert step_inputs(model, 0.4).weight_read_bytes == small.weight_read_bytes  # at least 1
    assert small.active_params == model.active_param_count < model.param_count
