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


class _SearchCommand(click.Command):
    """Keeps the arguments as given: the workers of ``--workers N`` re-run them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["vtune_search_args"] = list(args)
        return super().parse_args(ctx, args)


@click.command(cls=_SearchCommand)
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
    "--finalist-runs",
    type=click.Choice(["in-trial", "relaunch"]),
    default="in-trial",
    show_default=True,
    help="Where finalists are re-run: in-trial = right after a contending trial's rate search, "
    "in its own launch (no launch more); relaunch = a fresh launch per finalist after the "
    "trials (also samples launch-to-launch variation).",
)
@click.option(
    "--early-stop-margin",
    type=float,
    default=0.15,
    show_default=True,
    callback=non_negative,
    help="Stop a trial after its capacity probe when the probe, raised by this fraction "
    "(the noise), cannot reach the best objective so far.",
)
@click.option("--no-early-stop", is_flag=True, help="Run every trial's rate search to the end.")
@click.option(
    "--sampler",
    type=click.Choice(["auto", "grid", "tpe", "nsga2"]),
    default="auto",
    show_default=True,
    help="grid: every candidate, none pruned by the calibrated model (auto: a grid for a small "
    "space, with calibrated pruning; TPE otherwise).",
)
@click.option(
    "--screen/--no-screen",
    default=None,
    help="Screen max_num_seqs inside one launch (a client-side cap on requests in flight) "
    "right after the baseline, prune the losers, launch only the promising ones "
    "(default: on unless the search is a grid).",
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
    help="Optuna storage URL or SQLite path (default: SQLite beside the profile; with "
    "--workers N: a journal file, or PATH.journal).",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    callback=positive_int,
    help="Workers on one study, each on its own devices (default 1; with --devices: one per "
    "device group).",
)
@click.option(
    "--devices",
    default=None,
    metavar="IDS",
    help="GPUs (or CPUs with --gpu cpu) the workers split, e.g. 0,1,2,3 (default: all).",
)
@click.option("--fleet-worker", default=None, hidden=True)  # a child of --workers N
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Profiles root (default ./profiles).",
)
@click.option(
    "--gpu-hour-price",
    type=float,
    default=None,
    callback=positive_float,
    help="USD per GPU-hour (e.g. 4.10): the record and the profile add $/1M output tokens.",
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
    from tuner.errors import ParameterError
    from tuner.search import fleet, fleet_run
    from tuner.search.prepare import prepare

    if o["as_json"] and not o["dry_run"]:
        raise ParameterError("--json prints the plan of a --dry-run; add --dry-run")
    prep = prepare(_config(o))
    workers = fleet.plan_for(prep, o["workers"], o["devices"])
    if o["fleet_worker"]:  # one of the workers of `--workers N`: trials only, no screen
        fleet_run.run_worker(prep, workers, o["fleet_worker"], click.echo)
        return
    from tuner.cli.console import print_plan  # not a worker's: it prints no plan
    from tuner.cli.plan_screen import plan_json

    for line in prep.warnings:
        click.echo(f"vtune: warning: {line}", err=True)
    if o["as_json"]:
        click.echo(json.dumps(plan_json(prep), indent=2, default=str))
        return
    print_plan(prep, verbose=o["show_all"])
    for line in fleet.describe(prep, workers) if workers is not None else ():
        click.echo(line)
    if o["dry_run"]:
        return
    if workers is not None:  # pinned here, or the workers run; then the finalists, the profile
        args = click.get_current_context().meta["vtune_search_args"]
        prep = fleet_run.run_workers(prep, workers, args, click.echo, _final_imports)
    _run(prep, o)


def _final_imports() -> None:
    """The modules :func:`_run` imports, for a fleet's parent to import while its workers
    measure (tuner.search.fleet_run.Warmup)."""
    import tuner.cli.console
    import tuner.cli.progress
    import tuner.outputs.prometheus
    import tuner.search.outcome  # noqa: F401


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
    if outcome.yaml_path is not None and outcome.record.cost is not None:
        from tuner.search.cost import cost_line

        click.echo(cost_line(outcome.record.cost))
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
        finalist_runs=o["finalist_runs"],
        early_stop_margin=None if o["no_early_stop"] else o["early_stop_margin"],
        sampler=o["sampler"],
        pareto=o["pareto"],
        seed=o["seed"],
        screen=o["screen"],
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
        gpu_hour_price=o["gpu_hour_price"],
    )
