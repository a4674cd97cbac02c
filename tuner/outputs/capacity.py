"""Capacity and cost from measured trials: how many replicas (and GPUs) sustain a target request
rate under the search's SLO, and what a million output tokens costs at that load.

For every configuration that met the SLO, one replica's sustainable rate comes from the
measurements, never from the analytic model:

* re-measured finalists: the low end of the 95 % interval of their re-runs, in requests/s (a
  throughput objective's tokens/s divided by the output tokens per request at the chosen
  point; goodput is already requests/s) — headroom for the measured noise. With too few runs
  for an interval above zero (two runs, most often) the slowest run stands in for it, and a
  re-run that missed the SLO leaves no safe rate at all;
* otherwise the requests/s the trial completed at its SLO-meeting point (one run).

Then ``replicas = ceil(target / rate)``, ``GPUs = replicas x GPUs per replica``
(tensor_parallel_size x pipeline_parallel_size), and at the target load ``$/1M output tokens =
GPUs x price x 1e6 / (target x output tokens per request x 3600)`` — the arithmetic of
:mod:`tuner.analytic.cost`, which the search record's cost block uses too. More than one
replica is an extrapolation (replicas are assumed to add up linearly), and the row says so.
Rows come cheapest first (fewest GPUs; a higher per-replica rate breaks ties). On cpu a
replica counts as one "GPU".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from tuner.analytic import cost as formulas
from tuner.errors import ParameterError
from tuner.search.record import STATE_COMPLETE, SearchRecord, TrialRecord, finite


@dataclass(frozen=True)
class CapacityRow:
    """One configuration's plan for the target rate. ``rate`` is one replica's sustainable
    requests/s (None when the re-runs leave no safe rate); ``measured_rate`` what its chosen
    point completed; ``tokens_per_s_per_gpu`` output tokens/s per GPU at the target load."""

    name: str
    gpus_per_replica: int
    rate: float | None
    measured_rate: float
    basis: str
    output_tokens_per_request: float
    replicas: int | None
    gpus: int | None
    tokens_per_s_per_gpu: float | None
    measured_tokens_per_s_per_gpu: float
    cost_per_hour: float | None
    cost_per_million_tokens: float | None
    extrapolated: bool
    note: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gpus_per_replica(record: SearchRecord, trial: TrialRecord) -> int:
    """GPUs one replica of the trial spans (:func:`tuner.analytic.cost.gpus_per_replica`:
    tensor x pipeline parallel size, its knobs else the search's fixed settings; 1 on cpu)."""
    return formulas.gpus_per_replica(
        trial.knobs, record.fixed_settings, on_cpu=record.gpu.name == "cpu"
    )


def chosen_slo_point(record: SearchRecord, trial: TrialRecord) -> dict[str, Any] | None:
    """The trial's chosen point when it met the SLO (or the search had none), else None."""
    if trial.state != STATE_COMPLETE:
        return None
    search = trial.rate_search or {}
    index, points = search.get("best_index"), search.get("points")
    if type(index) is not int or not isinstance(points, list) or not 0 <= index < len(points):
        return None
    point = points[index]
    if not isinstance(point, dict) or (record.slo and not point.get("slo_met")):
        return None
    return point


def capacity_plan(
    record: SearchRecord, target_rate: float, gpu_hour_price: float | None = None
) -> list[CapacityRow]:
    """A row per configuration that met the SLO (see the module docstring), cheapest first."""
    if not target_rate > 0 or math.isinf(target_rate):
        raise ParameterError(f"--target-rate must be a positive number, got {target_rate}")
    if gpu_hour_price is not None and not gpu_hour_price > 0:
        raise ParameterError(f"--gpu-hour-price must be positive, got {gpu_hour_price}")
    finalists = {f.name: f for f in record.finalists if len(f.samples) > 1}
    rows = []
    for trial in record.trials:
        point = chosen_slo_point(record, trial)
        if point is None:
            continue
        summary = point.get("summary") or {}
        rate = finite(summary.get("request_throughput"))
        completed = finite(summary.get("completed"))
        out_tokens = finite(summary.get("total_output_tokens"))
        if not rate or not completed or not out_tokens:
            continue
        per_request = out_tokens / completed
        safe: float | None = rate
        basis, note = "1 run", ""
        fin = finalists.get(trial.name)
        if fin is not None and record.objective in ("throughput", "goodput"):
            scale = 1.0 if record.objective == "goodput" else 1.0 / per_request
            n = len(fin.samples)
            if min(fin.samples) <= 0:
                safe, basis = None, f"{n} runs"
                note = "a re-run missed the SLO: no safe rate"
            elif fin.ci_low > 0:
                safe, basis = fin.ci_low * scale, f"CI low, {n} runs"
            else:  # too few runs for a positive interval: the slowest run is the margin
                safe, basis = min(fin.samples) * scale, f"min of {n} runs"
                note = "95% interval reaches 0 (too few runs): the slowest run is used"
        rows.append(
            _row(
                record,
                trial,
                point,
                rate,
                safe,
                per_request,
                basis,
                note,
                target_rate,
                gpu_hour_price,
            )
        )
    return sorted(rows, key=_cost_key)


def _row(
    record: SearchRecord,
    trial: TrialRecord,
    point: dict[str, Any],
    rate: float,
    safe: float | None,
    per_request: float,
    basis: str,
    note: str,
    target: float,
    price: float | None,
) -> CapacityRow:
    tp = gpus_per_replica(record, trial)
    output = finite((point.get("summary") or {}).get("output_throughput")) or 0.0
    measured_tps = formulas.per_gpu(output, tp)
    replicas = gpus = tps = cost = per_million = None
    if safe is not None:
        replicas = max(1, math.ceil(target / safe - 1e-9))
        gpus = replicas * tp
        tps = formulas.per_gpu(target * per_request, gpus)
        if price is not None:
            cost = formulas.hourly_cost(gpus, price)
            per_million = formulas.usd_per_million_tokens(gpus, price, target * per_request)
    extrapolated = replicas is not None and replicas > 1
    if extrapolated:
        note = f"{replicas} x one measured replica (linear scaling assumed)"
    return CapacityRow(
        name=trial.name,
        gpus_per_replica=tp,
        rate=safe,
        measured_rate=rate,
        basis=basis,
        output_tokens_per_request=per_request,
        replicas=replicas,
        gpus=gpus,
        tokens_per_s_per_gpu=tps,
        measured_tokens_per_s_per_gpu=measured_tps,
        cost_per_hour=cost,
        cost_per_million_tokens=per_million,
        extrapolated=extrapolated,
        note=note,
    )


def _cost_key(row: CapacityRow) -> tuple[Any, ...]:
    return (row.gpus is None, row.gpus or 0, -(row.rate or 0.0), row.name)
