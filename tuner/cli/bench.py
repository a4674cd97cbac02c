"""``vtune bench``: measure one configuration, like ``vllm bench serve`` (parse, call, print)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from tuner.cli.common import (
    engine_args_option,
    metrics_options,
    non_negative,
    positive_float,
    positive_int,
    slo_option,
    workload_options,
    workload_spec,
)


@click.command()
@workload_options
@click.option("--model", required=True, help="Model directory (or HF id in the local cache).")
@click.option(
    "--gpu",
    "gpu_name",
    default=None,
    help="GPU from the registry (`vtune gpus`); default cpu with vLLM's CPU build.",
)
@click.option(
    "--engine-arg",
    "engine_args",
    multiple=True,
    metavar="KEY=VALUE",
    callback=engine_args_option,
    help="A vLLM engine setting, e.g. max_num_seqs=8 (repeatable).",
)
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
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--port", type=int, default=None, help="Port for the started vLLM (default: free).")
@click.option(
    "--startup-timeout",
    type=float,
    default=None,
    callback=positive_float,
    help="Seconds to wait for vLLM to become healthy.",
)
@click.option("--no-scrape", is_flag=True, help="Do not scrape the server's /metrics.")
@metrics_options
def bench(**opts: Any) -> None:
    """Start vLLM (or use --url), run the load, print a table, write --json, stop vLLM."""
    from tuner.measure import bench as core
    from tuner.outputs.prometheus import exporting
    from tuner.outputs.prometheus_bench import BenchExporter

    cfg = _config(opts)
    if opts["gpu_name"] and opts["url"] is None:
        from tuner.specs.detect import check_gpu_choice, detect_gpus
        from tuner.specs.gpu import get_gpu

        warning = check_gpu_choice(get_gpu(opts["gpu_name"]), detect_gpus())
        if warning:
            click.echo(f"vtune: warning: {warning}", err=True)
    info = {"model": opts["model"], "gpu": opts["gpu_name"] or "cpu"}
    with exporting(
        BenchExporter, opts["metrics_port"], opts["metrics_host"], opts["pushgateway"], info=info
    ) as exporter:
        result = core.run_bench(
            cfg, progress=lambda msg: click.echo(f"vtune: {msg}", err=True), observer=exporter
        )
        if exporter is not None and result.summary is not None:
            exporter.finish(result.summary.to_json())
    _print(result)
    if opts["json_out"] is not None:
        path = core.write_json(result, opts["json_out"])
        click.echo(f"vtune: wrote {path}", err=True)
    if result.status != "ok":
        raise SystemExit(1)


def _config(o: dict[str, Any]) -> Any:
    """Build the BenchConfig from the parsed options (no I/O beyond the GPU registry)."""
    from tuner.engine.server import EngineSettings, LaunchConfig
    from tuner.load.generator import LoadConfig
    from tuner.measure import bench as core

    engine = launch = None
    if o["url"] is None:
        engine = EngineSettings.from_mapping(o["model"], o["engine_args"])
        launch_kw: dict[str, Any] = {"device": core.device_for(o["gpu_name"]), "port": o["port"]}
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
    )


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * scale:,.{digits}f}"


def _print(result: Any) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    s = result.summary
    if s is not None:
        t = Table(title="vtune bench", title_justify="left", show_header=False)
        t.add_column("", style="bold")
        t.add_column("", justify="right")
        for label, value in (
            ("completed / failed", f"{s.completed} / {s.failed}"),
            ("duration (s)", _fmt(s.duration)),
            ("request throughput (req/s)", _fmt(s.request_throughput)),
            ("request goodput (req/s)", _fmt(s.request_goodput)),
            ("output throughput (tok/s)", _fmt(s.output_throughput)),
            ("total token throughput (tok/s)", _fmt(s.total_token_throughput)),
            ("input / output tokens", f"{s.total_input_tokens:,} / {s.total_output_tokens:,}"),
            ("peak requests in flight", f"{s.peak_in_flight}"),
        ):
            t.add_row(label, value)
        console.print(t)
        lat = Table(title="latency (ms)", title_justify="left")
        for col in ("metric", "mean", "median", "std", "p90", "p95", "p99", "max"):
            lat.add_column(col, justify="right" if col != "metric" else "left")
        for name in ("ttft", "tpot", "itl", "e2el"):
            d = getattr(s, name)
            lat.add_row(
                name.upper(),
                *(
                    _fmt(getattr(d, k), 1e3)
                    for k in ("mean", "median", "std", "p90", "p95", "p99", "max")
                ),
            )
        console.print(lat)
    m = result.measurement
    if m is not None and m.server is not None:
        sv = m.server
        console.print(
            f"server: peak KV usage {_fmt(sv.peak_kv_cache_usage, 100, 1)}%, max running "
            f"{_fmt(sv.max_running, 1, 0)}, max waiting {_fmt(sv.max_waiting, 1, 0)}, "
            f"preemptions {_fmt(sv.preemptions, 1, 0)}, generated tokens "
            f"{_fmt(sv.generation_tokens, 1, 0)}, mean server TTFT "
            f"{_fmt(sv.server_ttft_mean, 1e3)} ms"
            + (f" ({sv.failures} scrapes failed)" if sv.failures else "")
        )
    for term, value, ok in result.slo_check:
        console.print(f"SLO {term}: {_fmt(value, 1e3)} ms {'[green]met' if ok else '[red]missed'}")
    if s is not None and s.errors:
        for err, n in list(s.errors.items())[:5]:
            console.print(f"[red]{n} x {escape(err)}")
    if result.status != "ok":
        console.print(
            f"[red]failed ({result.failure}): {escape(result.message or '')}"
            + (" — partial results" if result.partial else "")
        )
