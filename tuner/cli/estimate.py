"""``vtune estimate``: the analytic breakdown for a model on a GPU (no GPU needed)."""

from __future__ import annotations

import json
from typing import Any

import click

from tuner.cli.common import (
    fraction_option,
    gpu_option,
    json_flag_option,
    kv_cache_memory_bytes_option,
    max_model_len_option,
    model_option,
    positive_int,
)


@click.command()
@model_option("HF id, local directory or bundled card name.", required=False)
@gpu_option("GPU from the registry (`vtune gpus`), or cpu.", default="h100")
@max_model_len_option("vLLM --max-model-len; also the context S unless --context-len is given.")
@click.option(
    "--context-len",
    type=int,
    callback=positive_int,
    help="Context length S for max concurrency and KV reads (default: max model len).",
)
@click.option("--quantization", "-q", default=None, help="none, fp8, awq, gptq, bitsandbytes.")
@click.option("--kv-cache-dtype", default="auto", show_default=True)
@click.option(
    "--gpu-memory-utilization",
    type=float,
    default=0.92,
    show_default=True,
    callback=fraction_option,
)
@click.option("--max-num-batched-tokens", type=int, callback=positive_int)
@click.option("--max-num-seqs", type=int, callback=positive_int)
@click.option(
    "--block-size",
    type=int,
    callback=positive_int,
    help="KV block size (default: vLLM's, 16 on GPU, 128 on CPU).",
)
@kv_cache_memory_bytes_option("Fix the KV pool (vLLM's flag), e.g. 1GiB. Default on cpu: 1GiB.")
@click.option(
    "--tensor-parallel-size", "-tp", type=int, default=1, show_default=True, callback=positive_int
)
@click.option("--explain", is_flag=True, help="Show each formula with its values.")
@click.option(
    "--datasheet",
    is_flag=True,
    help="Use the registry's datasheet peaks even when `vtune probe` has measured this device.",
)
@click.option(
    "--calibration",
    "calibration_path",
    metavar="RECORD.json",
    help="Apply the efficiency factors a finished search fitted (its record; same GPU).",
)
@json_flag_option()
@click.option("--list-models", is_flag=True, help="List the bundled model cards and exit.")
def estimate(
    model: str | None,
    gpu_name: str,
    max_model_len: int | None,
    context_len: int | None,
    quantization: str | None,
    kv_cache_dtype: str,
    gpu_memory_utilization: float,
    max_num_batched_tokens: int | None,
    max_num_seqs: int | None,
    block_size: int | None,
    kv_cache_memory_bytes: int | None,
    tensor_parallel_size: int,
    explain: bool,
    datasheet: bool,
    calibration_path: str | None,
    as_json: bool,
    list_models: bool,
) -> None:
    """Memory breakdown, KV capacity, max concurrency and the roofline knee."""
    from tuner.analytic.estimate import ServingConfig
    from tuner.analytic.estimate import estimate as run_estimate
    from tuner.analytic.explain import explain_lines
    from tuner.cli import console
    from tuner.specs.gpu import get_gpu
    from tuner.specs.model import card_ids, load_model
    from tuner.specs.peaks import with_peaks

    if list_models:
        click.echo("\n".join(card_ids()))
        return
    if not model:
        raise click.UsageError("--model is required")
    spec = load_model(model)
    gpu, peaks = with_peaks(get_gpu(gpu_name), use_probe=not datasheet)
    cfg = ServingConfig(
        max_model_len=max_model_len,
        context_len=context_len,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        block_size=block_size,
        kv_cache_memory_bytes=kv_cache_memory_bytes,
        tensor_parallel_size=tensor_parallel_size,
    )
    calibrated = None
    if calibration_path:
        from tuner.search.calibration import load_calibration

        calibrated = load_calibration(calibration_path, gpu)
    result = run_estimate(spec, gpu, cfg, efficiency=calibrated[1] if calibrated else None)
    lines = explain_lines(spec, result)
    if as_json:
        data = result.to_json()
        data["explain"] = [str(line) for line in lines]
        data["peaks"] = peaks.to_json(result.compute_dtype)
        if calibrated:
            point = closed_loop(spec, gpu, cfg, result, calibrated[1])
            data["calibration"] = calibration_json(calibration_path, *calibrated, point)
        click.echo(json.dumps(data, indent=2))
    else:
        console.print_estimate(result, explain=lines if explain else ())
        click.echo(peaks_line(peaks, result.compute_dtype))
        if calibrated:
            point = closed_loop(spec, gpu, cfg, result, calibrated[1])
            click.echo(calibration_line(calibration_path, *calibrated, point))


def peaks_line(peaks: Any, compute_dtype: str) -> str:
    """One line saying which peaks the estimate used: probed (where, when) or datasheet."""
    flops = peaks.flops.get(compute_dtype, peaks.flops.get("bf16", 0.0))
    figures = (
        f"{peaks.memory_bandwidth / 1e9:,.1f} GB/s, {flops / 1e12:,.3g} TFLOP/s {compute_dtype}"
    )
    if peaks.probed:
        return f"Peaks: probed on {peaks.device} at {peaks.measured_at} ({figures})"
    return f"Peaks: datasheet ({figures}); `vtune probe` measures this device's own"


def closed_loop(spec: Any, gpu: Any, cfg: Any, result: Any, eff: Any) -> Any:
    """The ladder point at max_num_seqs capped to the KV-feasible concurrency: the closed-loop
    output tokens/s a search's capacity probe measures at that setting."""
    from tuner.analytic.estimate import estimate as run_estimate
    from tuner.plan.prune import feasible_concurrency

    batch = feasible_concurrency(result.max_num_seqs, result.max_concurrency)
    return run_estimate(spec, gpu, cfg, efficiency=eff, ladder=(batch,)).ladder[0]


def calibration_json(path: Any, record: Any, eff: Any, point: Any) -> dict[str, Any]:
    """Which calibration the estimate used: the record, its search's model, the factors as
    applied (fractions of this estimate's peaks), the calibration's own figures, and the
    calibrated closed-loop output tokens/s at this max_num_seqs."""
    block = record.calibration
    return {
        "closed_loop": {"batch": point.batch, "tokens_per_s": point.tokens_per_s},
        "record": str(path),
        "model": record.model.name,
        "gpu": record.gpu.name,
        "factors": {
            "memory_bandwidth": eff.memory_bandwidth,
            "compute": eff.compute,
            "step_overhead_s": eff.step_overhead_s,
        },
        "fitted_factors": dict(block.factors),
        "points_used": block.points_used,
        "mape_before": block.mape_before,
        "mape_after": block.mape_after,
    }


def calibration_line(path: Any, record: Any, eff: Any, point: Any) -> str:
    """One line naming the calibration the step times use, and its closed-loop figure."""
    block = record.calibration
    error = ""
    if block.mape_before is not None and block.mape_after is not None:
        error = f"; error on unseen trials {block.mape_before:.0f}% -> {block.mape_after:.0f}%"
    return (
        f"Calibrated from {path} ({record.model.name}, {block.points_used} load points): "
        f"bandwidth x{eff.memory_bandwidth:.3g}, compute x{eff.compute:.3g}, "
        f"overhead {eff.step_overhead_s * 1e3:.3g} ms per step{error}; closed loop at "
        f"{point.batch} sequences: {point.tokens_per_s:,.0f} output tokens/s"
    )
