"""What every report plot shares: colours, markers, ticks, SLO axes, saving a PNG
(matplotlib, Agg backend; nothing is shown on screen)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from tuner.errors import SloError
from tuner.outputs.views import TrialView

DPI = 110
OBJECTIVE_UNITS = {
    "goodput": "goodput (requests/s meeting the SLO)",
    "request_goodput": "goodput (requests/s meeting the SLO)",
    "throughput": "output throughput (tokens/s)",
    "output_throughput": "output throughput (tokens/s)",
    "request_throughput": "request throughput (requests/s)",
}
BEST, BASELINE, OTHER, DIM = "#2ca02c", "#1f77b4", "#7f7f7f", "#c7c7c7"


def slo_axes(slo: str | None) -> dict[str, tuple[str, float | None]]:
    """metric -> (stat to plot, threshold in ms or None) for ttft and tpot."""
    out: dict[str, tuple[str, float | None]] = {"ttft": ("p95", None), "tpot": ("p95", None)}
    if not slo:
        return out
    from tuner.measure.slo import parse_slo

    try:
        terms = parse_slo(slo).terms
    except SloError:
        return out
    for term in terms:
        if term.metric in out:
            stat = "p50" if term.stat == "median" else term.stat
            out[term.metric] = (stat, term.seconds * 1000.0)
    return out


MAX_LINES = 10


def highlighted(views: Sequence[TrialView], limit: int) -> list[TrialView]:
    """At most ``limit`` trials to draw in full: the best, the baseline, then the highest
    objectives; in trial order."""
    ranked = sorted(
        views,
        key=lambda v: (
            not v.is_best,
            not v.baseline,
            -(v.objective if v.objective is not None else -1e300),
        ),
    )
    keep = {id(v) for v in ranked[:limit]}
    return [v for v in views if id(v) in keep]


def trial_colors(views: Sequence[TrialView]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len(views) <= 10 else "tab20")
    return {v.name: cmap(i % cmap.N) for i, v in enumerate(views)}


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def trial_marker(v: TrialView) -> tuple[str, float]:
    if v.is_best:
        return "*", 260.0
    return ("s", 90.0) if v.baseline else ("o", 60.0)


def tick(value: float, _pos: Any = None) -> str:
    return f"{value:g}"


def minor_tick(value: float, _pos: Any = None) -> str:
    """Label the 2x and 5x minor ticks of a log axis (200, 500, 2000, ...)."""
    lead = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
    return f"{value:g}" if round(lead, 6) in (2.0, 5.0) else ""


def point_xy(point: Mapping[str, Any], key: str) -> tuple[float | None, float | None]:
    s = point.get("summary") or {}
    x, y = s.get(key), s.get("output_throughput")
    ok = isinstance(x, int | float) and isinstance(y, int | float)
    return (float(x), float(y)) if ok else (None, None)


def load_label(point: Mapping[str, Any]) -> str:
    load = point.get("load") or {}
    if isinstance(load.get("rate"), int | float):
        return f"{load['rate']:.3g}/s"
    return f"c={load.get('concurrency')}" if load.get("concurrency") else "?"
