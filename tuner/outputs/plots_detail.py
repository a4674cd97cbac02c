"""The report's plots of the plan and the server: pruned vs measured candidates, the
estimator's error, and vLLM's KV-cache usage over each trial (shared helpers in
``tuner.outputs.figure``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

from tuner.outputs.figure import (
    BASELINE,
    BEST,
    DIM,
    MAX_LINES,
    highlighted,
    load_label,
    save,
    trial_colors,
    trial_marker,
)
from tuner.outputs.views import TrialView
from tuner.search.record import SearchRecord
from tuner.search.record_parts import PrunedEntry


def plot_pruning(record: SearchRecord, views: Sequence[TrialView], path: Path) -> Path | None:
    """Where the candidates went: pruned by each rule, capped, measured (complete / failed),
    and left unsampled by the budget; beside it the space's two main knobs."""
    plan = record.plan
    counts = dict(plan.counts_by_rule)
    pruned = plan.pruned
    if not counts and pruned:
        for p in pruned:
            counts[p.rule] = counts.get(p.rule, 0) + 1
    n_cands = plan.kept
    launched = [v for v in views if v.state in ("complete", "failed")]
    bars: list[tuple[str, float, str]] = [
        (f"pruned: {rule}", n, "#ff7f0e") for rule, n in sorted(counts.items(), key=lambda t: -t[1])
    ]
    if plan.capped:
        bars.append(("capped (kept, max_num_seqs lowered)", len(plan.capped), "#bcbd22"))
    sampled_pruned = sum(v.state == "pruned" for v in views)
    if sampled_pruned:
        bars.append(("sampled, then pruned", sampled_pruned, "#ffbb78"))
    bars.append(("measured: complete", sum(v.state == "complete" for v in views), BEST))
    bars.append(("measured: failed", sum(v.state == "failed" for v in views), "#d62728"))
    if n_cands is not None:
        bars.append(("kept, not measured (budget)", max(0, n_cands - len(launched)), DIM))
    if not any(n for _, n, _ in bars):
        return None
    knob_pts = _knob_scatter_data(pruned, views)
    ncols = 2 if knob_pts else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 5.5), squeeze=False)
    ax = axes[0][0]
    labels, values, cols = zip(*reversed(bars), strict=True)
    ax.barh(labels, values, color=cols)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, max(values) * 3)
    for i, val in enumerate(values):
        ax.text(val, i, f" {val:g}", va="center", fontsize=9)
    ax.set_xlabel("candidates (log scale past 10)")
    total = plan.space_size
    ax.set_title("Candidates: pruned vs measured" + (f" (space: {total})" if total else ""))
    if knob_pts:
        _draw_knob_scatter(axes[0][1], *knob_pts)
    fig.tight_layout()
    return save(fig, path)


def _knob_scatter_data(pruned: Sequence[PrunedEntry], views: Sequence[TrialView]) -> Any:
    """(x knob, y knob, [(x, y, kind, label)]) over the two numeric knobs seen most, or None."""
    seen: dict[str, int] = {}
    for knobs in [p.knobs for p in pruned] + [v.knobs for v in views]:
        for k, val in knobs.items():
            if isinstance(val, int | float) and not isinstance(val, bool):
                seen[k] = seen.get(k, 0) + 1
    if len(seen) < 2:
        return None
    kx, ky = sorted(seen, key=lambda k: (-seen[k], k))[:2]
    pts = []
    for p in pruned:
        kn = p.knobs
        if kx in kn and ky in kn:
            pts.append((kn[kx], kn[ky], "plan", p.rule))
    for v in views:
        if kx in v.knobs and ky in v.knobs:
            pts.append((v.knobs[kx], v.knobs[ky], v.state, v.tag))
    return (kx, ky, pts) if pts else None


def _draw_knob_scatter(ax: Any, kx: str, ky: str, pts: list[tuple[Any, Any, str, str]]) -> None:
    rules = sorted({lab for _, _, kind, lab in pts if kind == "plan"})
    rule_colors = {r: plt.get_cmap("Dark2")(i) for i, r in enumerate(rules)}
    for r in rules:
        xs = [x for x, _, k, lab in pts if k == "plan" and lab == r]
        ys = [y for _, y, k, lab in pts if k == "plan" and lab == r]
        ax.scatter(xs, ys, marker="x", s=60, color=rule_colors[r], label=f"pruned: {r}")
    for state, color, marker in (
        ("complete", BEST, "o"),
        ("failed", "#d62728", "X"),
        ("pruned", "#ffbb78", "v"),
    ):  # sampled, then pruned
        sel = [(x, y, lab) for x, y, k, lab in pts if k == state]
        if sel:
            ax.scatter(
                [s[0] for s in sel],
                [s[1] for s in sel],
                marker=marker,
                s=90,
                color=color,
                edgecolor="black",
                label=f"trial: {state}",
                zorder=3,
            )
            for x, y, lab in sel:
                ax.annotate(lab, (x, y), xytext=(6, 5), textcoords="offset points", fontsize=8)
    for axis, knob in ((ax.xaxis, kx), (ax.yaxis, ky)):
        values = [p[0] if axis is ax.xaxis else p[1] for p in pts]
        if min(values) > 0 and max(values) / min(values) >= 8:
            (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log", base=2)
            axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_label_text(knob.replace("_", "-"))
    ax.set_title("Knob space: trials and pruned candidates (other knobs overlap)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_estimate_error(
    record: SearchRecord, views: Sequence[TrialView], path: Path
) -> Path | None:
    """The estimator's predicted decode throughput against the highest measured one."""
    pts = [
        (v, v.predicted_tps, v.measured_max_tps)
        for v in views
        if v.predicted_tps and v.measured_max_tps
    ]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    lo, hi = min(xs + ys) * 0.8, max(xs + ys) * 1.2
    log = hi / lo > 20
    grid = [lo, hi]
    ax.plot(grid, grid, color="black", lw=1, label="measured = predicted")
    ax.fill_between(
        grid,
        [g * 0.75 for g in grid],
        [g * 1.25 for g in grid],
        color=DIM,
        alpha=0.35,
        label="±25 %",
    )
    shown = {v.name for v in highlighted([p[0] for p in pts], MAX_LINES)}
    colors = trial_colors([p[0] for p in pts if p[0].name in shown])
    for v, x, y in pts:
        m, size = trial_marker(v)
        color = colors.get(v.name, DIM)
        ax.scatter(
            [x],
            [y],
            marker=m,
            s=size,
            color=color,
            edgecolor="black",
            zorder=4 if v.name in shown else 3,
        )
        if v.name in shown:  # the rest stay unlabelled: labels would pile up
            ax.annotate(v.tag, (x, y), xytext=(6, -10), textcoords="offset points", fontsize=8)
    ratios = sorted(y / x for _, x, y in pts)
    median = (
        ratios[len(ratios) // 2]
        if len(ratios) % 2
        else math.sqrt(ratios[len(ratios) // 2 - 1] * ratios[len(ratios) // 2])
    )
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("predicted decode throughput (tokens/s, estimator)")
    ax.set_ylabel("measured output throughput (tokens/s, highest load point)")
    ax.set_title(
        f"Estimator error: measured / predicted, median ×{median:.2f} "
        f"(range ×{ratios[0]:.2f}–×{ratios[-1]:.2f})",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9, loc="upper left")
    fig.tight_layout()
    return save(fig, path)


def plot_kv_usage(
    record: SearchRecord, views: Sequence[TrialView], path: Path, max_panels: int = 12
) -> Path | None:
    """vLLM's KV-cache usage over each trial (one panel per trial, its load points in turn,
    shaded and labelled with their rate), with requests running and waiting beneath."""
    series = []
    for v in views:
        segs = [(p, (p.get("server") or {}).get("series") or []) for p in v.points]
        segs = [(p, s) for p, s in segs if s]
        if segs:
            series.append((v, segs))
    if not series:
        return None
    # the best and the baseline first, then the rest in trial order
    series.sort(key=lambda vs: (not vs[0].is_best, not vs[0].baseline, vs[0].number or 0))
    dropped = len(series) - max_panels
    series = sorted(series[:max_panels], key=lambda vs: vs[0].number or 0)
    cols = 2 if len(series) > 1 else 1
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 2.9 * rows), squeeze=False, sharey=True)
    for ax, (v, segs) in zip(axes.flat, series, strict=False):
        offset = 0.0
        twin = ax.twinx()
        for i, (point, s) in enumerate(segs):
            t = [offset + (row[0] - s[0][0]) for row in s]
            kv = [100 * row[1] if row[1] is not None else math.nan for row in s]
            run = [row[2] if len(row) > 2 and row[2] is not None else math.nan for row in s]
            wait = [row[3] if len(row) > 3 and row[3] is not None else math.nan for row in s]
            if i % 2:
                ax.axvspan(t[0], t[-1], color="#f0f0f0", zorder=0)
            ax.plot(t, kv, color=BASELINE, lw=1.6)
            twin.plot(t, run, color="#ff7f0e", lw=0.9, alpha=0.8)
            twin.plot(t, wait, color="#9467bd", lw=0.9, ls=":")
            ax.text(
                (t[0] + t[-1]) / 2,
                1.01,
                load_label(point),
                ha="center",
                va="bottom",
                fontsize=7,
                color="#555",
                transform=ax.get_xaxis_transform(),
            )
            offset = t[-1] + 1.0
        ax.set_ylim(0, 105)
        ax.set_yticks([0, 25, 50, 75, 100])
        ax.set_title(
            v.label + (" (best)" if v.is_best else "") + (" (baseline)" if v.baseline else ""),
            fontsize=9,
            pad=14,
        )
        ax.set_ylabel("KV usage (%)")
        twin.set_ylabel("requests", fontsize=8)
        twin.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("time in trial (s); bands: load points (req/s or c=concurrency above)")
    handles = [
        plt.Line2D([], [], color=BASELINE, lw=1.6),
        plt.Line2D([], [], color="#ff7f0e", lw=1),
        plt.Line2D([], [], color="#9467bd", lw=1, ls=":"),
    ]
    labels = [
        "KV-cache usage (left axis)",
        "requests running (right axis)",
        "requests waiting (right axis)",
    ]
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=3,
        fontsize=9,
        frameon=False,
        bbox_to_anchor=(0.5, 1.0),
    )
    note = f" ({dropped} more trials not shown)" if dropped > 0 else ""
    fig.suptitle("vLLM KV-cache usage during each trial" + note, y=1.03)
    fig.tight_layout()
    return save(fig, path)
