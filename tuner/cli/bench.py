"""``vtune bench``: measure one configuration, like ``vllm bench serve`` (parse, call, print)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from tuner.cli.common import (
    engine_arg_option,
    gpu_option,
    metrics_options,
    model_option,
    non_negative,
    positive_float,
    positive_int,
    seed_option,
    slo_option,
    startup_timeout_option,
    telemetry_config,
    telemetry_options,
    workload_options,
    workload_spec,
)


@click.command()
@workload_options
@model_option("Model directory (or HF id in the local cache).")
@gpu_option("GPU from the registry (`vtune gpus`); default cpu with vLLM's CPU build.")
@engine_arg_option("A vLLM engine setting, e.g. max_num_seqs=8 (repeatable).")
@click.option("--url", default=None, help="Measure this running server instead of starting one.")
@click.option("--served-model-name", default=None, help="Model name to send (default: server's).")
@click.option("--tokenizer", default=None, help="Tokenizer directory (default: the model's).")
@click.option(
    "--rate",
    type=float,
    default=None,
    callback=positive_float,
    help="Requests/s (Poisson; gamma with --burstiness). Default: all at once.",
)
@click.option(
    "--burstiness",
    type=float,
    default=1.0,
    show_default=True,
    callback=positive_float,
    help="1 Poisson, <1 burstier, inf constant spacing.",
)
@click.option(
    "--concurrency",
    type=int,
    default=None,
    callback=positive_int,
    help="Max requests in flight (closed loop without --rate).",
)
@click.option("--num-prompts", type=int, default=100, show_default=True, callback=positive_int)
@click.option(
    "--duration",
    type=float,
    default=None,
    callback=positive_float,
    help="Stop sending after this many seconds instead of after --num-prompts.",
)
@click.option(
    "--warmup",
    type=int,
    default=2,
    show_default=True,
    callback=non_negative,
    help="Warm-up requests, not measured.",
)
@click.option(
    "--timeout",
    type=float,
    default=300.0,
    show_default=True,
    callback=positive_float,
    help="Per-request timeout in seconds.",
)
@click.option(
    "--slo",
    default=None,
    callback=slo_option,
    help='SLO for goodput, e.g. "ttft:p95<500ms;tpot:p99<50ms".',
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the result (vllm bench serve field names) to this file.",
)
@click.option(
    "--api-key",
    envvar="OPENAI_API_KEY",
    default=None,
    show_envvar=True,
    help="Bearer token for the server (never printed or written).",
)
@seed_option()
@click.option("--port", type=int, default=None, help="Port for the started vLLM (default: free).")
@startup_timeout_option(None, "Seconds to wait for vLLM to become healthy.")
@click.option("--no-scrape", is_flag=True, help="Do not scrape the server's /metrics.")
@telemetry_options
@metrics_options
def bench(**opts: Any) -> None:
    """Start vLLM (or use --url), run the load, print a table, write --json, stop vLLM."""
    from tuner.cli.console import print_bench_result
    from tuner.measure import bench as core
    from tuner.outputs.prometheus import exporting
    from tuner.outputs.prometheus_bench import BenchExporter
    from tuner.specs.detect import gpu_choice_warnings

    cfg = _config(opts)
    if opts["gpu_name"] and opts["url"] is None:
        for line in gpu_choice_warnings(opts["gpu_name"]):
            click.echo(f"vtune: warning: {line}", err=True)
    info = {"model": opts["model"], "gpu": opts["gpu_name"] or "cpu"}
    with exporting(
        BenchExporter, opts["metrics_port"], opts["metrics_host"], opts["pushgateway"], info=info
    ) as exporter:
        result = core.run_bench(
            cfg, progress=lambda msg: click.echo(f"vtune: {msg}", err=True), observer=exporter
        )
        if exporter is not None and result.summary is not None:
            m = result.measurement
            assert m is not None
            exporter.finish(result.summary.to_json(), m.telemetry_json(), m.roofline_json())
    print_bench_result(result)
    if opts["json_out"] is not None:
        path = core.write_json(result, opts["json_out"])
        click.echo(f"vtune: wrote {path}", err=True)
    if result.status != "ok":
        raise SystemExit(1)


def _config(o: dict[str, Any]) -> Any:
    """Build the BenchConfig from the parsed options (reads the GPU registry, the probe cache
    and the model's config for the roofline; starts nothing)."""
    from tuner.engine.server import EngineSettings, LaunchConfig
    from tuner.load.generator import LoadConfig
    from tuner.measure import bench as core
    from tuner.measure.watch import watch_plan

    engine = launch = None
    device = core.device_for(o["gpu_name"])
    if o["url"] is None:
        engine = EngineSettings.from_mapping(o["model"], o["engine_args"])
        launch_kw: dict[str, Any] = {"device": device, "port": o["port"]}
        if o["startup_timeout"] is not None:
            launch_kw["startup_timeout_s"] = o["startup_timeout"]
        launch = LaunchConfig(**launch_kw)
    elif o["engine_args"]:
        raise click.BadParameter(
            "engine settings need a server to start; drop --url", param_hint="--engine-arg"
        )
    workload = workload_spec(o, num_prompts=o["num_prompts"])
    load = LoadConfig(
        rate=o["rate"] if o["rate"] is not None else math.inf,
        burstiness=o["burstiness"],
        concurrency=o["concurrency"],
        num_requests=None if o["duration"] is not None else o["num_prompts"],
        duration_s=o["duration"],
        warmup=o["warmup"],
        timeout_s=o["timeout"],
        endpoint=o["endpoint"],
        seed=o["seed"],
        api_key=o["api_key"] or None,
        replay=workload.replay,
    )
    return core.BenchConfig(
        model=o["model"],
        workload=workload,
        load=load,
        engine=engine,
        launch=launch,
        url=o["url"],
        tokenizer=o["tokenizer"],
        served_model_name=o["served_model_name"],
        slo=o["slo"],
        scrape=not o["no_scrape"],
        watch=watch_plan(o["model"], core.local_gpu(o["gpu_name"], device), telemetry_config(o)),
    )
