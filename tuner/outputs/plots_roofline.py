"""The report's roofline plot: measured throughput and the two utilization fractions of every
load point against its batch, with the analytic knee marked, so a person sees where a decode
step turns from memory- to compute-bound and whether the chosen setting sits at it.

Each point's batch, fractions and regime are its ``roofline`` block (``tuner.measure.watch``):
the batch is the mean of vLLM's running requests over the point (the client's requests in
flight when /metrics was not scraped), the fractions are achieved / peak bandwidth and FLOP/s.
The knee is the trial's ``estimate.roofline_knee_batch`` (peak FLOP/s / (2 x bandwidth) in
weight-bytes terms, from the same peaks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

from tuner.analytic.roofline import HIGH_FRACTION
from tuner.outputs.figure import (
    BEST,
    DIM,
    MAX_LINES,
    OTHER,
    highlighted,
    minor_tick,
    save,
    tick,
    trial_colors,
    trial_marker,
)
from tuner.outputs.views import TrialView
from tuner.search.record import SearchRecord, finite

BANDWIDTH, FLOPS, KNEE = "#1f77b4", "#d62728", "#9467bd"


@dataclass(frozen=True)
class RoofPoint:
    """One load point as the plot reads it."""

    batch: float
    throughput: float
    bandwidth_fraction: float
    flops_fraction: float
    regime: str


def roof_point(point: Mapping[str, Any]) -> RoofPoint | None:
    """The plotted figures of a point's JSON, or None when it has no usable roofline."""
    roof = point.get("roofline")
    summary = point.get("summary")
    if not isinstance(roof, Mapping) or not isinstance(summary, Mapping):
        return None
    batch = finite(roof.get("batch"))
    tps = finite(summary.get("output_throughput"))
    bw, fl = finite(roof.get("bandwidth_fraction")), finite(roof.get("flops_fraction"))
    if batch is None or tps is None or bw is None or fl is None or batch <= 0:
        return None
    return RoofPoint(batch, tps, bw, fl, str(roof.get("regime") or "?"))


def _peaks_text(record: SearchRecord, views: Sequence[TrialView]) -> str:
    peaks = record.gpu.peaks or {}
    if not peaks:  # an older record: the peaks a point was measured against
        for v in views:
            for p in v.points:
                roof = p.get("roofline")
                if isinstance(roof, Mapping) and isinstance(roof.get("peaks"), Mapping):
                    peaks = dict(roof["peaks"])
                    break
            if peaks:
                break
    bw, fl = finite(peaks.get("memory_bandwidth")), finite(peaks.get("flops"))
    if bw is None or fl is None:
        return "fractions of the device's peaks"
    source = "probed" if peaks.get("source") == "probe" else "datasheet"
    when = f", {str(peaks['measured_at'])[:10]}" if peaks.get("measured_at") else ""
    return f"fractions of {source} peaks ({bw / 1e9:,.1f} GB/s, {fl / 1e9:,.1f} GFLOP/s{when})"


def plot_roofline(record: SearchRecord, views: Sequence[TrialView], path: Path) -> Path | None:
    """Two panels over the batch: output throughput per trial (each trial's points joined, its
    chosen point a big marker) and, beneath, every point's bandwidth and FLOP fractions (the
    bound threshold dashed); the analytic knee a vertical line on both; the best trial's chosen
    batch dotted and named with its regime. None when no point has a roofline."""
    per_view = [(v, [rp for p in v.points if (rp := roof_point(p)) is not None]) for v in views]
    per_view = [(v, pts) for v, pts in per_view if pts]
    if not per_view:
        return None
    measured = [v for v, _ in per_view]
    shown = highlighted(measured, MAX_LINES)
    colors = trial_colors(shown)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 8.2), sharex=True, gridspec_kw={"height_ratios": [1.1, 1]}
    )
    everything = [rp for _, pts in per_view for rp in pts]
    for v, pts in per_view:
        chosen = roof_point(v.chosen_point) if v.chosen_point else None
        ordered = sorted(pts, key=lambda rp: rp.batch)
        xs, ys = [rp.batch for rp in ordered], [rp.throughput for rp in ordered]
        if v in shown:
            top.plot(xs, ys, "-o", color=colors[v.name], ms=4, lw=1.2, alpha=0.7)
            if chosen is not None:
                marker, size = trial_marker(v)
                top.scatter(
                    [chosen.batch],
                    [chosen.throughput],
                    marker=marker,
                    s=size,
                    color=colors[v.name],
                    edgecolor="black",
                    linewidth=0.8,
                    zorder=3,
                )
        else:
            top.scatter(xs, ys, s=18, color=DIM, edgecolor=OTHER, zorder=2)
    pooled = sorted(everything, key=lambda rp: rp.batch)
    bx = [rp.batch for rp in pooled]
    bottom.plot(bx, [100 * rp.bandwidth_fraction for rp in pooled], "-", color=BANDWIDTH, lw=1)
    bottom.plot(bx, [100 * rp.flops_fraction for rp in pooled], "--", color=FLOPS, lw=1)
    bottom.scatter(bx, [100 * rp.bandwidth_fraction for rp in pooled], s=22, color=BANDWIDTH)
    bottom.scatter(bx, [100 * rp.flops_fraction for rp in pooled], s=26, marker="^", color=FLOPS)
    bottom.axhline(100 * HIGH_FRACTION, color="#555", ls=":", lw=1)
    bottom.text(
        0.005,
        100 * HIGH_FRACTION,
        f" bound threshold: {HIGH_FRACTION:.0%} of peak",
        color="#555",
        fontsize=8,
        va="bottom",
        transform=bottom.get_yaxis_transform(),
    )
    knees = sorted({round(k, 1) for v in measured if (k := v.knee_batch) is not None and k > 0})
    lo, hi = min(bx + knees), max(bx + knees)
    for ax in (top, bottom):
        for knee in knees:
            ax.axvline(knee, color=KNEE, lw=1.6, alpha=0.8)
    for knee in knees:
        right = knee >= math.sqrt(lo * hi)  # label on the side with room (the axis may be log)
        top.text(
            knee,
            0.98,
            f"analytic knee \nbatch {knee:.3g} " if right else f" analytic knee\n batch {knee:.3g}",
            color=KNEE,
            fontsize=9,
            va="top",
            ha="right" if right else "left",
            transform=top.get_xaxis_transform(),
        )
    best = next((v for v in measured if v.is_best), None)
    best_point = roof_point(best.chosen_point) if best and best.chosen_point else None
    chosen_text = ""
    if best is not None and best_point is not None:
        for ax in (top, bottom):
            ax.axvline(best_point.batch, color=BEST, ls="--", lw=1.2)
        chosen_text = (
            f"chosen: {best.label} at batch {best_point.batch:.3g}, {best_point.regime}"
            + (f" (knee {knees[0]:.3g})" if len(knees) == 1 else "")
        )
    if hi / max(lo, 1e-9) > 8:
        bottom.set_xscale("log")
        bottom.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(tick))
        bottom.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor_tick))
    top.set_ylabel("output throughput (tokens/s)")
    top.set_ylim(bottom=0)
    top.set_title(
        "Throughput and utilization against batch" + (f" — {chosen_text}" if chosen_text else ""),
        fontsize=10,
    )
    top.grid(alpha=0.3)
    bottom.set_ylabel("% of peak")
    highest = max(max(rp.bandwidth_fraction, rp.flops_fraction) for rp in pooled)
    bottom.set_ylim(0, max(100.0, 110 * highest))
    bottom.set_title(_peaks_text(record, views), fontsize=9)
    bottom.set_xlabel(
        "batch: mean requests running in vLLM over the load point "
        "(requests in flight where /metrics was not scraped)"
    )
    bottom.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], color=colors[v.name], marker=trial_marker(v)[0], ls="-", label=_name(v))
        for v in shown
    ]
    others = [v for v in measured if v not in shown]
    if others:
        handles.append(
            plt.Line2D([], [], color=DIM, marker="o", ls="", label=f"{len(others)} other trials")
        )
    handles += [
        plt.Line2D([], [], color=BANDWIDTH, marker="o", ls="-", label="memory bandwidth used"),
        plt.Line2D([], [], color=FLOPS, marker="^", ls="--", label="FLOP/s used"),
        plt.Line2D([], [], color=KNEE, lw=1.6, label="analytic knee (memory → compute)"),
    ]
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=3,
        fontsize=9,
        frameon=False,
    )
    fig.tight_layout()
    return save(fig, path)


def _name(v: TrialView) -> str:
    extra = " (best)" if v.is_best else " (baseline)" if v.baseline else ""
    regime = f", {v.regime}" if v.regime else ""
    return f"{v.label}{extra}{regime}"
