"""Console (rich) rendering of results. Printing only: no computation beyond unit formatting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

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
    from tuner.search.runner import trial_order

    trials = trial_order(plan, prep.config.settings)  # the order the search itself queues
    order = trials.candidates
    title = "Trial order (analytically best first)"
    if trials.sampler is not None:
        title = (
            f"Candidates: the first {len(trials.queued)} run in this order, "
            f"then {trials.sampler} chooses"
        )
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
    """The final screen: every trial, the chosen profile, the measured gain over defaults,
    from the typed record (``outcome.record``). A candidate's name is never cut, whatever the
    width (:func:`_trial_table`)."""
    out = console or Console()
    record = outcome.record
    objective = record.objective or "objective"
    headers = [
        *("#", "candidate", "state", objective),
        *("rate req/s", "p95 TTFT ms", "p95 TPOT ms", "peak KV %"),
    ]
    rows = []
    for trial in record.trials:
        best = trial.best or {}
        kv = trial.peak_kv
        failure = trial.failure_class
        rows.append(
            [
                "-" if trial.number is None else str(trial.number),
                trial.name + (" *" if trial.name == record.best else ""),
                trial.state if failure is None else f"{trial.state}: {failure}",
                _num(trial.objective),
                _num(best.get("rate")) if best else "-",
                _num(best.get("p95_ttft_ms")),
                _num(best.get("p95_tpot_ms")),
                "-" if kv is None else f"{kv * 100:.0f}",
            ]
        )
    table, legend = _trial_table(out, headers, rows, name_col=1)
    out.print(table)
    for line in legend:
        out.print(line, highlight=False, soft_wrap=True)
    for fin in record.finalists:
        out.print(
            f"  finalist {fin.name}: mean {_num(fin.mean)} "
            f"[{_num(fin.ci_low)}, {_num(fin.ci_high)}] over {len(fin.samples)}",
            highlight=False,
        )
    if record.pareto_front:
        out.print(
            "Pareto front (output throughput vs p95 TPOT): " + ", ".join(record.pareto_front),
            highlight=False,
        )
    if record.within_noise:
        out.print(
            "[yellow]The best two finalists are within measurement noise: either is a "
            "sound choice.[/]"
        )
    if outcome.yaml_path is None:
        out.print("[bold red]No configuration met the SLO.[/]")
        return
    out.print(f"[bold green]Chosen:[/] {record.best}  ->  {outcome.yaml_path}", highlight=False)
    gain = record.gain
    if gain is not None and gain.ratio_of_finalist_means:
        out.print(
            f"Measured gain over vLLM defaults: x{gain.ratio_of_finalist_means:.2f} on the "
            f"re-measured means (first runs: x{gain.ratio or 0:.2f}, {objective} "
            f"{_num(gain.baseline)} -> {_num(gain.best)})"
        )
    elif gain is not None and gain.ratio:
        out.print(
            f"Measured gain over vLLM defaults: x{gain.ratio:.2f} "
            f"({objective} {_num(gain.baseline)} -> {_num(gain.best)}; one run each)"
        )
    elif record.baseline:
        out.print("vLLM defaults did not meet the SLO (or failed): gain not defined.")


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _trial_table(
    out: Console, headers: list[str], rows: list[list[str]], name_col: int
) -> tuple[Table, list[str]]:
    """The trials as a table in which the ``name_col`` cells are never cut or wrapped.

    rich shrinks every column of a table wider than the console, names included, so the
    widths are chosen here: every column at its natural width when that fits; else the name
    column whole and the others down to their longest word (headers and states wrap), the
    room left going to the columns that need the least of it; else, when even that does not
    fit, the table leaves the names out and the legend returned lists ``#: name`` in full."""
    natural = [max(len(c) for c in [h, *(r[j] for r in rows)]) for j, h in enumerate(headers)]
    shortest = [
        max(len(word) for c in [h, *(r[j] for r in rows)] for word in c.split() or [""])
        for j, h in enumerate(headers)
    ]
    chrome = _table_width(out, headers, natural) - sum(natural)
    room = out.width - chrome
    if sum(natural) <= room:
        return _make_table(headers, rows, natural), []
    widths = [natural[j] if j == name_col else shortest[j] for j in range(len(headers))]
    spare = room - sum(widths)
    if spare >= 0:
        for j in sorted(range(len(headers)), key=lambda j: natural[j] - widths[j]):
            grant = min(spare, natural[j] - widths[j])
            widths[j] += grant
            spare -= grant
        return _make_table(headers, rows, widths), []
    keep = [j for j in range(len(headers)) if j != name_col]
    table = _make_table([headers[j] for j in keep], [[r[j] for j in keep] for r in rows], None)
    return table, [f"  {r[0]}: {r[name_col]}" for r in rows]


def _make_table(headers: list[str], rows: list[list[str]], widths: list[int] | None) -> Table:
    """The trials table; ``widths`` fixes each column's content width (None: rich decides)."""
    table = Table(
        title="Trials",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for j, header in enumerate(headers):
        left = header in ("candidate", "state")
        table.add_column(
            header,
            justify="left" if left else "right",
            width=None if widths is None else widths[j],
            no_wrap=header == "candidate",
            overflow="fold",  # a figure narrower than its column folds, never ends in "…"
        )
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def _table_width(out: Console, headers: list[str], widths: list[int]) -> int:
    """The rendered width of a trials table with these content widths (chrome included)."""
    table = _make_table(headers, [], widths)
    unbounded = out.options.update_width(sum(widths) + 1000)  # measured, not clamped to the console
    return Measurement.get(out, unbounded, table).maximum


def print_bench_result(result: Any, console: Console | None = None) -> None:
    """``vtune bench``'s screen for a :class:`tuner.measure.bench.BenchResult`: the summary and
    latency tables, the server's scraped figures, the SLO check, the first errors, and the
    failure line when the run failed."""
    from rich.markup import escape

    out = console or Console()
    s = result.summary
    if s is not None:
        t = Table(title="vtune bench", title_justify="left", show_header=False)
        t.add_column("", style="bold")
        t.add_column("", justify="right")
        for label, value in (
            ("completed / failed", f"{s.completed} / {s.failed}"),
            ("duration (s)", _fixed(s.duration)),
            ("request throughput (req/s)", _fixed(s.request_throughput)),
            ("request goodput (req/s)", _fixed(s.request_goodput)),
            ("output throughput (tok/s)", _fixed(s.output_throughput)),
            ("total token throughput (tok/s)", _fixed(s.total_token_throughput)),
            ("input / output tokens", f"{s.total_input_tokens:,} / {s.total_output_tokens:,}"),
            ("peak requests in flight", f"{s.peak_in_flight}"),
        ):
            t.add_row(label, value)
        out.print(t)
        lat = Table(title="latency (ms)", title_justify="left")
        for col in ("metric", "mean", "median", "std", "p90", "p95", "p99", "max"):
            lat.add_column(col, justify="right" if col != "metric" else "left")
        for name in ("ttft", "tpot", "itl", "e2el"):
            d = getattr(s, name)
            lat.add_row(
                name.upper(),
                *(
                    _fixed(getattr(d, k), 1e3)
                    for k in ("mean", "median", "std", "p90", "p95", "p99", "max")
                ),
            )
        out.print(lat)
    m = result.measurement
    if m is not None and m.server is not None:
        sv = m.server
        out.print(
            f"server: peak KV usage {_fixed(sv.peak_kv_cache_usage, 100, 1)}%, max running "
            f"{_fixed(sv.max_running, 1, 0)}, max waiting {_fixed(sv.max_waiting, 1, 0)}, "
            f"preemptions {_fixed(sv.preemptions, 1, 0)}, generated tokens "
            f"{_fixed(sv.generation_tokens, 1, 0)}, mean server TTFT "
            f"{_fixed(sv.server_ttft_mean, 1e3)} ms"
            + (f" ({sv.failures} scrapes failed)" if sv.failures else "")
        )
    for term, value, ok in result.slo_check:
        out.print(f"SLO {term}: {_fixed(value, 1e3)} ms {'[green]met' if ok else '[red]missed'}")
    if s is not None and s.errors:
        for err, n in list(s.errors.items())[:5]:
            out.print(f"[red]{n} x {escape(err)}")
    if result.status != "ok":
        out.print(
            f"[red]failed ({result.failure}): {escape(result.message or '')}"
            + (" — partial results" if result.partial else "")
        )


def _fixed(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    """``value x scale`` with thousands separators and ``digits`` decimals; "-" for None and
    NaN (the one float unequal to itself)."""
    return "-" if value is None or value != value else f"{value * scale:,.{digits}f}"
