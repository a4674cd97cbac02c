"""``vtune search``: prune with the bounds, run trials on real vLLM, pick under the SLO, write
the profile. Parses options, calls :mod:`tuner.search.prepare` and :mod:`tuner.search.run`,
prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tuner.cli.common import (
    engine_arg_option,
    gpu_option,
    kv_cache_memory_bytes_option,
    max_model_len_option,
    metrics_options,
    model_option,
    non_negative,
    positive_float,
    positive_int,
    seed_option,
    startup_timeout_option,
    telemetry_config,
    telemetry_options,
    workload_options,
    workload_spec,
)

# What the CLI adds to "vtune: interrupted by SIGTERM" when a search is stopped.
RESUME_HINT = "finished trials are saved — rerun the same command to resume"


def _key_value(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    out = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        out.append((key.strip(), value.strip()))
    return tuple(out)


@click.command()
@workload_options
@model_option("HF id, local directory or bundled card.")
@gpu_option("GPU from the registry, or cpu.", required=True)
@click.option("--slo", default=None, help='e.g. "ttft:p95<500ms;tpot:p95<50ms".')
@click.option(
    "--objective",
    type=click.Choice(["throughput", "goodput", "latency"]),
    default="throughput",
    show_default=True,
)
@click.option(
    "--rate",
    "latency_rate",
    type=float,
    callback=positive_float,
    help="With --objective latency: the request rate to measure latency at.",
)
@click.option(
    "--budget",
    type=int,
    callback=positive_int,
    help="Measured trials at most (the vLLM-defaults baseline included).",
)
@click.option(
    "--time-budget", type=float, callback=positive_float, help="Seconds for the trial phase."
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=V1,V2",
    help="Values to try for a vLLM knob, e.g. max_num_seqs=16,64,256 (repeatable).",
)
@click.option(
    "--space",
    "space_file",
    type=click.Path(path_type=Path),
    help="YAML file: knob -> list of values.",
)
@click.option(
    "--variant",
    "variants",
    multiple=True,
    metavar="NAME=PATH",
    callback=_key_value,
    help="A pre-quantized checkpoint to try, e.g. awq=/models/llama-awq.",
)
@click.option(
    "--build-variants",
    default="",
    help="Quantized variants to build and try, e.g. awq,gptq (built once, then reused).",
)
@click.option(
    "--max-quality-loss",
    type=float,
    callback=positive_float,
    help="Drop variants whose perplexity on the calibration texts rises more than this %.",
)
@click.option("--calib", default=None, help="Calibration texts (default: vtune's bundled set).")
@engine_arg_option("A vLLM setting fixed for every trial, e.g. enforce_eager (repeatable).")
@max_model_len_option()
@kv_cache_memory_bytes_option("Fix the KV pool (default on cpu: 1GiB).")
@click.option("--finalists", type=int, default=3, show_default=True, callback=non_negative)
@click.option(
    "--repeats",
    type=int,
    default=2,
    show_default=True,
    callback=non_negative,
    help="Re-runs of each finalist (0: no noise check).",
)
@click.option(
    "--sampler",
    type=click.Choice(["auto", "grid", "tpe", "nsga2"]),
    default="auto",
    show_default=True,
)
@click.option("--pareto", is_flag=True, help="Also optimise p95 TPOT (throughput vs latency).")
@click.option(
    "--seconds-per-point",
    type=float,
    default=10.0,
    show_default=True,
    callback=positive_float,
    help="Load duration of each measured rate.",
)
@click.option(
    "--iterations",
    type=int,
    default=3,
    show_default=True,
    callback=non_negative,
    help="Bisection steps of the rate search.",
)
@click.option(
    "--storage",
    default=None,
    help="Optuna storage URL or SQLite path (default: SQLite beside the profile).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Profiles root (default ./profiles).",
)
@seed_option()
@click.option("--dry-run", is_flag=True, help="Print the plan; launch nothing.")
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="List every candidate in the plan (pruned and capped ones too), not the first rows.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="With --dry-run: print the whole plan as one JSON object (for tools).",
)
@startup_timeout_option(600.0)
@click.option("--vllm-python", default=None, help="Python that has vLLM (default: this one).")
@telemetry_options
@metrics_options
def search(**o: Any) -> None:
    """Search vLLM settings for the best throughput under an SLO and write the profile."""
    from tuner.cli.console import print_plan
    from tuner.cli.plan_screen import plan_json
    from tuner.errors import ParameterError
    from tuner.search.prepare import prepare

    if o["as_json"] and not o["dry_run"]:
        raise ParameterError("--json prints the plan of a --dry-run; add --dry-run")
    prep = prepare(_config(o))
    for line in prep.warnings:
        click.echo(f"vtune: warning: {line}", err=True)
    if o["as_json"]:
        click.echo(json.dumps(plan_json(prep), indent=2, default=str))
        return
    print_plan(prep, verbose=o["show_all"])
    if o["dry_run"]:
        return
    _run(prep, o)


def _run(prep: Any, o: dict[str, Any]) -> None:
    """Measure the plan (the exporter and the progress bar listening), print the final screen."""
    from tuner.cli.console import print_search_result
    from tuner.cli.progress import SearchProgress
    from tuner.errors import Interrupted
    from tuner.outputs.prometheus import SearchExporter, exporting
    from tuner.search.outcome import ensure_feasible
    from tuner.search.prepare import check_storage
    from tuner.search.run import run_search

    info = {
        "model": prep.model.name,
        "gpu": prep.gpu.name,
        "objective": prep.config.settings.objective,
        "slo": str(prep.slo or ""),
    }
    with exporting(
        SearchExporter,
        o["metrics_port"],
        o["metrics_host"],
        o["pushgateway"],
        grouping={"study": prep.study_name},
        info=info,
    ) as exporter:
        from tuner.search.events import Fanout

        check_storage(prep)  # after the port check: a taken port must not create a study
        try:
            with SearchProgress() as progress:
                outcome = run_search(prep, Fanout([progress, exporter]))
        except Interrupted as stop:
            stop.hint = RESUME_HINT
            raise
    print_search_result(outcome)
    ensure_feasible(outcome)


def tune_config(argv: list[str]) -> Any:
    """The TuneConfig ``vtune search ARGV`` would run (benchmarks re-create a search's setup)."""
    ctx = search.make_context("search", list(argv))
    return _config(ctx.params)


def _config(o: dict[str, Any]) -> Any:
    from tuner.engine.server import LaunchConfig
    from tuner.search.prepare import TuneConfig
    from tuner.search.runner import SearchSettings

    settings = SearchSettings(
        objective=o["objective"],
        budget=o["budget"],
        time_budget_s=o["time_budget"],
        finalists=o["finalists"],
        repeats=o["repeats"],
        sampler=o["sampler"],
        pareto=o["pareto"],
        seed=o["seed"],
    )
    workload = workload_spec(o)
    launch_kwargs: dict[str, Any] = {"startup_timeout_s": o["startup_timeout"]}
    if o["vllm_python"]:
        launch_kwargs["python"] = o["vllm_python"]
    return TuneConfig(
        model=o["model"],
        gpu=o["gpu_name"],
        workload=workload,
        settings=settings,
        slo=o["slo"],
        params=o["params"],
        space_file=o["space_file"],
        max_model_len=o["max_model_len"],
        kv_cache_memory_bytes=o["kv_cache_memory_bytes"],
        engine_args=tuple(o["engine_args"].items()),
        variants=o["variants"],
        build_variants=tuple(m.strip() for m in o["build_variants"].split(",") if m.strip()),
        max_quality_loss=o["max_quality_loss"],
        calib=o["calib"],
        storage=o["storage"],
        out=o["out"],
        endpoint=o["endpoint"],
        seconds_per_point=o["seconds_per_point"],
        iterations=o["iterations"],
        latency_rate=o["latency_rate"],
        launch=LaunchConfig(**launch_kwargs),
        telemetry=telemetry_config(o),
    )
