"""Where the watched points go (issue 12): a trial's regime, the exporters' telemetry and
roofline gauges, and the report's roofline plot and regime column."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.unit.roofline_records import SAMPLE, with_rooflines
from tuner.outputs.plots_roofline import plot_roofline, roof_point
from tuner.outputs.prometheus import SearchExporter
from tuner.outputs.prometheus_bench import BenchExporter
from tuner.outputs.report import trial_views, write_report
from tuner.search.record import SearchRecord, TrialRecord

TELEMETRY = {
    "mean": {"cpu_percent_total": 187.5, "rss_bytes_total": 2e9, "gpu_util_percent": 91.0},
}
ROOFLINE = {
    "bandwidth_fraction": 0.62,
    "flops_fraction": 0.08,
    "achieved_bandwidth_bytes_per_s": 2.1e12,
    "achieved_flops_per_s": 7.9e13,
    "batch": 48.0,
    "regime": "memory-bound",
}


def _trial(points: list[dict], best_index: int | None) -> TrialRecord:
    return TrialRecord(
        name="t",
        knobs={},
        state="complete",
        rate_search={"points": points, "best_index": best_index},
    )


def test_a_trials_regime_is_its_chosen_points_else_its_last() -> None:
    mem = {"summary": {}, "roofline": {"regime": "memory-bound"}}
    comp = {"summary": {}, "roofline": {"regime": "compute-bound"}}
    assert _trial([mem, comp], 0).regime == "memory-bound"
    assert _trial([mem, comp], None).regime == "compute-bound"
    assert _trial([mem, comp], 7).regime == "compute-bound"  # a bad index: the last point
    assert _trial([{"summary": {}, "roofline": None}], 0).regime is None  # an older record
    assert _trial([], None).regime is None and _trial([], None).chosen_point is None
    assert TrialRecord("t", {}, "failed").regime is None


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels or None)


def test_search_exporter_shows_the_live_point_then_the_trials_chosen_one() -> None:
    exporter = SearchExporter(info={"objective": "throughput"})
    r = exporter.registry
    assert math.isnan(_value(r, "vtune_bandwidth_fraction"))  # nothing measured: NaN, not 0
    assert _value(r, "vtune_regime", regime="memory-bound") == 0
    exporter.on_point("t", {"telemetry": TELEMETRY, "roofline": ROOFLINE})
    assert _value(r, "vtune_telemetry_cpu_percent") == 187.5
    assert _value(r, "vtune_gpu_utilization_ratio") == pytest.approx(0.91)
    assert _value(r, "vtune_bandwidth_fraction") == 0.62
    assert _value(r, "vtune_flops_fraction") == 0.08
    assert _value(r, "vtune_achieved_bandwidth_bytes_per_second") == 2.1e12
    assert _value(r, "vtune_decode_batch") == 48.0
    assert _value(r, "vtune_regime", regime="memory-bound") == 1
    assert _value(r, "vtune_regime", regime="overhead-bound") == 0
    assert math.isnan(_value(r, "vtune_gpu_sm_active_ratio"))  # no DCGM
    chosen = {
        "summary": {},
        "telemetry": {"mean": {"cpu_percent_total": 95.0}},
        "roofline": {**ROOFLINE, "regime": "overhead-bound", "bandwidth_fraction": 0.1},
    }
    exporter.on_trial_end(_trial([chosen, {"summary": {}, "roofline": ROOFLINE}], 0))
    assert _value(r, "vtune_bandwidth_fraction") == 0.1
    assert _value(r, "vtune_regime", regime="overhead-bound") == 1
    assert _value(r, "vtune_regime", regime="memory-bound") == 0
    assert math.isnan(_value(r, "vtune_gpu_utilization_ratio"))  # that point had no GPU


def test_bench_exporter_sets_the_point_gauges_at_the_finish() -> None:
    exporter = BenchExporter()
    exporter.finish({"output_throughput": 10.0}, TELEMETRY, ROOFLINE)
    r = exporter.registry
    assert _value(r, "vtune_telemetry_cpu_percent") == 187.5
    assert _value(r, "vtune_flops_fraction") == 0.08
    assert _value(r, "vtune_regime", regime="memory-bound") == 1
    exporter.finish({"output_throughput": 10.0}, None, {"regime": 3, "batch": "x"})
    assert math.isnan(_value(r, "vtune_decode_batch"))  # odd values never raise
    assert _value(r, "vtune_regime", regime="memory-bound") == 0


# --- the report -------------------------------------------------------------------------------


def test_the_report_draws_the_knee_and_shows_the_regime(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    record.write_text(json.dumps(with_rooflines()))
    report = write_report(record, tmp_path / "site")
    assert (tmp_path / "site" / "roofline.png") in report.images
    page = report.html.read_text()
    assert '<th class="">regime</th>' in page and "memory-bound" in page
    assert "Throughput and utilization vs batch" in page
    assert "Peaks: the datasheet" in page or "Peaks: not recorded" in page


def test_no_roofline_no_plot(tmp_path: Path) -> None:
    record = SearchRecord.from_json(json.loads(SAMPLE.read_text()))
    assert plot_roofline(record, trial_views(record), tmp_path / "r.png") is None
    assert not (tmp_path / "r.png").exists()
    assert all(v.regime is None for v in trial_views(record))


def test_a_point_without_usable_figures_is_left_out() -> None:
    good = {"summary": {"output_throughput": 10.0}, "roofline": ROOFLINE}
    assert roof_point(good) is not None
    for bad in (
        {"summary": {"output_throughput": 10.0}, "roofline": {**ROOFLINE, "batch": 0}},
        {"summary": {"output_throughput": None}, "roofline": ROOFLINE},
        {"summary": {"output_throughput": 10.0}, "roofline": "memory-bound"},
        {"roofline": ROOFLINE},
    ):
        assert roof_point(bad) is None


def test_the_plot_marks_the_knee_and_the_chosen_batch(tmp_path: Path) -> None:
    record = SearchRecord.from_json(with_rooflines())
    views = trial_views(record)
    best = next(v for v in views if v.is_best)
    assert best.regime == "memory-bound" and best.knee_batch is not None
    path = plot_roofline(record, views, tmp_path / "roofline.png")
    assert path is not None and path.stat().st_size > 20_000
