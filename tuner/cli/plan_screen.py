"""The search plan, as ``vtune search`` prints it before running and as ``--dry-run`` shows it:
the order that will actually run (vLLM's defaults, the analytic picks, then what the sampler
chooses among), the first rows and a count; ``--all`` lists everything, ``--json`` gives the
whole plan to tools as one JSON object (:func:`plan_json`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from tuner.cli.tables import print_name_table
from tuner.search.runner import trial_order

PLAN_SCHEMA = "vtune.plan/1"
ROWS = 12  # candidates listed without --all (the queued ones always are)
HEADERS = ["#", "candidate", "predicted tok/s", "KV-feasible seqs", "knee"]


def plan_json(prep: Any) -> dict[str, Any]:
    """The whole plan: candidates in the order :func:`tuner.search.runner.trial_order` gives
    (``queued``: run first in this order; the rest are the sampler's to choose among) with
    the predictions that ranked them, every pruned candidate with its rule and reason, every
    capped one, the counts, the study name and the estimated time."""
    plan, settings = prep.plan, prep.config.settings
    order = trial_order(plan, settings)
    queued = {p.name for p in order.queued}
    return {
        "schema": PLAN_SCHEMA,
        "model": prep.model.name,
        "gpu": prep.gpu.name,
        "study": prep.study_name,
        "objective": settings.objective,
        "slo": str(prep.slo) if prep.slo is not None else None,
        "budget": settings.budget,
        "sampler": order.sampler,  # None: a grid, every candidate is queued
        "counts": {
            "space": plan.space_size,
            "candidates": len(plan.all()),
            "queued": len(order.queued),
            "sampled_from": len(order.rest),
            "pruned": len(plan.pruned),
            "capped": len(plan.capped),
            "pruned_by_rule": plan.counts_by_rule(),
        },
        "candidates": [
            {
                "index": i,
                "name": p.name,
                "queued": p.name in queued,
                "baseline": p.candidate.is_baseline,
                "knobs": p.candidate.knobs(),
                "capped_from": None if p.origin in (None, p.candidate) else p.origin.name,
                **p.estimate_json(),
            }
            for i, p in enumerate(order.candidates)
        ],
        "pruned": [
            {
                "name": p.candidate.name,
                "knobs": p.candidate.knobs(),
                "rule": p.rule,
                "reason": p.reason,
            }
            for p in plan.pruned
        ],
        "capped": [
            {"from": c.original.name, "to": c.capped.name, "reason": c.reason} for c in plan.capped
        ],
        "estimated_seconds": round(prep.estimated_seconds(), 1),
        "profile": str(prep.yaml_path),
        "warnings": list(prep.warnings),
    }


def print_plan(prep: Any, *, verbose: bool = False, console: Console | None = None) -> None:
    """The plan: sizes and study, pruned counts by rule (one reason each), the candidates in
    the order the search queues them, then (with a sampler) the ones it chooses among, first
    rows only unless ``verbose`` (``--all``: every candidate, pruned and capped one)."""
    out = console or Console()
    plan, settings = prep.plan, prep.config.settings
    out.print(
        f"[bold]Plan[/] for {prep.model.name} on {prep.gpu.name}: space of "
        f"{plan.space_size} combinations -> {len(plan.all())} to measure "
        f"(baseline included), {len(plan.pruned)} pruned, {len(plan.capped)} capped; "
        f"study {prep.study_name}",
        highlight=False,
    )
    if prep.slo is not None:
        out.print(f"SLO: {prep.slo}; objective: {settings.objective}", highlight=False)
    for rule, n in sorted(plan.counts_by_rule().items(), key=lambda x: -x[1]):
        example = next(p for p in plan.pruned if p.rule == rule)
        out.print(f"Pruned {n} by {rule}, e.g. {example.reason}", highlight=False)

    order = trial_order(plan, settings)  # the order the search itself queues
    everything = order.candidates
    if order.sampler is None:
        shown = everything if verbose else everything[:ROWS]
        title = f"Trial order, all {len(everything)}: vLLM's defaults, then best predicted"
        print_name_table(out, HEADERS, _rows(shown, 0), title)
    else:
        n = len(order.queued)
        title = (
            f"Candidates: the first {n} run in this order, then {order.sampler} chooses "
            f"among the other {len(order.rest)}"
        )
        print_name_table(out, HEADERS, _rows(order.queued, 0), title)
        rest = order.rest if verbose else order.rest[: max(ROWS - n, 0)]
        title = f"{order.sampler} chooses among these {len(order.rest)}, best predicted first"
        if settings.budget is not None:
            left = max(settings.budget - n, 0)
            title += f" (--budget {settings.budget}: {left} more trial{'s' * (left != 1)})"
        if rest:
            print_name_table(out, HEADERS, _rows(rest, n), title)
        shown = [*order.queued, *rest]
    if len(shown) < len(everything):
        out.print(
            f"... and {len(everything) - len(shown)} more: `vtune search ... --dry-run --all` "
            "lists every candidate (pruned and capped ones too), --json gives the plan to tools",
            highlight=False,
        )
    if verbose:
        for pr in plan.pruned:
            out.print(
                f"  pruned [{pr.rule}] {pr.candidate.name}: {pr.reason}",
                highlight=False,
                markup=False,  # "[rule]" is text, not rich markup
                soft_wrap=True,  # one line each, for grep
            )
        for cap in plan.capped:
            out.print(
                f"  capped {cap.original.name} -> {cap.capped.name}: {cap.reason}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    minutes = prep.estimated_seconds() / 60
    out.print(
        f"Estimated time: up to {minutes:,.0f} min; profile -> {prep.yaml_path}", highlight=False
    )


def _rows(planned: Any, start: int) -> list[list[str]]:
    rows = []
    for i, p in enumerate(planned, start):
        knee = "-" if p.roofline_knee_batch is None else f"{p.roofline_knee_batch:,.0f}"
        rows.append(
            [str(i), p.name, f"{p.predicted_tokens_per_s:,.0f}", f"{p.max_concurrency:,.1f}", knee]
        )
    return rows
