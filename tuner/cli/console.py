"""Console (rich) rendering of results. Printing only: no computation beyond unit formatting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from tuner.analytic.estimate import Estimate
from tuner.analytic.explain import ExplainLine

GiB = 2**30


def _size(value: int) -> str:
    return f"{value / GiB:,.2f} GiB  ({value:,} B)"


def print_estimate(
    est: Estimate, *, explain: Sequence[ExplainLine] = (), console: Console | None = None
) -> None:
    """Print the estimate as two tables (memory and capacity; roofline ladder), then the
    ``explain`` lines when given."""
    out = console or Console()
    table = Table(
        title=f"{est.model} on {est.gpu} (quantization {est.quantization}, "
        f"KV {est.kv_cache_dtype}, TP {est.tensor_parallel_size})",
        show_header=False,
        title_justify="left",
    )
    table.add_column("quantity", style="bold")
    table.add_column("value", justify="right")
    rows = [
        (
            "parameters (total / active)",
            f"{est.param_count / 1e9:,.2f} B / {est.active_param_count / 1e9:,.2f} B",
        ),
        ("weights", _size(est.weight_bytes)),
        ("KV per token", f"{est.kv_bytes_per_token:,} B"),
        (f"KV per sequence (S = {est.context_len:,})", _size(est.kv_bytes_per_sequence)),
        ("naive max batch (whole card, no overhead)", f"{est.naive_max_batch:,}"),
        ("GPU memory", _size(est.gpu_memory_bytes)),
        ("activations (profiled peak)", _size(est.activation_bytes)),
        ("non-torch + CUDA graphs", _size(est.non_torch_bytes)),
        ("vLLM KV pool", _size(est.kv_pool_bytes)),
        (
            f"KV capacity (block {est.block_size})",
            f"{est.kv_capacity_tokens:,} tokens ({est.num_gpu_blocks:,} blocks)",
        ),
        (f"max concurrency at S = {est.context_len:,}", f"{est.max_concurrency:,.2f}"),
        ("roofline knee batch (weights only)", _knee(est.roofline_knee_batch)),
        ("roofline knee batch (with KV reads at S)", _knee(est.roofline_knee_batch_with_kv)),
        (
            "max_num_seqs / max_num_batched_tokens",
            f"{est.max_num_seqs:,} / {est.max_num_batched_tokens:,}",
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)
    if est.kv_pool_bytes <= 0:
        out.print("[bold red]The weights do not leave room for a KV cache on this GPU.[/]")

    ladder = Table(title="Predicted decode (context S)", title_justify="left")
    for col in ("batch", "step ms", "tokens/s", "bound", "fits KV"):
        ladder.add_column(col, justify="right")
    for p in est.ladder:
        ladder.add_row(
            str(p.batch),
            f"{p.step_time_s * 1e3:.2f}",
            f"{p.tokens_per_s:,.0f}",
            p.bound,
            "yes" if p.fits_kv else "[red]no[/]",
        )
    out.print(ladder)
    if explain:
        out.print("[bold]How each figure is computed[/]")
        for line in explain:
            out.print(
                f"  {line.label} = {line.formula}\n      = {line.values} = {line.result}",
                highlight=False,
            )


def _knee(value: float | None) -> str:
    return "none (memory-bound at every batch)" if value is None else f"{value:,.1f}"


def print_plan(prep: Any, *, verbose: bool = False, console: Console | None = None) -> None:
    """The search plan: survivors in trial order, pruned counts by rule, estimated time."""
    out = console or Console()
    plan = prep.plan
    out.print(
        f"[bold]Plan[/] for {prep.model.name} on {prep.gpu.name}: space of "
        f"{plan.space_size} combinations -> {len(plan.all())} to measure "
        f"(baseline included), {len(plan.pruned)} pruned, {len(plan.capped)} capped; "
        f"study {prep.study_name}"
    )
    if prep.slo is not None:
        out.print(f"SLO: {prep.slo}; objective: {prep.config.settings.objective}")
    counts = plan.counts_by_rule()
    if counts:
        out.print(
            "Pruned by rule: "
            + ", ".join(f"{rule} {n}" for rule, n in sorted(counts.items(), key=lambda x: -x[1]))
        )
    from tuner.search.runner import ANALYTIC_FIRST, queue_all

    settings = prep.config.settings
    order = plan.all()
    title = "Trial order (analytically best first)"
    if not queue_all(plan, settings):
        first = plan.first_picks(ANALYTIC_FIRST)
        order = first + [p for p in order if p not in first]
        sampler = "NSGA-II" if settings.pareto or settings.sampler == "nsga2" else "TPE"
        title = f"Candidates: the first {len(first)} run in this order, then {sampler} chooses"
    table = Table(title=title, title_justify="left")
    for col in ("#", "candidate", "predicted tok/s", "KV-feasible seqs", "knee"):
        table.add_column(col, justify="right" if col != "candidate" else "left")
    rows = order if verbose else order[:12]
    for i, p in enumerate(rows):
        knee = "-" if p.roofline_knee_batch is None else f"{p.roofline_knee_batch:,.0f}"
        table.add_row(
            str(i), p.name, f"{p.predicted_tokens_per_s:,.0f}", f"{p.max_concurrency:,.1f}", knee
        )
    out.print(table)
    if len(rows) < len(plan.all()):
        out.print(f"... and {len(plan.all()) - len(rows)} more (--dry-run lists all)")
    if verbose:
        for pr in plan.pruned[:50]:
            out.print(f"  pruned [{pr.rule}] {pr.candidate.name}: {pr.reason}", highlight=False)
        for cap in plan.capped[:50]:
            out.print(
                f"  capped {cap.original.name} -> {cap.capped.name}: {cap.reason}", highlight=False
            )
    minutes = prep.estimated_seconds() / 60
    out.print(f"Estimated time: up to {minutes:,.0f} min; profile -> {prep.yaml_path}")


def print_search_result(outcome: Any, console: Console | None = None) -> None:
    """The final screen: every trial, the chosen profile, the measured gain over defaults."""
    out = console or Console()
    result, record = outcome.result, outcome.record
    objective = record["objective"]
    table = Table(title="Trials", title_justify="left")
    for col in (
        "#",
        "candidate",
        "state",
        objective,
        "rate req/s",
        "p95 TTFT ms",
        "p95 TPOT ms",
        "peak KV %",
    ):
        table.add_column(col, justify="left" if col in ("candidate", "state") else "right")
    for trial in record["trials"]:
        best = trial.get("best") or {}
        kv = _peak_kv(trial)
        state = (
            trial["state"]
            if not trial.get("failure")
            else (f"{trial['state']}: {trial['failure'].get('class', '')}")
        )
        marker = " *" if trial["name"] == record.get("best") else ""
        table.add_row(
            "-" if trial.get("number") is None else str(trial["number"]),
            trial["name"] + marker,
            state,
            _num(trial.get("objective")),
            _num(best.get("rate")) if best else "-",
            _num(best.get("p95_ttft_ms")),
            _num(best.get("p95_tpot_ms")),
            "-" if kv is None else f"{kv * 100:.0f}",
        )
    out.print(table)
    for fin in record.get("finalists", []):
        out.print(
            f"  finalist {fin['name']}: mean {_num(fin['mean'])} "
            f"[{_num(fin['ci_low'])}, {_num(fin['ci_high'])}] over {len(fin['samples'])}"
        )
    if record.get("pareto_front"):
        out.print(
            "Pareto front (output throughput vs p95 TPOT): " + ", ".join(record["pareto_front"]),
            highlight=False,
        )
    if result.within_noise:
        out.print(
            "[yellow]The best two finalists are within measurement noise: either is a "
            "sound choice.[/]"
        )
    gain = record.get("gain") or {}
    if outcome.yaml_path is None:
        out.print("[bold red]No configuration met the SLO.[/]")
        return
    out.print(f"[bold green]Chosen:[/] {record['best']}  ->  {outcome.yaml_path}")
    if gain.get("ratio_of_finalist_means"):
        out.print(
            f"Measured gain over vLLM defaults: x{gain['ratio_of_finalist_means']:.2f} on the "
            f"re-measured means (first runs: x{gain['ratio'] or 0:.2f}, {objective} "
            f"{_num(gain['baseline'])} -> {_num(gain['best'])})"
        )
    elif gain.get("ratio"):
        out.print(
            f"Measured gain over vLLM defaults: x{gain['ratio']:.2f} "
            f"({objective} {_num(gain['baseline'])} -> {_num(gain['best'])}; one run each)"
        )
    elif record.get("baseline"):
        out.print("vLLM defaults did not meet the SLO (or failed): gain not defined.")


def _peak_kv(trial: dict[str, Any]) -> float | None:
    peaks = [
        ((p.get("server") or {}).get("peak_kv_cache_usage"))
        for p in ((trial.get("rate_search") or {}).get("points") or [])
    ]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
