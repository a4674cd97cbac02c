"""The search record's cost block: what the chosen configuration's measured throughput comes to
per GPU and, given a price per GPU-hour, per million output tokens; and the one line the
profile's header and the console print for it. The arithmetic is :mod:`tuner.analytic.cost`'s
(``vtune plan`` uses the same)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tuner.analytic.cost import gpus_per_replica, per_gpu, usd_per_million_tokens
from tuner.search.record_parts import CostInfo
from tuner.search.trial_record import Finalist, TrialRecord, finite

SOURCE_FINALISTS = "finalist mean"
SOURCE_TRIAL = "trial"


def measured_output_throughput(
    objective: str | None, best: TrialRecord, finalists: Sequence[Finalist]
) -> tuple[float, str] | None:
    """One replica's measured SLO-meeting output tokens/s for the chosen trial ``best``, and
    where it comes from: for a throughput objective, the mean of its re-measured runs when it
    was a finalist, else its objective; for any other objective (goodput in requests/s,
    latency) the output tokens/s of its chosen point. None when nothing positive was measured."""
    if objective == "throughput":
        fin = next((f for f in finalists if f.name == best.name and len(f.samples) > 1), None)
        if fin is not None and fin.mean > 0:
            return fin.mean, SOURCE_FINALISTS
        value = finite(best.objective)
    else:
        summary = best.best or (best.chosen_point or {}).get("summary") or {}
        value = finite(summary.get("output_throughput")) if isinstance(summary, dict) else None
    return (value, SOURCE_TRIAL) if value is not None and value > 0 else None


def cost_info(
    objective: str | None,
    best: TrialRecord | None,
    finalists: Sequence[Finalist],
    fixed: Mapping[str, Any],
    on_cpu: bool,
    gpu_hour_price: float | None = None,
) -> CostInfo | None:
    """The cost block for the chosen trial ``best`` (None: nothing chosen or measured).
    GPUs per replica: :func:`tuner.analytic.cost.gpus_per_replica` of its knobs over the
    search's ``fixed`` settings (1 ``on_cpu``); $/1M output tokens only with a price."""
    if best is None:
        return None
    measured = measured_output_throughput(objective, best, finalists)
    if measured is None:
        return None
    tokens_per_s, source = measured
    gpus = gpus_per_replica(best.knobs, fixed, on_cpu=on_cpu)
    return CostInfo(
        gpus_per_replica=gpus,
        output_tokens_per_s=tokens_per_s,
        output_tokens_per_s_per_gpu=per_gpu(tokens_per_s, gpus),
        gpu_hour_price=gpu_hour_price,
        usd_per_1m_output_tokens=None
        if gpu_hour_price is None
        else usd_per_million_tokens(gpus, gpu_hour_price, tokens_per_s),
        at=best.name,
        source=source,
    )


def cost_line(cost: CostInfo) -> str:
    """One line: ``Measured: 1,234 output tok/s per GPU (1 GPU, finalist mean); $0.92 per 1M
    output tokens at $4.10/GPU-hour`` (the price part only when a price was given)."""
    gpus = f"{cost.gpus_per_replica} GPU{'s' if cost.gpus_per_replica != 1 else ''}"
    line = (
        f"Measured: {_tokens(cost.output_tokens_per_s_per_gpu)} output tok/s per GPU "
        f"({gpus}, {cost.source or SOURCE_TRIAL})"
    )
    if cost.gpu_hour_price is not None and cost.usd_per_1m_output_tokens is not None:
        line += (
            f"; {_usd(cost.usd_per_1m_output_tokens)} per 1M output tokens at "
            f"{_usd(cost.gpu_hour_price)}/GPU-hour"
        )
    return line


def _tokens(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _usd(value: float) -> str:
    """Cents for everyday amounts, three significant figures for fractions of a cent."""
    return f"${value:,.2f}" if value >= 0.1 else f"${value:.3g}"
