"""The report's PNG plots (matplotlib, Agg backend; nothing is shown on screen).

Each ``plot_*`` function draws one figure from :class:`~tuner.outputs.views.TrialView` rows into
a PNG and returns its path, or None when the record holds nothing to draw (no measured trial, no
prediction, no KV series). Latency axes use the SLO's percentile for that metric when the SLO
names one (a p99 target is drawn against p99), else p95.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tuner.outputs.figure import (
    BASELINE,
    BEST,
    DIM,
    MAX_LINES,
    OBJECTIVE_UNITS,
    OTHER,
    highlighted,
    minor_tick,
    point_xy,
    save,
    slo_axes,
    tick,
    trial_colors,
    trial_marker,
)
from tuner.outputs.plots_detail import plot_estimate_error, plot_kv_usage, plot_pruning
from tuner.outputs.plots_roofline import plot_roofline
from tuner.outputs.views import TrialView
from tuner.search.objective import OBJECTIVES, is_better
from tuner.search.record import SearchRecord
from tuner.search.stats import pareto_front


def plot_throughput_latency(
    record: SearchRecord, views: Sequence[TrialView], path: Path
) -> Path | None:
    """Output throughput against TPOT and TTFT: each trial's load points as a line, its chosen
    point as a big marker (star: best, square: baseline), the SLO as a dashed line."""
    measured = [v for v in views if v.points]
    if not measured:
        return None
    axes_spec = slo_axes(record.slo)
    shown = highlighted(measured, MAX_LINES)
    others = [v for v in measured if v not in shown]
    colors = trial_colors(shown)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    for ax, metric, title in ((axes[0], "tpot", "TPOT"), (axes[1], "ttft", "TTFT")):
        stat, limit = axes_spec[metric]
        key = f"{stat}_{metric}_ms"
        rest = [(v.latency_ms.get(f"{stat}_{metric}"), v.output_throughput) for v in others]
        rest = [(x, y) for x, y in rest if x is not None and y is not None]
        if rest:
            ax.scatter(*zip(*rest, strict=True), s=30, color=DIM, edgecolor=OTHER, zorder=2)
        for v in shown:
            pts = sorted((point_xy(p, key) for p in v.points), key=lambda xy: xy[1] or 0)
            pts = [(x, y) for x, y in pts if x is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "-", color=colors[v.name], alpha=0.45, lw=1.2)
                ax.scatter(*zip(*pts, strict=True), s=14, color=colors[v.name], alpha=0.6)
            x, y = v.latency_ms.get(f"{stat}_{metric}"), v.output_throughput
            if x is not None and y is not None:
                m, size = trial_marker(v)
                ax.scatter(
                    [x],
                    [y],
                    marker=m,
                    s=size,
                    color=colors[v.name],
                    edgecolor="black",
                    linewidth=0.8,
                    zorder=3,
                )
        if limit is not None:
            ax.axvline(limit, color="#d62728", ls="--", lw=1.2)
            ax.text(
                limit,
                1.0,
                f" SLO {stat} < {limit:g} ms",
                color="#d62728",
                fontsize=9,
                va="top",
                ha="left",
                transform=ax.get_xaxis_transform(),
            )
        xs = [x for v in measured for x, _ in (point_xy(p, key) for p in v.points) if x]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
            ax.set_xscale("log")  # TTFT explodes past capacity; keep the SLO region readable
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(tick))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor_tick))
        ax.set_xlabel(f"{stat} {title} (ms{', log scale' if ax.get_xscale() == 'log' else ''})")
        ax.set_title(f"Output throughput vs {stat} {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("output throughput (tokens/s)")
    axes[0].set_ylim(bottom=0)
    handles = [
        plt.Line2D(
            [],
            [],
            color=colors[v.name],
            marker=trial_marker(v)[0],
            ls="-",
            markersize=9 if v.is_best else 6,
            label=v.label
            + (" (best)" if v.is_best else "")
            + (" (baseline)" if v.baseline else ""),
        )
        for v in shown
    ]
    if others:
        handles.append(
            plt.Line2D(
                [],
                [],
                color=DIM,
                marker="o",
                ls="",
                markeredgecolor=OTHER,
                label=f"{len(others)} other trials (chosen point only)",
            )
        )
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(3, len(handles)),
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(
        "Each line: one trial's measured load points; big marker: its chosen point",
        fontsize=10,
        y=0.995,
    )
    fig.tight_layout()
    return save(fig, path)


def plot_pareto(record: SearchRecord, views: Sequence[TrialView], path: Path) -> Path | None:
    """Chosen points in the (TPOT, throughput) plane; the Pareto front joined and named."""
    stat, limit = slo_axes(record.slo)["tpot"]
    key = f"{stat}_tpot"
    pts = [(v, v.latency_ms.get(key), v.output_throughput) for v in views]
    pts = [(v, x, y) for v, x, y in pts if x is not None and y is not None]
    if not pts:
        return None
    names = list(record.pareto_front) or pareto_front([(v.name, y, x) for v, x, y in pts])
    on_front = set(names)
    fig, ax = plt.subplots(figsize=(9, 6))
    front = sorted(((x, y, v) for v, x, y in pts if v.name in on_front), key=lambda t: t[0])
    rest = [(x, y, v) for v, x, y in pts if v.name not in on_front]
    if rest:
        ax.scatter(
            [r[0] for r in rest],
            [r[1] for r in rest],
            color=DIM,
            s=50,
            edgecolor=OTHER,
            label="dominated",
        )
    if front:
        ax.step(
            [f[0] for f in front],
            [f[1] for f in front],
            where="post",
            color=BEST,
            lw=1.5,
            alpha=0.7,
        )
        ax.scatter(
            [f[0] for f in front],
            [f[1] for f in front],
            color=BEST,
            s=70,
            edgecolor="black",
            zorder=3,
            label="Pareto front",
        )
    crowded = len(front) > 8  # names would overlap: short tags, the table has the names
    for x, y, v in front + (rest if len(pts) <= 20 else []):
        text = v.label if v.name in on_front and not crowded else v.tag
        if v.is_best:
            text += " (best)"
        ax.annotate(
            text,
            (x, y),
            xytext=(6, 4),
            textcoords="offset points",
            fontsize=8,
            color="black" if v.name in on_front else OTHER,
        )
    if limit is not None:
        ax.axvline(limit, color="#d62728", ls="--", lw=1.2, label=f"SLO {stat} TPOT < {limit:g} ms")
    ax.set_xlabel(f"{stat} TPOT (ms) at the chosen point — lower is better")
    ax.set_ylabel("output throughput (tokens/s) — higher is better")
    ax.set_title("Pareto front: no other trial is both faster and higher-throughput")
    ax.set_ylim(bottom=0)
    ax.margins(x=0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
    fig.tight_layout()
    return save(fig, path)


def plot_objective(record: SearchRecord, views: Sequence[TrialView], path: Path) -> Path | None:
    """The objective of each trial in order, failed and pruned trials marked, best so far."""
    if not views:
        return None
    fig, ax = plt.subplots(figsize=(min(16, max(7, 0.55 * len(views) + 3)), 4.5))
    xs = list(range(len(views)))
    vals = [
        v.objective if v.state == "complete" and v.objective is not None else 0.0 for v in views
    ]
    colors = [
        BEST
        if v.is_best
        else BASELINE
        if v.baseline
        else "#d62728"
        if v.state == "failed"
        else DIM
        if v.state == "pruned"
        else OTHER
        for v in views
    ]
    ax.bar(xs, vals, color=colors)
    top = max(vals) if any(vals) else 1.0
    for x, v in zip(xs, views, strict=True):
        if v.state != "complete":
            failed = v.state == "failed"
            tag = f"failed: {v.failure_class}" if failed and v.failure_class else v.state
            ax.text(
                x,
                top * 0.02,
                tag,
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=9,
                color="#d62728" if failed else OTHER,
                fontweight="bold" if failed else None,
            )
    objective = record.objective if record.objective in OBJECTIVES else "throughput"
    running: float | None = None
    best_so_far = []
    for val, v in zip(vals, views, strict=True):
        if v.state == "complete" and is_better(objective, val, running):
            running = val  # the objective's own direction: the lowest latency, else highest
        best_so_far.append(running if running is not None else math.nan)
    ax.step(xs, best_so_far, where="mid", color="black", lw=1, ls="--", label="best so far")
    ax.set_xticks(xs, [v.tag for v in views], rotation=90 if len(views) > 30 else 0)
    ax.set_xlabel("trial")
    ax.set_ylabel(OBJECTIVE_UNITS.get(objective, objective))
    ax.set_title(
        "Objective per trial (green: best, blue: baseline, red: failed, light grey: pruned)",
        fontsize=10,
    )
    ax.set_ylim(0, top * 1.15)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left")
    fig.tight_layout()
    return save(fig, path)


PLOTS = (
    (
        "Output throughput vs TPOT and TTFT per trial",
        "throughput_latency.png",
        plot_throughput_latency,
    ),
    ("Pareto front", "pareto.png", plot_pareto),
    ("Pruned vs measured candidates", "pruning.png", plot_pruning),
    (
        "Predicted vs measured throughput (estimator error)",
        "estimate_error.png",
        plot_estimate_error,
    ),
    (
        "Throughput and utilization vs batch (roofline regime, analytic knee)",
        "roofline.png",
        plot_roofline,
    ),
    ("KV-cache usage over each trial", "kv_usage.png", plot_kv_usage),
    ("Objective per trial", "objective.png", plot_objective),
)


def render_all(record: SearchRecord, views: Sequence[TrialView], out_dir: Path) -> dict[str, Path]:
    """Draw every plot that has data; title -> PNG path, in the report's order."""
    out = {}
    for title, filename, fn in PLOTS:
        made = fn(record, views, Path(out_dir) / filename)
        if made is not None:
            out[title] = made
    return out
