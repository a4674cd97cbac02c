"""One trial's record (:class:`TrialRecord`) and a re-measured finalist (:class:`Finalist`):
what the search loop saves after each trial, resumes from, and hands to its observers.
Both end up inside the search record (:mod:`tuner.search.record`), which re-exports them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tuner.engine.log import FailureClass, environment_failure, memory_taken
from tuner.search.objective import worst
from tuner.search.stats import mean_interval

STATE_COMPLETE = "complete"  # the server ran and the load was measured
STATE_FAILED = "failed"  # the server failed (class in ``failure``) or the load broke
STATE_PRUNED = "pruned"  # ruled out: by the bounds (never launched) or stopped early
# The rule of a trial stopped after its capacity probe (``failure["rule"]``, state pruned).
RULE_EARLY_STOP = "early_stop"


def finite(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (None, bools, strings, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class TrialRecord:
    """One candidate's trial.

    ``rate_search`` holds every measured load point (``RateSearchResult.to_json()``): its
    summary in ``vllm bench serve`` field names, whether the SLO held, and the server's own
    figures scraped from /metrics (``server``: peak KV usage, preemptions, max running/waiting,
    and the sampled time series under ``series``), the hardware telemetry sampled while it ran
    (``telemetry``: device, period_s, samples, mean / p50 / max per figure, a downsampled
    ``series``, ``notes``) and where it sits on the roofline (``roofline``: achieved bandwidth
    and FLOP/s, their fractions of the peaks, ``regime``, ``batch``, ``peaks``); the last two
    are None in records written before vtune measured them. ``best`` is the chosen point's
    summary with its ``rate`` (None for closed loop). ``estimate`` holds the figures that ranked the
    candidate (predicted_tokens_per_s, kv_capacity_tokens, max_concurrency,
    roofline_knee_batch, weight_bytes). ``server_info`` is what vLLM reported at start
    (kv_cache_size_tokens, max_concurrency, vllm_version, startup_s).
    """

    name: str
    knobs: dict[str, Any]
    state: str
    objective: float | None = None
    number: int | None = None
    baseline: bool = False
    variant: str = "none"
    vllm_args: list[str] = field(default_factory=list)
    estimate: dict[str, Any] = field(default_factory=dict)
    server_info: dict[str, Any] | None = None
    rate_search: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    engine_time_s: float = 0.0
    log_path: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    # A contender's re-runs of its chosen load in its own launch, right after the rate search
    # (``--finalist-runs in-trial``): FinalistSample.to_json() each; empty when none were run.
    in_trial_runs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.in_trial_runs:  # written when run: a record from an older vtune keeps its keys
            data.pop("in_trial_runs")
        return data

    @property
    def in_trial_samples(self) -> tuple[FinalistSample, ...]:
        """:attr:`in_trial_runs` read back (its finalist samples; unreadable entries dropped)."""
        read = (FinalistSample.from_json(r) for r in self.in_trial_runs or [])
        return tuple(r for r in read if r is not None)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    # Aggregates over the trial's points: computed here, read by every output.

    @property
    def points(self) -> list[dict[str, Any]]:
        """The measured load points (``rate_search["points"]``), in measuring order."""
        raw = _dict(self.rate_search).get("points")
        return [p for p in raw if isinstance(p, dict) and p] if isinstance(raw, list) else []

    def _server_values(self, key: str) -> list[float]:
        values = (finite(_dict(p.get("server")).get(key)) for p in self.points)
        return [v for v in values if v is not None]

    @property
    def peak_kv(self) -> float | None:
        """vLLM's peak KV-cache usage (0..1) over all the points; None when never scraped."""
        values = self._server_values("peak_kv_cache_usage")
        return max(values) if values else None

    @property
    def preemptions(self) -> float | None:
        """vLLM's preemptions summed over all the points; None when never scraped."""
        values = self._server_values("preemptions")
        return sum(values) if values else None

    @property
    def max_output_throughput(self) -> float | None:
        """The highest output tokens/s measured at any point (the SLO aside)."""
        values = [finite(_dict(p.get("summary")).get("output_throughput")) for p in self.points]
        known = [v for v in values if v is not None]
        return max(known) if known else None

    @property
    def chosen_point(self) -> dict[str, Any] | None:
        """The point the rate search chose (``best_index``), else the last point measured;
        None when nothing was measured."""
        points = self.points
        index = _dict(self.rate_search).get("best_index")
        raw = _dict(self.rate_search).get("points")
        chosen = (
            raw[index]
            if isinstance(raw, list) and type(index) is int and 0 <= index < len(raw)
            else None
        )
        if isinstance(chosen, dict) and chosen:
            return chosen
        return points[-1] if points else None

    @property
    def regime(self) -> str | None:
        """The roofline regime (``memory-bound``, ``compute-bound``, ``overhead-bound``) of the
        chosen point, else of the last point; None when no point has a roofline (a record
        written before vtune measured it, or nothing decoded)."""
        point = self.chosen_point
        if point is None:
            return None
        roofline = _dict(point.get("roofline")) or _dict(
            _dict(point.get("summary")).get("roofline")
        )
        value = roofline.get("regime")
        return value if isinstance(value, str) and value else None

    @property
    def stopped_early(self) -> bool:
        """Launched, probed, and stopped there: its capacity could not reach the incumbent
        (state pruned, ``failure["rule"]`` early_stop). Finished (a rerun skips it), counted
        in the budget, never a finalist."""
        return self.state == STATE_PRUNED and _dict(self.failure).get("rule") == RULE_EARLY_STOP

    @property
    def failure_class(self) -> str | None:
        value = _dict(self.failure).get("class")
        return None if value is None else str(value)

    @property
    def environment_failure(self) -> bool:
        """Whether this trial failed for the environment, not for the candidate
        (:class:`tuner.engine.log.FailureClass`): such a trial is not finished, and the next
        run measures the candidate again. An OOM counts as the environment's when vLLM found
        the memory taken at start-up while the candidate left the memory utilization at
        vLLM's default (an empty device has it: another process holds the memory)."""
        if self.state != STATE_FAILED:
            return False
        if environment_failure(self.failure_class):
            return True
        message = str(_dict(self.failure).get("message") or "")
        return (
            (self.failure_class or "").lower() == FailureClass.OOM.value
            and memory_taken(message)
            and self.knobs.get("gpu_memory_utilization") is None
        )


@dataclass(frozen=True)
class FinalistSample:
    """One sample of a finalist: its ``value`` (the objective) and the load it was measured
    at: ``rate`` req/s (None: closed loop) and ``concurrency`` (closed loop's streams).
    ``step_down``: the chosen load missed the SLO, and this is the point one step down.
    ``in_trial``: measured in the trial's own launch right after its rate search (no relaunch,
    so launch-to-launch variation is not in it)."""

    value: float
    rate: float | None = None
    concurrency: int | None = None
    step_down: bool = False
    in_trial: bool = False

    @classmethod
    def of(cls, sample: FinalistSample | float) -> FinalistSample:
        """A sample as it is; a bare number (a runner that reports values only) is a sample
        at the chosen load, load not known."""
        return sample if isinstance(sample, FinalistSample) else cls(float(sample))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "value": finite(self.value), "rate": finite(self.rate)}

    @classmethod
    def from_json(cls, data: Any, worst_value: float = 0.0) -> FinalistSample | None:
        """None for anything but an object; a null value is ``worst_value``."""
        if not isinstance(data, dict):
            return None
        value = finite(data.get("value"))
        concurrency = data.get("concurrency")
        return cls(
            worst_value if value is None else value,
            finite(data.get("rate")),
            concurrency if type(concurrency) is int else None,
            data.get("step_down") is True,
            data.get("in_trial") is True,
        )


@dataclass(frozen=True)
class Finalist:
    """A finalist re-measured ``n`` times (its first trial included): mean and a 95 % CI,
    whose low end is never below zero (:func:`tuner.search.stats.mean_interval`). ``runs``
    (one per sample when known, else empty, and then not written) say at which load each
    sample was taken."""

    name: str
    samples: tuple[float, ...]
    mean: float
    ci_low: float
    ci_high: float
    runs: tuple[FinalistSample, ...] = ()

    @classmethod
    def of(cls, name: str, samples: list[float], runs: tuple[FinalistSample, ...] = ()) -> Finalist:
        mean, low, high = mean_interval(samples)
        return cls(name, tuple(samples), mean, low, high, tuple(runs))

    def overlaps(self, other: Finalist) -> bool:
        return self.ci_low <= other.ci_high and other.ci_low <= self.ci_high

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples"] = list(self.samples)
        data.pop("runs")
        if self.runs:  # written when known: a record read from an older vtune keeps its keys
            data["runs"] = [r.to_json() for r in self.runs]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], objective: str | None = None) -> Finalist:
        """Read a finalist back. A null sample (written for a non-finite value) is the worst
        value for ``objective`` (:func:`tuner.search.objective.worst`)."""
        raw = data.get("samples")
        listed = raw if isinstance(raw, list) else []
        worst_value = worst(objective)
        samples = [
            worst_value if v is None else float(v)
            for v in listed
            if v is None or (isinstance(v, int | float) and not isinstance(v, bool))
        ]
        raw_runs = data.get("runs")
        read = [FinalistSample.from_json(r, worst_value) for r in raw_runs or []]
        runs = tuple(r for r in read if r is not None) if isinstance(raw_runs, list) else ()
        figures = [data.get(k) for k in ("mean", "ci_low", "ci_high")]
        name = str(data.get("name", "?"))
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in figures):
            return cls.of(name, samples, runs)  # a record without the figures: recomputed
        mean, low, high = (float(v) for v in figures)
        return cls(name, tuple(samples), mean, low, high, runs)
