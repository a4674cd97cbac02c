"""The finished record as rows: :class:`TrialView` per trial, read by the report's table and
plots. Pure: built from the typed :class:`~tuner.search.record.SearchRecord`, never from JSON
(reading a record is :func:`tuner.search.record.load_record`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuner.search.record import SearchRecord, finite


@dataclass(frozen=True)
class TrialView:
    """One trial as the report shows it. Figures come from the chosen point (``best``), and so
    does ``regime`` (the roofline's: memory-, compute- or overhead-bound);
    ``peak_kv`` and ``preemptions`` from vLLM's own /metrics over all the trial's points;
    ``measured_max_tps`` is the highest output throughput over its points (all three are
    the :class:`~tuner.search.record.TrialRecord`'s own aggregates)."""

    number: int | None
    name: str
    state: str
    baseline: bool
    is_best: bool
    objective: float | None
    knobs: dict[str, Any]
    output_throughput: float | None
    request_throughput: float | None
    goodput: float | None
    rate: float | None
    latency_ms: dict[str, float | None]  # "p95_ttft" -> ms, for every stat/metric present
    peak_kv: float | None
    preemptions: float | None
    predicted_tps: float | None
    measured_max_tps: float | None
    failure_class: str | None
    failure_message: str | None
    points: list[dict[str, Any]] = field(default_factory=list)
    regime: str | None = None  # the chosen point's roofline regime (TrialRecord.regime)
    knee_batch: float | None = None  # the estimate's roofline knee (batch)
    chosen_point: dict[str, Any] | None = None  # the point ``best`` was taken from, else last

    @property
    def tag(self) -> str:
        """Short id for plots: ``#3`` (the name when the trial has no number)."""
        return f"#{self.number}" if self.number is not None else self.name

    @property
    def label(self) -> str:
        return f"#{self.number} {self.name}" if self.number is not None else self.name


def trial_views(record: SearchRecord) -> list[TrialView]:
    """The record's trials as rows, in trial order (pure)."""
    views = []
    for t in record.trials:
        best = t.best or {}
        latency = {
            key[: -len("_ms")]: finite(value)
            for key, value in best.items()
            if key.endswith("_ms") and isinstance(value, int | float | type(None))
        }
        views.append(
            TrialView(
                number=t.number if isinstance(t.number, int) else None,
                name=t.name,
                state=t.state,
                baseline=bool(t.baseline) or t.name == record.baseline,
                is_best=t.name == record.best,
                objective=finite(t.objective),
                knobs=dict(t.knobs or {}),
                output_throughput=finite(best.get("output_throughput")),
                request_throughput=finite(best.get("request_throughput")),
                goodput=finite(best.get("request_goodput")),
                rate=finite(best.get("rate")),
                latency_ms=latency,
                peak_kv=t.peak_kv,
                preemptions=t.preemptions,
                predicted_tps=finite((t.estimate or {}).get("predicted_tokens_per_s")),
                measured_max_tps=t.max_output_throughput,
                failure_class=t.failure_class,
                failure_message=(t.failure or {}).get("message"),
                points=t.points,
                regime=t.regime,
                knee_batch=finite((t.estimate or {}).get("roofline_knee_batch")),
                chosen_point=t.chosen_point,
            )
        )
    return views
