"""Console (rich) rendering of results. Printing only: the figures come from the record and the
search modules (:mod:`tuner.search.front`); here they are compared and formatted."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from tuner.analytic.estimate import Estimate
from tuner.analytic.explain import ExplainLine
from tuner.cli.plan_screen import print_plan as print_plan  # re-exported: `vtune search` prints it
from tuner.cli.tables import fits, num, print_name_table
from tuner.search.front import dominating, front, front_points
from tuner.search.trial_record import finite

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


def print_search_result(outcome: Any, console: Console | None = None) -> None:
    """The final screen: every trial (what was measured, what ``vtune estimate`` predicted beside
    it, the regime when known), the finalists, the Pareto front over the figures the choice uses,
    the chosen profile and the measured gain over defaults, from the typed record
    (``outcome.record``). A candidate's name is never cut, whatever the width
    (:mod:`tuner.cli.tables`)."""
    out = console or Console()
    record = outcome.record
    _print_trials(out, record)
    for fin in record.finalists:
        out.print(
            f"  finalist {fin.name}: mean {num(fin.mean)} "
            f"[{num(fin.ci_low)}, {num(fin.ci_high)}] over {len(fin.samples)}",
            highlight=False,
        )
    _print_front(out, record)
    if record.within_noise:
        out.print(
            "[yellow]The best two finalists are within measurement noise: either is a "
            "sound choice.[/]"
        )
    if outcome.yaml_path is None:
        out.print("[bold red]No configuration met the SLO.[/]")
        return
    out.print(f"[bold green]Chosen:[/] {record.best}  ->  {outcome.yaml_path}", highlight=False)
    objective = record.objective or "objective"
    gain = record.gain
    if gain is not None and gain.ratio_of_finalist_means:
        out.print(
            f"Measured gain over vLLM defaults: x{gain.ratio_of_finalist_means:.2f} on the "
            f"re-measured means (first runs: x{gain.ratio or 0:.2f}, {objective} "
            f"{num(gain.baseline)} -> {num(gain.best)})"
        )
    elif gain is not None and gain.ratio:
        out.print(
            f"Measured gain over vLLM defaults: x{gain.ratio:.2f} "
            f"({objective} {num(gain.baseline)} -> {num(gain.best)}; one run each)"
        )
    elif record.baseline:
        out.print("vLLM defaults did not meet the SLO (or failed): gain not defined.")


SATURATED = " (sat.)"
MEASURED = "measured tok/s"


def _print_trials(out: Console, record: Any) -> None:
    """The trials table: measured figures, with the prediction (and the calibrated one, and the
    regime, when the record has them) beside the objective; when that is too wide for the
    console, the predictions go to a second table under the first."""
    objective = record.objective or "objective"
    measured, predicted, calibrated, regimes = [], [], [], []
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
                num(trial.objective),
                _rate_cell(best),
                num(best.get("p95_ttft_ms")),
                num(best.get("p95_tpot_ms")),
                "-" if kv is None else f"{kv * 100:.0f}",
            ]
        )
        measured.append(finite(best.get("output_throughput")))
        predicted.append(finite(trial.estimate.get("predicted_tokens_per_s")))
        calibrated.append(finite(trial.estimate.get("calibrated_tokens_per_s")))
        regime = getattr(trial, "regime", None)  # TrialRecord.regime: newer records only
        regimes.append(None if regime is None else str(regime))
    headers = ["#", "candidate", "state", objective, "rate req/s", "p95 TTFT ms"]
    headers += ["p95 TPOT ms", "peak KV %"]
    extra: list[tuple[str, list[str]]] = []  # (header, cells) beside the objective
    if any(v is not None for v in predicted):
        extra.append((MEASURED, [num(v) for v in measured]))
        extra.append(("predicted tok/s", [num(v) for v in predicted]))
        if any(v is not None for v in calibrated):
            extra.append(("calibrated tok/s", [num(v) for v in calibrated]))
    if any(r is not None for r in regimes):
        extra.append(("regime", [r or "-" for r in regimes]))
    # One table when it fits: the throughput objective *is* the measured tok/s there.
    inline = [e for e in extra if not (e[0] == MEASURED and objective == "throughput")]
    wide_headers = headers[:4] + [h for h, _ in inline] + headers[4:]
    wide_rows = [r[:4] + [c[i] for _, c in inline] + r[4:] for i, r in enumerate(rows)]
    if not extra or fits(out, wide_headers, wide_rows):
        print_name_table(out, wide_headers, wide_rows if extra else rows)
    else:
        legend = print_name_table(out, headers, rows)
        side = ["#", "candidate", *(h for h, _ in extra)]
        names = [[r[0], t.name] for r, t in zip(rows, record.trials, strict=True)]  # no "*"
        side_rows = [n + [c[i] for _, c in extra] for i, n in enumerate(names)]
        print_name_table(out, side, side_rows, "Predicted beside measured", legend=not legend)
    if any(r[4].endswith(SATURATED) for r in rows):
        out.print(
            "  (sat.): the SLO held at saturation (closed loop at the candidate's max "
            "concurrency), so no lower rate was needed: the rate is the one sustained there.",
            highlight=False,
        )
    _print_prediction_check(out, measured, predicted, calibrated)


def _rate_cell(best: dict[str, Any]) -> str:
    """The request rate of the trial's chosen point: the Poisson rate measured, or for a point
    measured closed loop (its ``rate`` None) the request rate sustained at saturation."""
    if not best:
        return "-"
    rate = finite(best.get("rate"))
    if rate is not None:
        return num(rate)
    sustained = finite(best.get("request_throughput"))
    return "-" if sustained is None else num(sustained) + SATURATED


def _print_prediction_check(
    out: Console,
    measured: list[float | None],
    predicted: list[float | None],
    calibrated: list[float | None],
) -> None:
    """One line: how measured output tok/s compares with the prediction, over the trials
    that have both (so the user knows how far to trust ``vtune estimate`` on this machine)."""
    parts = []
    for label, guesses in (("analytic", predicted), ("calibrated", calibrated)):
        ratios = sorted(m / g for m, g in zip(measured, guesses, strict=True) if m and g)
        if not ratios:
            continue
        spread = f"x{ratios[0]:.2f}"
        if len(ratios) > 1:
            spread += f" to x{ratios[-1]:.2f}, median x{statistics.median(ratios):.2f}"
        parts.append(f"{label} {spread} over {len(ratios)} trial{'s' * (len(ratios) != 1)}")
    if parts:
        out.print(
            "Measured / predicted output tok/s (at each trial's chosen point): " + "; ".join(parts),
            highlight=False,
        )


def _print_front(out: Console, record: Any) -> None:
    """The Pareto front, recomputed from the record over the figures the choice uses
    (:mod:`tuner.search.front`), saying which figures those are; the chosen setting marked,
    or, when it is off the front, the line that says why."""
    points = front_points(record.trials, record.finalists, record.objective)
    names = front(points)
    if not names:
        return
    on_means = any(p.on_mean for p in points)
    figures = (
        "re-measured finalists at their mean tok/s, the others at their one run"
        if on_means
        else "each trial's first run"
    )
    out.print(
        f"Pareto front (output tok/s vs p95 TPOT; {figures}): "
        + ", ".join(n + (" (chosen)" if n == record.best else "") for n in names),
        highlight=False,
    )
    better = dominating(points, record.best)
    if not better:
        return
    chosen = next(p for p in points if p.name == record.best)
    if record.objective == "throughput":
        why = (
            "the choice ranks the finalists' re-measured means, and these ran once"
            if chosen.on_mean and not any(p.on_mean for p in better)
            else "the choice ranks output tok/s meeting the SLO alone"
        )
    else:
        why = f"the choice ranks {record.objective or 'the objective'} alone, not tok/s vs TPOT"
    out.print(
        f"The chosen {record.best} is off this front: "
        f"{', '.join(p.name for p in better)} measured more output tok/s at a lower p95 TPOT; "
        f"{why}.",
        highlight=False,
    )


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
