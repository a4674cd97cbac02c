"""What a request trace asks of a server, so the user sees what is being tuned for: the length
distributions, how bursty the arrivals are (the gamma shape fitted to the gaps between them),
the conversations in it and how much prompt a prefix cache could reuse.

:func:`describe_trace` gives the figures (JSON-safe), :func:`describe_rows` the table's rows,
:func:`plot_trace` a PNG: input and output length histograms, the gaps against the fitted gamma
density, and requests per second over the trace.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tuner.load.trace import Trace, gamma_shape, ideal_prefix_reuse

PERCENTILES = (50, 90, 99)


def _dist(values: Sequence[float]) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"min": None, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = (float(v) for v in np.percentile(arr, PERCENTILES))
    return {
        "min": float(arr.min()),
        "mean": float(arr.mean()),
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": float(arr.max()),
    }


def describe_trace(trace: Trace) -> dict[str, Any]:
    """The trace's figures: counts, span and rates, length and gap distributions, the gamma
    shape of the gaps (1 Poisson, below 1 burstier), sessions and the ideal prefix reuse."""
    reqs = trace.requests
    gaps = trace.gaps()
    times = np.array([r.arrival_s for r in reqs], dtype=float)
    per_second = np.bincount(times.astype(int)) if times.size else np.zeros(1, dtype=int)
    sessions = [s for s in trace.sessions() if s[0].session is not None]
    think = [b.arrival_s - a.arrival_s for turns in sessions for a, b in itertools.pairwise(turns)]
    mean_gap = float(gaps.mean()) if gaps.size else None
    return {
        "path": str(trace.path),
        "requests": len(reqs),
        "duration_s": trace.duration_s,
        "mean_rate": trace.mean_rate,
        "peak_rate_1s": int(per_second.max()),
        "input_tokens": _dist([r.length for r in reqs]),
        "text_prompts": sum(1 for r in reqs if r.input_tokens is None),
        "output_tokens": _dist([r.output_tokens for r in reqs]),
        "gaps_s": _dist(gaps.tolist()),
        "gap_cv": (float(gaps.std()) / mean_gap) if mean_gap else None,
        "gamma_shape": gamma_shape(gaps),
        "sessions": len(sessions),
        "requests_in_sessions": sum(len(s) for s in sessions),
        "turns_per_session": _dist([len(s) for s in sessions]),
        "between_turns_s": _dist(think),
        "hash_id_requests": sum(1 for r in reqs if r.hash_ids),
        "ideal_prefix_reuse": ideal_prefix_reuse(reqs),
    }


def _n(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def describe_rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    """(figure, value) rows for the table."""

    def dist(key: str, unit: str = "") -> str:
        x = d[key]
        if x["mean"] is None:
            return "-"
        return (
            f"mean {_n(x['mean'])}{unit}, p50 {_n(x['p50'])}, p90 {_n(x['p90'])}, "
            f"p99 {_n(x['p99'])}, range {_n(x['min'])}..{_n(x['max'])}"
        )

    shape = d["gamma_shape"]
    burst = "-" if shape is None else f"{_n(shape)} ({_burst_word(shape)})"
    reuse = d["ideal_prefix_reuse"]
    rows = [
        ("requests", _n(d["requests"])),
        ("span", f"{_n(d['duration_s'])} s"),
        ("rate", f"mean {_n(d['mean_rate'])} req/s, peak {d['peak_rate_1s']} in one second"),
        ("input tokens", dist("input_tokens")),
        ("output tokens", dist("output_tokens")),
        ("gaps between arrivals", dist("gaps_s", " s")),
        ("burstiness (gamma shape)", burst),
        ("sessions", f"{d['sessions']} ({d['requests_in_sessions']} requests)"),
    ]
    if d["sessions"]:
        rows.append(("turns per session", dist("turns_per_session")))
        rows.append(("time between turns", dist("between_turns_s", " s")))
    if d["text_prompts"]:
        rows.append(("text prompts", f"{d['text_prompts']} (lengths above: characters / 4)"))
    if d["hash_id_requests"]:
        rows.append(("requests with hash_ids", _n(d["hash_id_requests"])))
    rows.append(("ideal prefix reuse", "-" if reuse is None else f"{reuse:.1%} of prompt tokens"))
    return rows


def _burst_word(shape: float) -> str:
    if math.isinf(shape) or shape > 1.25:
        return "more regular than Poisson"
    if shape >= 0.8:
        return "about Poisson"
    return "bursty"


def plot_trace(trace: Trace, path: Path) -> Path:
    """Four panels into a PNG at ``path``; returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reqs = trace.requests
    gaps = trace.gaps()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, values, title in (
        (axes[0][0], [r.length for r in reqs], "input tokens"),
        (axes[0][1], [r.output_tokens for r in reqs], "output tokens"),
    ):
        ax.hist(values, bins=min(40, max(5, len(values) // 5)), color="#4c72b0")
        ax.set_title(title)
        ax.set_ylabel("requests")
    ax = axes[1][0]
    if gaps.size:
        ax.hist(gaps, bins=min(50, max(5, gaps.size // 5)), density=True, color="#dd8452")
        shape = gamma_shape(gaps)
        if shape is not None and not math.isinf(shape) and gaps.mean() > 0:
            xs = np.linspace(max(gaps.max() / 500, 1e-6), gaps.max(), 200)
            scale = gaps.mean() / shape
            log_pdf = (
                (shape - 1) * np.log(xs) - xs / scale - math.lgamma(shape) - shape * math.log(scale)
            )
            ax.plot(xs, np.exp(log_pdf), color="black", label=f"gamma, shape {shape:.2f}")
            ax.legend()
    ax.set_title("seconds between arrivals")
    ax.set_ylabel("density")
    ax = axes[1][1]
    times = np.array([r.arrival_s for r in reqs])
    counts = np.bincount(times.astype(int)) if times.size else np.zeros(1)
    ax.bar(np.arange(counts.size), counts, width=1.0, color="#55a868")
    ax.set_title("requests per second")
    ax.set_xlabel("seconds into the trace")
    fig.suptitle(f"{trace.path.name}: {len(reqs)} requests over {trace.duration_s:.3g} s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
