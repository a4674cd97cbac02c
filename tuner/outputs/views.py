"""The finished record as rows: :class:`TrialView` per trial, read by the report, the plots
and anything else that shows a search. Pure, apart from :func:`load_record`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.errors import ParameterError
from tuner.files import read_json

SCHEMA_PREFIX = "vtune.search/"


@dataclass(frozen=True)
class TrialView:
    """One trial as the report shows it. Figures come from the chosen point (``best``);
    ``peak_kv`` and ``preemptions`` from vLLM's own /metrics over all the trial's points;
    ``measured_max_tps`` is the highest output throughput over its points."""

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

    @property
    def tag(self) -> str:
        """Short id for plots: ``#3`` (the name when the trial has no number)."""
        return f"#{self.number}" if self.number is not None else self.name

    @property
    def label(self) -> str:
        return f"#{self.number} {self.name}" if self.number is not None else self.name


def load_record(path: Path) -> dict[str, Any]:
    """Read a search record; ParameterError (one line) unless it is a vtune search record."""
    data = read_json(Path(path))
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith(SCHEMA_PREFIX):
        raise ParameterError(
            f"{path} is not a vtune search record (expected schema {SCHEMA_PREFIX}1; "
            "give the .json written beside the profile)"
        )
    if not isinstance(data.get("trials"), list):
        raise ParameterError(f"{path} has no trials list")
    return data


def num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def trial_views(record: Mapping[str, Any]) -> list[TrialView]:
    """The record's trials as rows, in trial order (pure)."""
    best_name = record.get("best")
    views = []
    for t in record.get("trials") or []:
        best = t.get("best") or {}
        points = [p for p in ((t.get("rate_search") or {}).get("points") or []) if p]
        servers = [p.get("server") or {} for p in points]
        kv = [v for v in (num(s.get("peak_kv_cache_usage")) for s in servers) if v is not None]
        pre = [v for v in (num(s.get("preemptions")) for s in servers) if v is not None]
        outs = [num((p.get("summary") or {}).get("output_throughput")) for p in points]
        outs_known = [v for v in outs if v is not None]
        latency = {
            key[: -len("_ms")]: num(value)
            for key, value in best.items()
            if key.endswith("_ms") and isinstance(value, int | float | type(None))
        }
        failure = t.get("failure") or {}
        goodput = num(best.get("request_goodput"))
        views.append(
            TrialView(
                number=t.get("number"),
                name=str(t.get("name", "?")),
                state=str(t.get("state", "?")),
                baseline=bool(t.get("baseline")) or t.get("name") == record.get("baseline"),
                is_best=t.get("name") == best_name,
                objective=num(t.get("objective")),
                knobs=dict(t.get("knobs") or {}),
                output_throughput=num(best.get("output_throughput")),
                request_throughput=num(best.get("request_throughput")),
                goodput=goodput,
                rate=num(best.get("rate")),
                latency_ms=latency,
                peak_kv=max(kv) if kv else None,
                preemptions=sum(pre) if pre else None,
                predicted_tps=num((t.get("estimate") or {}).get("predicted_tokens_per_s")),
                measured_max_tps=max(outs_known) if outs_known else None,
                failure_class=failure.get("class"),
                failure_message=failure.get("message"),
                points=points,
            )
        )
    return views
