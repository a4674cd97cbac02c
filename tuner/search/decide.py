"""Deciding again from a finished search's stored curves, without relaunching anything.

Every trial of a search record keeps each measured load point with its full summary
(``trials[].rate_search.points``). Under another SLO, :func:`decide` re-judges every point,
takes each trial's highest load that meets it (as the rate search does), and says whether the
stored points *bracket* the answer: either the SLO holds at the trial's saturation probe (the
highest load there is), or a point meets it and a higher one fails it. When no stored point
meets the new SLO the answer lies below anything measured: that candidate needs a relaunch.

The objective is re-computed from the stored summaries: ``throughput`` (output tokens/s at the
chosen point) and ``latency`` (the fixed-rate point's p95 TPOT, when it meets the SLO).
``goodput`` judges each request against the SLO, which summaries cannot redo: only the
record's own SLO keeps it. :func:`decided_record` is the record re-written under the new SLO
(each trial's choice, the best, the gain over vLLM's defaults, provenance under ``decided``);
:func:`decided_profile` is the chosen candidate's ``vllm serve --config`` settings, built
from the record's model, variants and fixed settings exactly as the search builds them.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tuner import __version__
from tuner.errors import ParameterError
from tuner.measure.slo import Slo
from tuner.plan.prune import Variant
from tuner.plan.space import Candidate
from tuner.plan.variants import serving_values
from tuner.search.cost import cost_info
from tuner.search.objective import OBJECTIVES, gain_ratio, is_better
from tuner.search.profile import vllm_config
from tuner.search.record import STATE_COMPLETE, SearchRecord, TrialRecord, finite
from tuner.search.record_parts import CostInfo

OK = "ok"  # the stored points answer the new SLO
RELAUNCH = "relaunch"  # no stored point meets it: the answer lies below what was measured
FAILS = "fails"  # latency objective: the one fixed-rate point misses the SLO
NOT_MEASURED = "not measured"  # the trial failed or measured nothing
LATENCY_STAT = ("tpot", "p95")  # what the latency objective reports (as the trial runner)


class StoredSummary:
    """A stored point's summary (``vllm bench serve`` names, milliseconds) read as the SLO
    reads a live one: ``stat(metric, stat)`` in seconds, None when not recorded."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def stat(self, metric: str, stat: str) -> float | None:
        value = finite(self.data.get(f"{stat}_{metric}_ms"))
        return None if value is None else value / 1000.0


@dataclass(frozen=True)
class TrialDecision:
    """One trial under the new SLO. ``index`` is the chosen point (None: none), ``value`` the
    objective there, ``low``/``high`` the measured rates (req/s) that bracket the answer
    (``high`` None: the SLO holds at saturation)."""

    name: str
    status: str
    value: float | None
    index: int | None
    low: float | None
    high: float | None
    reason: str


@dataclass(frozen=True)
class Decision:
    """Every trial re-judged, and the pick: ``best`` (None when no trial is OK)."""

    slo: Slo
    objective: str
    trials: tuple[TrialDecision, ...]
    best: str | None
    baseline: str | None
    gain: float | None

    @property
    def needs_relaunch(self) -> list[str]:
        return [t.name for t in self.trials if t.status == RELAUNCH]

    def of(self, name: str | None) -> TrialDecision | None:
        return next((t for t in self.trials if t.name == name), None)


def point_rate(point: dict[str, Any]) -> float:
    """A point's load in requests/s: its Poisson rate, or (closed loop, no rate) infinite."""
    rate = finite((point.get("load") or {}).get("rate"))
    return math.inf if rate is None else rate


def measured_rate(point: dict[str, Any]) -> float | None:
    """Requests/s the point completed (the summary's request_throughput)."""
    return finite((point.get("summary") or {}).get("request_throughput"))


def meets(point: dict[str, Any], slo: Slo) -> bool:
    """Whether a stored point meets ``slo``: no failed request and every term under its bound."""
    summary = point.get("summary") or {}
    if (finite(summary.get("failed")) or 0) > 0 or not finite(summary.get("completed")):
        return False
    return slo.met(StoredSummary(summary))


def decide(record: SearchRecord, slo: Slo, objective: str | None = None) -> Decision:
    """Re-judge ``record``'s trials under ``slo`` (see the module docstring); ParameterError
    for an objective the stored summaries cannot re-compute."""
    objective = objective or record.objective or "throughput"
    if objective not in OBJECTIVES:
        raise ParameterError(
            f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}"
        )
    if objective == "goodput" and str(slo) != (record.slo or ""):
        raise ParameterError(
            "goodput judges each request against the SLO and the record keeps only summaries; "
            "decide again with --objective throughput, or relaunch the search"
        )
    rows = tuple(_trial(t, slo, objective) for t in record.trials if t.state != "pruned")
    best = None
    for row in rows:
        if row.status == OK and (best is None or is_better(objective, row.value, best.value)):
            best = row
    base = next((r for r in rows if r.name == record.baseline), None)
    gain = None
    if best is not None and base is not None and base.status == OK:
        gain = gain_ratio(objective, best.value, base.value)
    return Decision(slo, objective, rows, best.name if best else None, record.baseline, gain)


def _trial(trial: TrialRecord, slo: Slo, objective: str) -> TrialDecision:
    raw = (trial.rate_search or {}).get("points")
    points = raw if isinstance(raw, list) else []
    indexed = [(i, p) for i, p in enumerate(points) if isinstance(p, dict) and p]
    if trial.state != STATE_COMPLETE or not indexed:
        why = trial.failure_class or "nothing measured"
        return TrialDecision(trial.name, NOT_MEASURED, None, None, None, None, why)
    if objective == "latency":
        index, point = indexed[-1]
        if not meets(point, slo):
            return TrialDecision(
                trial.name, FAILS, None, None, None, None, "misses the SLO at the fixed rate"
            )
        metric, stat = LATENCY_STAT
        value = StoredSummary(point.get("summary") or {}).stat(metric, stat)
        rate = measured_rate(point)
        ms = None if value is None else value * 1000.0
        return TrialDecision(trial.name, OK, ms, index, rate, None, "the fixed-rate point")
    ordered = sorted(indexed, key=lambda ip: point_rate(ip[1]))
    good = [(i, p) for i, p in ordered if meets(p, slo)]
    if not good:
        lowest = measured_rate(ordered[0][1])
        shown = "?" if lowest is None else f"{lowest:.3g}"
        why = f"fails at every stored point (the lowest load ran {shown} req/s)"
        return TrialDecision(trial.name, RELAUNCH, None, None, None, lowest, why)
    index, point = good[-1]
    above = [p for _, p in ordered if point_rate(p) > point_rate(point)]
    low, high = measured_rate(point), (measured_rate(above[0]) if above else None)
    if high is None:
        why = "holds at saturation (the highest load measured)"
    else:
        why = f"holds at {low or 0:.3g} req/s, fails by {high:.3g}"
    value = finite((point.get("summary") or {}).get("output_throughput"))
    if objective == "goodput":
        value = max(
            (finite((p.get("summary") or {}).get("request_goodput")) or 0.0 for _, p in indexed),
            default=0.0,
        )
    return TrialDecision(trial.name, OK, value, index, low, high, why)


# --- what is written ----------------------------------------------------------------------------


def decided_profile(record: SearchRecord, name: str) -> dict[str, Any]:
    """The chosen trial's ``vllm serve --config`` keys: the record's fixed settings, the
    trial's knobs, its variant's model and method (:func:`serving_values`, as the search)."""
    trial = record.trial(name)
    if trial is None:
        raise ParameterError(f"the record has no trial named {name!r}")
    info = next((v for v in record.variants if v.name == trial.variant), None)
    model = (info.model if info else None) or record.model.source or record.model.name or "?"
    # serving_values reads only the variant's model and flag; the spec is not needed here.
    variant = Variant(trial.variant, model, cast(Any, None), flag=info.flag if info else None)
    values = serving_values(record.fixed_settings, Candidate(**trial.knobs), variant)
    if Path(str(values["model"])).exists():  # a local directory: absolute, as the search writes
        values["model"] = str(Path(str(values["model"])).resolve())
    return vllm_config(values)


def decided_record(
    record: SearchRecord, decision: Decision, source: str, profile: dict[str, Any] | None
) -> dict[str, Any]:
    """The record under the new SLO (schema as the search writes it): each trial's objective,
    chosen point and ``slo_met`` flags re-judged, the best and the gain re-picked, finalists
    dropped (they were re-measured under the old SLO), and ``decided`` saying where it came
    from and which candidates need a relaunch."""
    data = copy.deepcopy(record.to_json())
    data.update(
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        slo=str(decision.slo),
        objective=decision.objective,
        best=decision.best,
        finalists=[],
        within_noise=None,
        pareto_front=[],
        gain=None,
    )
    for trial in data["trials"]:
        row = decision.of(trial.get("name"))
        if row is None or row.status == NOT_MEASURED:
            continue
        search = trial.get("rate_search") or {}
        for point in search.get("points") or []:
            if isinstance(point, dict):
                point["slo_met"] = meets(point, decision.slo)
        search["best_index"] = row.index
        search["reason"] = f"re-decided from stored points: {row.reason}"
        trial["objective"] = row.value
        trial["best"] = None
        if row.index is not None:
            chosen = search["points"][row.index]
            load = chosen.get("load") or {}
            trial["best"] = {
                **(chosen.get("summary") or {}),
                "rate": load.get("rate"),
                "concurrency": load.get("concurrency"),
            }
    base, best = decision.of(decision.baseline), decision.of(decision.best)
    if base is not None and best is not None and base.status == OK:
        data["gain"] = {
            "objective": decision.objective,
            "baseline": base.value,
            "best": best.value,
            "ratio": decision.gain,
        }
    data.pop("profile", None)
    data.pop("cost", None)  # the search's choice's; this choice's, from its stored point:
    cost = _decided_cost(record, decision, data["trials"])
    if cost is not None:
        data["cost"] = cost.to_json()
    if profile is not None:
        data["profile"] = profile
    data["decided"] = {
        "from": source,
        "from_created_at": record.created_at,
        "previous_slo": record.slo,
        "previous_objective": record.objective,
        "stored_data_only": True,
        "needs_relaunch": decision.needs_relaunch,
    }
    return data


def _decided_cost(
    record: SearchRecord, decision: Decision, trials: list[dict[str, Any]]
) -> CostInfo | None:
    """The cost block of the re-decided choice (:func:`tuner.search.cost.cost_info`): its
    re-decided chosen point (source ``trial``: no finalist re-ran under the new SLO), at the
    search's price per GPU-hour."""
    chosen = next((t for t in trials if t.get("name") == decision.best), None)
    if chosen is None:
        return None
    price = record.cost.gpu_hour_price if record.cost is not None else None
    on_cpu = (record.gpu.name or "").lower() == "cpu"
    best = TrialRecord.from_json(chosen)
    return cost_info(decision.objective, best, (), record.fixed_settings, on_cpu, price)


def decided_header(
    record: SearchRecord, decision: Decision, source: str, yaml_name: str, created: str
) -> list[str]:
    """The profile's comment header: what was decided, from which record, what needs a relaunch."""
    best = decision.of(decision.best)
    assert best is not None and best.value is not None
    lines = [
        f"vtune {__version__} profile for {record.model.name} on {record.gpu.name} (vLLM "
        f"{record.vllm_version or '?'}), re-decided from stored measurements",
        f"Load: `vllm serve --config {yaml_name}`",
        f"Workload: {json.dumps(record.workload, sort_keys=True)}",
        f"SLO: {decision.slo} (searched under {record.slo or 'none'}); "
        f"objective: {decision.objective}",
        f"Chosen: {best.name} -> {decision.objective} {best.value:.4g} ({best.reason})",
    ]
    base = decision.of(decision.baseline)
    if base is not None and base.status == OK and base.value is not None and decision.gain:
        lines.append(f"vLLM defaults: {base.value:.4g}; gain x{decision.gain:.3g}")
    lines.append(f"Decided from {source} (created {record.created_at}) without relaunching.")
    if decision.needs_relaunch:
        lines.append(
            "Stored points do not bracket the new SLO for: "
            + ", ".join(decision.needs_relaunch)
            + " (relaunch the search to measure them)."
        )
    lines.append(f"Record: {Path(yaml_name).with_suffix('.json').name} (created {created})")
    return lines
