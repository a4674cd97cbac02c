"""Prometheus metrics of a running search or bench: a /metrics endpoint and Pushgateway pushes.

* :func:`start_exporter` serves a registry on ``host:port`` (127.0.0.1 unless told otherwise)
  and raises :class:`~tuner.errors.EngineError` with one line when the port is taken.
* :class:`Pushgateway` pushes a registry; a failed push logs one warning line and never raises,
  so an unreachable gateway never stops a tuning job.
* :class:`SearchExporter` is a :class:`~tuner.search.events.SearchObserver` that keeps the
  ``vtune_*`` search metrics in its own :class:`CollectorRegistry` (never the global one) and
  pushes at the plan, at the end of each trial and at the finish when it has a gateway.
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
vtune_best_objective                       best objective so far
vtune_gain_ratio                           best / baseline objective (set at the finish)
=========================================  ===================================================
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tuner.errors import EngineError, ParameterError
from tuner.search.events import PHASES
from tuner.search.record import STATE_COMPLETE, STATE_FAILED, STATE_PRUNED, TrialRecord

log = logging.getLogger(__name__)

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
LATENCY_STATS = ("p50", "p95", "p99")
TRIAL_STATES = (STATE_COMPLETE, STATE_FAILED, STATE_PRUNED)
E = TypeVar("E")


# --- serving and pushing ----------------------------------------------------------------------


@dataclass
class MetricsServer:
    """A running /metrics endpoint (a daemon thread). ``port`` is the bound one (useful with 0)."""

    host: str
    port: int
    registry: CollectorRegistry
    _httpd: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port; safe to call twice."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_exporter(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve ``registry`` (a fresh one if None) at ``http://host:port/metrics``.

    Port 0 picks a free port. Raises EngineError with one line when the port is in use, the
    address cannot be bound, or the host is unknown.
    """
    from prometheus_client import start_http_server

    if not 0 <= port <= 65535:
        raise ParameterError(f"metrics port must be 0-65535, got {port}")
    reg = registry if registry is not None else CollectorRegistry()
    try:
        httpd, thread = start_http_server(port, addr=host, registry=reg)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise EngineError(f"metrics port {port} is in use on {host}") from None
        if exc.errno == errno.EACCES:
            raise EngineError(f"no permission to listen on {host}:{port}") from None
        reason = exc.strerror or str(exc)
        raise EngineError(f"cannot serve metrics on {host}:{port}: {reason}") from None
    return MetricsServer(host, httpd.server_address[1], reg, httpd, thread)


class Pushgateway:
    """Pushes a registry to a Pushgateway under ``job`` and ``grouping`` (PUT: the group's
    metrics are replaced). :meth:`push` never raises: a failure logs one warning line (the
    same failure again only at debug level) and returns False."""

    def __init__(
        self,
        url: str,
        job: str = "vtune",
        grouping: Mapping[str, str] | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ParameterError(f"not a Pushgateway URL: {url!r} (use e.g. http://host:9091)")
        self.url = text.rstrip("/")
        self.job = job
        self.grouping = dict(grouping or {})
        self.timeout_s = timeout_s
        self.failures = 0
        self.pushes = 0
        self._last_error: str | None = None

    def push(self, registry: CollectorRegistry) -> bool:
        from prometheus_client import push_to_gateway

        try:
            push_to_gateway(
                self.url,
                job=self.job,
                registry=registry,
                grouping_key=self.grouping,
                timeout=self.timeout_s,
            )
        except Exception as exc:  # any failure (DNS, refused, HTTP 5xx) only warns
            self.failures += 1
            reason = " ".join(str(getattr(exc, "reason", None) or exc).split())[:200]
            level = logging.DEBUG if reason == self._last_error else logging.WARNING
            log.log(level, "Pushgateway %s unreachable (%s); the run goes on", self.url, reason)
            self._last_error = reason
            return False
        if self._last_error is not None:
            log.info("Pushgateway %s reachable again", self.url)
        self._last_error = None
        self.pushes += 1
        return True


# --- the search -------------------------------------------------------------------------------


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
            labels["knob_" + lab if lab in labels else lab] = _label_value(value)
        fam = GaugeMetricFamily(
            "vtune_trial_running_info", "The running trial and its knobs", labels=list(labels)
        )
        fam.add_metric(list(labels.values()), 1.0)
        yield fam


def _label_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


class RegistryExporter:
    """What both exporters share: their registry, an optional Pushgateway, and an info metric
    ``<info_name>_info`` with vtune's version and the ``info`` labels (never a secret)."""

    default_job = "vtune"

    def __init__(
        self,
        registry: CollectorRegistry | None,
        pushgateway: Pushgateway | None,
        info_name: str,
        info_doc: str,
        info: Mapping[str, Any] | None,
    ) -> None:
        from tuner import __version__

        self.registry = registry if registry is not None else CollectorRegistry()
        self.pushgateway = pushgateway
        self.info = Info(info_name, info_doc, registry=self.registry)
        self.info.info(
            {"version": __version__, **{k: _label_value(v) for k, v in (info or {}).items()}}
        )

    def _push(self) -> None:
        if self.pushgateway is not None:
            self.pushgateway.push(self.registry)


class SearchExporter(RegistryExporter):
    """The search's metrics (see the module table); a :class:`~tuner.search.events.SearchObserver`.

    ``info`` becomes the labels of ``vtune_info`` (e.g. model, gpu, objective, slo; never a
    secret). With a ``pushgateway`` the registry is pushed at the plan, after each trial and
    at the finish. Hooks never raise because of Prometheus.
    """

    default_job = "vtune-search"

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        pushgateway: Pushgateway | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
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

    def on_trial_end(self, trial: TrialRecord) -> None:
        self._running_info.current = None
        self.running.set(0)
        state = trial.state if trial.state in TRIAL_STATES else STATE_FAILED
        self.trials.labels(state).inc()
        points = (trial.rate_search or {}).get("points") or []
        servers = [p.get("server") or {} for p in points]
        kv = [s["peak_kv_cache_usage"] for s in servers if s.get("peak_kv_cache_usage") is not None]
        pre = [s["preemptions"] for s in servers if s.get("preemptions") is not None]
        if kv:
            self.peak_kv.set(max(kv))
        if pre:
            self.preemptions.set(sum(pre))
        if trial.state == STATE_COMPLETE and trial.best:
            self._set_last(trial)
        self._push()

    def on_finish(self, record: dict[str, Any]) -> None:
        gain = record.get("gain") or {}
        if isinstance(gain.get("ratio"), int | float) and math.isfinite(gain["ratio"]):
            self.gain.set(gain["ratio"])
        self.on_phase("done")
        self._push()

    # -------------------------------------------------------------------------------------------

    def _set_last(self, trial: TrialRecord) -> None:
        best = trial.best or {}
        _set(self.out_tps, best.get("output_throughput"))
        _set(self.req_tps, best.get("request_throughput"))
        for metric in LATENCY_METRICS:
            for stat in LATENCY_STATS:
                ms = best.get(f"{stat}_{metric}_ms")
                if ms is None and stat == "p50":
                    ms = best.get(f"median_{metric}_ms")
                _set(self.latency.labels(metric, stat), None if ms is None else ms / 1000.0)
        if trial.objective is not None and math.isfinite(trial.objective):
            self.last_objective.set(trial.objective)
            if self._best_objective is None or trial.objective > self._best_objective:
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


def _set(gauge: Any, value: Any) -> None:
    """Set a gauge from a JSON value; None (not measured) becomes NaN, never 0."""
    gauge.set(float(value) if isinstance(value, int | float) else math.nan)


@contextlib.contextmanager
def exporting(
    kind: type[E],
    port: int | None = None,
    host: str = "127.0.0.1",
    pushgateway: str | None = None,
    *,
    job: str | None = None,
    grouping: Mapping[str, str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> Iterator[E | None]:
    """The CLI's one call: an exporter of ``kind`` (SearchExporter or BenchExporter, whose
    ``default_job`` names the Pushgateway job) served on
    ``host:port`` and/or pushing to ``pushgateway`` (job "vtune-search" / "vtune-bench" unless
    given) for the duration of the block; None when neither is asked for. A taken port raises
    EngineError before the block runs; the endpoint is closed after it."""
    if port is None and pushgateway is None:
        yield None
        return
    default_job = getattr(kind, "default_job", "vtune")
    gateway = (
        Pushgateway(pushgateway, job=job or default_job, grouping=grouping) if pushgateway else None
    )
    exporter = kind(pushgateway=gateway, info=info)
    server = start_exporter(port, host, exporter.registry) if port is not None else None
    if server is not None:
        log.info("metrics on %s", server.url)
    try:
        yield exporter
    finally:
        if server is not None:
            server.close()
