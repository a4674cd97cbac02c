"""``vtune quantize``: build an AWQ or GPTQ checkpoint that vLLM loads."""

from __future__ import annotations

import json

import click

from tuner.cli.common import gpu_option, json_flag_option, model_option, positive_int


@click.command()
@model_option("16-bit model directory (or hub id).")
@click.option(
    "--method",
    required=True,
    type=click.Choice(["awq", "gptq"], case_sensitive=False),
    help="awq (AutoAWQ) or gptq (Optimum + GPT-QModel).",
)
@click.option("--out", "out_dir", required=True, help="Output directory (created).")
@click.option("--bits", type=int, default=4, show_default=True, callback=positive_int)
@click.option(
    "--group-size",
    type=int,
    default=128,
    show_default=True,
    help="Input rows sharing one scale and zero; must divide every layer's input size.",
)
@click.option("--calib", help="Calibration texts: .txt (blank-line paragraphs), .jsonl, .json.")
@click.option(
    "--calib-seq-len",
    type=int,
    default=512,
    show_default=True,
    callback=positive_int,
    help="Tokens per calibration block (fewer when the texts are short).",
)
@click.option(
    "--calib-blocks",
    type=int,
    default=128,
    show_default=True,
    callback=positive_int,
    help="At most this many calibration blocks.",
)
@gpu_option("Check that vLLM on this GPU serves the method.")
@json_flag_option()
def quantize(
    model: str,
    method: str,
    out_dir: str,
    bits: int,
    group_size: int,
    calib: str | None,
    calib_seq_len: int,
    calib_blocks: int,
    gpu_name: str | None,
    as_json: bool,
) -> None:
    """Quantize a model with AWQ or GPTQ; the same request reuses the output directory."""
    from tuner.quant.quantize import QuantizeRequest
    from tuner.quant.quantize import quantize as run_quantize
    from tuner.specs.gpu import get_gpu

    gpu = get_gpu(gpu_name) if gpu_name else None
    request = QuantizeRequest(
        model=model,
        method=method.lower(),
        out_dir=out_dir,
        bits=bits,
        group_size=group_size,
        calib=calib,
        calib_seq_len=calib_seq_len,
        max_calib_blocks=calib_blocks,
    )
    result = run_quantize(request, gpu=gpu)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    group = "per-channel" if result.group_size == -1 else f"group {result.group_size}"
    how = "reused" if result.reused else f"built in {result.seconds:.1f} s"
    click.echo(
        f"{result.method} {result.bits}-bit {group}: {result.path} "
        f"({result.tensor_bytes:,} tensor bytes, {how} with {result.backend}, "
        f"{result.calib_blocks} x {result.calib_seq_len} calibration tokens)"
    )
