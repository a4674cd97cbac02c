"""``vtune estimate``: the analytic breakdown for a model on a GPU (no GPU needed)."""

from __future__ import annotations

import json

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

    if list_models:
        click.echo("\n".join(card_ids()))
        return
    if not model:
        raise click.UsageError("--model is required")
    spec = load_model(model)
    gpu = get_gpu(gpu_name)
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
    result = run_estimate(spec, gpu, cfg)
    lines = explain_lines(spec, result)
    if as_json:
        data = result.to_json()
        data["explain"] = [str(line) for line in lines]
        click.echo(json.dumps(data, indent=2))
    else:
        console.print_estimate(result, explain=lines if explain else ())
