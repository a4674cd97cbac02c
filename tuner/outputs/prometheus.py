"""Prometheus metrics of a running search.

* :class:`SearchExporter` is a :class:`~tuner.search.events.SearchObserver` that keeps the
  ``vtune_*`` search metrics in its own :class:`CollectorRegistry` (never the global one) and
  pushes at the plan, at the end of each trial and at the finish when it has a gateway.
* Serving (:func:`start_exporter`), pushing (:class:`Pushgateway`) and the CLI's
  :func:`exporting` live in ``tuner.outputs.prometheus_serve`` and are re-exported here.
* ``tuner.outputs.prometheus_bench.BenchExporter`` holds the live metrics of ``vtune bench``.

Metric names (all in seconds, tokens/s or requests/s as their names say):

=========================================  ===================================================
vtune_info{version, model, gpu, ...}       1; what the search runs (labels given by the caller)
vtune_phase{phase}                         1 for the current phase, 0 for the others
vtune_plan_candidates / _pruned            candidates in the space, pruned by the bounds
vtune_budget_trials                        the trial budget
vtune_trials_total{state}                  trials ended: complete, failed, pruned
vtune_trials_running                       1 while a trial's server is up or measured
vtune_trial_running_info{trial, name, knobs...}  1 for the running trial, its knobs as labels
vtune_points_measured_total                load points measured (live progress inside a trial)
vtune_last_trial_output_throughput         output tokens/s at the last complete trial's point
vtune_last_trial_request_throughput        requests/s at that point
vtune_last_trial_latency_seconds{metric, stat}  ttft|tpot|itl|e2el x p50|p95|p99 at that point
vtune_last_trial_objective                 its objective value
vtune_last_trial_peak_kv_cache_usage       vLLM's peak KV-cache usage (0..1) over its points
vtune_last_trial_preemptions               vLLM's preemptions over its points
vtune_best_goodput                         best requests/s meeting the SLO so far (with no SLO
                                           every completed request counts as good)
vtune_best_objective                       best objective so far: the highest, or the lowest
                                           for an objective that is minimised (latency)
vtune_gain_ratio                           times better than vLLM's defaults (set at the finish)
=========================================  ===================================================

and the load point gauges of ``tuner.outputs.prometheus_point`` (``vtune_telemetry_cpu_percent``,
``vtune_gpu_utilization_ratio``, ``vtune_bandwidth_fraction``, ``vtune_flops_fraction``,
``vtune_regime{regime}``, ...): the last measured point while a trial runs, its chosen point (else
its last) once it has ended.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tuner.outputs.prometheus_point import PointGauges
from tuner.outputs.prometheus_serve import MetricsServer as MetricsServer
from tuner.outputs.prometheus_serve import Pushgateway as Pushgateway
from tuner.outputs.prometheus_serve import RegistryExporter, label_value, set_gauge
from tuner.outputs.prometheus_serve import exporting as exporting
from tuner.outputs.prometheus_serve import start_exporter as start_exporter
from tuner.search.events import PHASES
from tuner.search.objective import direction, is_better
from tuner.search.record import (
    STATE_COMPLETE,
    STATE_FAILED,
    STATE_PRUNED,
    SearchRecord,
    TrialRecord,
    finite,
)

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
LATENCY_STATS = ("p50", "p95", "p99")
TRIAL_STATES = (STATE_COMPLETE, STATE_FAILED, STATE_PRUNED)


def label_name(key: str) -> str:
    """A knob name as a Prometheus label name: ``max-num-seqs`` -> ``max_num_seqs``."""
    name = re.sub(r"[^a-zA-Z0-9_]", "_", str(key)).strip("_")  # "__" prefixes are reserved
    return "knob_" + name if not name or name[0].isdigit() else name


class _RunningTrial(Collector):
    """``vtune_trial_running_info``: knob names are only known per trial, so the labels are
    built at each scrape from the running trial (nothing while no trial runs)."""

    def __init__(self) -> None:
        self.current: tuple[int | None, str, dict[str, Any]] | None = None

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily("vtune_trial_running_info", "The running trial and its knobs")]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        current = self.current  # one read: the search thread replaces the tuple
        if current is None:
            yield GaugeMetricFamily("vtune_trial_running_info", "The running trial and its knobs")
            return
        number, name, knobs = current
        labels = {"trial": "" if number is None else str(number), "name": name}
        for key, value in sorted(knobs.items()):
            lab = label_name(key)
            labels["knob_" + lab if lab in labels else lab] = label_value(value)
        fam = GaugeMetricFamily(
            "vtune_trial_running_info", "The running trial and its knobs", labels=list(labels)
        )
        fam.add_metric(list(labels.values()), 1.0)
        yield fam


class SearchExporter(RegistryExporter):
    """The search's metrics (see the module table); a :class:`~tuner.search.events.SearchObserver`.

    ``info`` becomes the labels of ``vtune_info`` (e.g. model, gpu, objective, slo; never a
    secret). ``objective`` (default: info's "objective" label, else throughput) decides which
    way "best so far" goes (:mod:`tuner.search.objective`). With a ``pushgateway`` the
    registry is pushed at the plan, after each trial and at the finish. Hooks never raise
    because of Prometheus.
    """

    default_job = "vtune-search"

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        pushgateway: Pushgateway | None = None,
        info: Mapping[str, Any] | None = None,
        objective: str | None = None,
    ) -> None:
        self.objective = objective or str((info or {}).get("objective") or "throughput")
        direction(self.objective)  # an unknown objective fails here, in one line
        super().__init__(registry, pushgateway, "vtune", "What this vtune search runs", info)
        r = self.registry
        self.phase = Gauge("vtune_phase", "1 for the current search phase", ["phase"], registry=r)
        self._phases = list(PHASES)
        for p in PHASES:
            self.phase.labels(p).set(0)
        self.candidates = Gauge("vtune_plan_candidates", "Candidates in the space", registry=r)
        self.pruned = Gauge("vtune_plan_pruned", "Candidates pruned by the bounds", registry=r)
        self.budget = Gauge("vtune_budget_trials", "Trial budget", registry=r)
        self.trials = Counter("vtune_trials", "Trials ended, by state", ["state"], registry=r)
        for s in TRIAL_STATES:
            self.trials.labels(s)
        self.running = Gauge("vtune_trials_running", "1 while a trial runs", registry=r)
        self._running_info = _RunningTrial()
        r.register(self._running_info)
        self.points = Counter("vtune_points_measured", "Load points measured", registry=r)
        self.out_tps = Gauge(
            "vtune_last_trial_output_throughput",
            "Output tokens/s at the last complete trial's point",
            registry=r,
        )
        self.req_tps = Gauge(
            "vtune_last_trial_request_throughput",
            "Requests/s at the last complete trial's point",
            registry=r,
        )
        self.latency = Gauge(
            "vtune_last_trial_latency_seconds",
            "Latency percentiles at the last complete trial's chosen point",
            ["metric", "stat"],
            registry=r,
        )
        self.last_objective = Gauge(
            "vtune_last_trial_objective", "Objective of the last complete trial", registry=r
        )
        self.peak_kv = Gauge(
            "vtune_last_trial_peak_kv_cache_usage",
            "vLLM's peak KV-cache usage (0..1) in the last trial",
            registry=r,
        )
        self.preemptions = Gauge(
            "vtune_last_trial_preemptions", "vLLM's preemptions in the last trial", registry=r
        )
        self.best_goodput = Gauge(
            "vtune_best_goodput", "Best requests/s meeting the SLO so far", registry=r
        )
        self.best_objective = Gauge("vtune_best_objective", "Best objective so far", registry=r)
        self.gain = Gauge("vtune_gain_ratio", "Best / baseline objective", registry=r)
        self.point = PointGauges(r)
        self._best_goodput: float | None = None
        self._best_objective: float | None = None
        # Nothing measured yet reads NaN (Grafana shows a gap), never a made-up 0.
        for gauge in (
            self.out_tps,
            self.req_tps,
            self.last_objective,
            self.peak_kv,
            self.preemptions,
            self.best_goodput,
            self.best_objective,
            self.gain,
        ):
            gauge.set(math.nan)
        for metric in LATENCY_METRICS:
            for stat in LATENCY_STATS:
                self.latency.labels(metric, stat).set(math.nan)

    # SearchObserver hooks ---------------------------------------------------------------------

    def on_plan(self, total_candidates: int, pruned: int, budget: int) -> None:
        self.candidates.set(total_candidates)
        self.pruned.set(pruned)
        self.budget.set(budget)
        self._push()

    def on_phase(self, phase: str, detail: str = "") -> None:
        if phase not in self._phases:  # a phase added later still gets a one-hot series
            self._phases.append(phase)
        for p in self._phases:
            self.phase.labels(p).set(1 if p == phase else 0)

    def on_trial_start(self, number: int, name: str, knobs: dict[str, Any]) -> None:
        self._running_info.current = (number, name, dict(knobs))
        self.running.set(1)

    def on_point(self, name: str, point: dict[str, Any]) -> None:
        self.points.inc()
        self.point.set(point.get("telemetry"), point.get("roofline"))

    def on_trial_end(self, trial: TrialRecord) -> None:
        self._running_info.current = None
        self.running.set(0)
        state = trial.state if trial.state in TRIAL_STATES else STATE_FAILED
        self.trials.labels(state).inc()
        if trial.peak_kv is not None:
            self.peak_kv.set(trial.peak_kv)
        if trial.preemptions is not None:
            self.preemptions.set(trial.preemptions)
        chosen = trial.chosen_point
        if chosen is not None:
            self.point.set(chosen.get("telemetry"), chosen.get("roofline"))
        if trial.state == STATE_COMPLETE and trial.best:
            self._set_last(trial)
        self._push()

    def on_finish(self, record: SearchRecord) -> None:
        ratio = finite(record.gain.ratio) if record.gain is not None else None
        if ratio is not None:
            self.gain.set(ratio)
        self.on_phase("done")
        self._push()

    # -------------------------------------------------------------------------------------------

    def _set_last(self, trial: TrialRecord) -> None:
        best = trial.best or {}
        set_gauge(self.out_tps, best.get("output_throughput"))
        set_gauge(self.req_tps, best.get("request_throughput"))
        for metric in LATENCY_METRICS:
            for stat in LATENCY_STATS:
                ms = best.get(f"{stat}_{metric}_ms")
                if ms is None and stat == "p50":
                    ms = best.get(f"median_{metric}_ms")
                set_gauge(self.latency.labels(metric, stat), None if ms is None else ms / 1000.0)
        if trial.objective is not None and math.isfinite(trial.objective):
            self.last_objective.set(trial.objective)
            if is_better(self.objective, trial.objective, self._best_objective):
                self._best_objective = trial.objective
                self.best_objective.set(trial.objective)
        goodput = best.get("request_goodput")
        if goodput is None and best.get("slo") is None:
            goodput = best.get("request_throughput")  # no SLO: every completed request is good
        if isinstance(goodput, int | float) and (
            self._best_goodput is None or goodput > self._best_goodput
        ):
            self._best_goodput = float(goodput)
            self.best_goodput.set(goodput)
