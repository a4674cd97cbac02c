"""The final screen agrees with itself (issue 16): the Pareto front is drawn over the figures
the choice uses, a rate measured at saturation is a number (marked), and the prediction stands
beside the measurement (calibrated and regime when the record has them); names never cut."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from tests.configs import TINY_LLAMA_CONFIG
from tuner.cli.console import print_search_result
from tuner.cli.search import tune_config
from tuner.plan.prune import Planned, Variant
from tuner.search.front import front, front_points, search_front
from tuner.search.prepare import prepare
from tuner.search.record import STATE_COMPLETE, Finalist, SearchRecord, TrialRecord, load_record
from tuner.search.run import run_search

SAMPLE = Path(__file__).parent.parent / "data" / "sample_record.json"
CONFIG = TINY_LLAMA_CONFIG
# The demo's case: on first runs seqs64 beats seqs256 on both axes, the re-runs reverse it.
# max_num_seqs -> (first-run output tok/s, p95 TPOT ms, re-measured tok/s); 128: the baseline.
FIGURES = {16: (500.0, 5.0, 500.0), 64: (1000.0, 10.0, 700.0), 128: (300.0, 30.0, 300.0)}
FIGURES[256] = (900.0, 20.0, 1200.0)


def screen(record: SearchRecord, width: int = 200, yaml_path: str | None = "cpu.yaml") -> str:
    buf = StringIO()
    outcome = SimpleNamespace(record=record, yaml_path=yaml_path and Path(yaml_path))
    print_search_result(outcome, Console(width=width, file=buf))
    return buf.getvalue()


def trial(name: str, thr: float, tpot: float, **best: object) -> TrialRecord:
    point = {"output_throughput": thr, "p95_tpot_ms": tpot, "request_throughput": thr / 100}
    return TrialRecord(
        name,
        {},
        STATE_COMPLETE,
        objective=thr,
        number=0,
        estimate={"predicted_tokens_per_s": 2 * thr},
        best={**point, "rate": 2.0, **best},
    )


# --- the Pareto front and the choice ------------------------------------------------------------


class ReversingRunner:
    """First runs and re-runs from FIGURES: the first runs rank seqs64 first, the re-measured
    means seqs256."""

    def engine_settings(self, cand: object, variant: Variant) -> object:
        return (variant.model, cand)  # what decides whether finalists share a launch

    def measure(
        self, number: int, planned: Planned, variant: Variant, incumbent: float | None = None
    ) -> TrialRecord:
        seqs = planned.candidate.max_num_seqs or 128
        thr, tpot, _ = FIGURES[seqs]
        best = {"output_throughput": thr, "p95_tpot_ms": tpot, "request_throughput": thr / 100}
        return TrialRecord(
            planned.name,
            planned.candidate.knobs(),
            STATE_COMPLETE,
            objective=thr,
            number=number,
            baseline=planned.candidate.is_baseline,
            estimate=planned.estimate_json(),
            best={**best, "rate": 2.0},
        )

    def remeasure(self, record: TrialRecord, variant: Variant, repeats: int) -> list[float]:
        seqs = record.knobs.get("max_num_seqs", 128)
        return [FIGURES[seqs][2]] * repeats


def test_the_chosen_setting_is_on_the_front_the_search_records(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(CONFIG))
    monkeypatch.setattr(
        "tuner.search.run.VllmTrialRunner", lambda setup, observer: ReversingRunner()
    )
    argv = ["--model", str(tmp_path / "m"), "--gpu", "cpu", "--out", str(tmp_path / "p")]
    argv += ["--param", "max_num_seqs=16,64,256", "--finalists", "3", "--repeats", "2"]
    outcome = run_search(prepare(tune_config(argv)))
    record = outcome.record
    assert record.best == "seqs256"  # on the re-measured means
    first_runs = [
        (t.name, t.best["output_throughput"], t.best["p95_tpot_ms"]) for t in record.trials
    ]
    from tuner.search.stats import pareto_front

    assert "seqs256" not in pareto_front(first_runs)  # the demo's contradiction, reproduced
    assert "seqs256" in record.pareto_front
    assert record.pareto_front == tuple(search_front(record.trials, record.finalists, "throughput"))
    text = screen(record)
    [line] = [ln for ln in text.splitlines() if ln.startswith("Pareto front")]
    assert "re-measured finalists at their mean tok/s" in line and "seqs256 (chosen)" in line
    assert "off this front" not in text


def test_an_old_record_prints_the_front_over_the_choices_figures():
    """A /1 record whose stored front came from first runs: the console recomputes it."""
    a = trial("a", 1000.0, 10.0)
    b = trial("b", 900.0, 20.0)
    finalists = (
        Finalist.of("b", [900.0, 1200.0, 1200.0]),
        Finalist.of("a", [1000.0, 700.0, 700.0]),
    )
    record = SearchRecord(
        trials=(a, b), objective="throughput", best="b", finalists=finalists, pareto_front=("a",)
    )
    assert front(front_points(record.trials, (), "throughput")) == ["a"]  # first runs only
    text = screen(record)
    assert "b (chosen)" in text and "off this front" not in text


def test_a_chosen_setting_off_the_front_says_why():
    """Re-measured down, the chosen one can still sit below a candidate measured once."""
    chosen = trial("chosen", 1000.0, 20.0)
    once = trial("once", 950.0, 10.0)
    other = trial("other", 990.0, 30.0)
    finalists = (
        Finalist.of("chosen", [1000.0, 900.0, 900.0]),
        Finalist.of("other", [990.0, 800, 800]),
    )
    record = SearchRecord(
        trials=(chosen, once, other), objective="throughput", best="chosen", finalists=finalists
    )
    text = screen(record)
    assert "Pareto front" in text and "(chosen)" not in text
    [why] = [ln for ln in text.splitlines() if ln.startswith("The chosen chosen is off")]
    assert "once measured more output tok/s at a lower p95 TPOT" in why
    assert "re-measured means, and these ran once" in why
    # Goodput ranks requests/s meeting the SLO: a setting with fewer tokens/s can win it.
    slow = replace(trial("chosen", 800.0, 20.0), objective=9.0)
    goodput = replace(record, trials=(slow, once), objective="goodput", finalists=())
    text = screen(goodput)
    assert "each trial's first run" in text and "ranks goodput alone" in text


# --- a rate measured at saturation --------------------------------------------------------------


def test_a_slo_held_at_saturation_shows_the_sustained_rate():
    sat = trial("seqs64", 4413.0, 20.0, rate=None, concurrency=64, request_throughput=4.41)
    poisson = trial("seqs16", 1000.0, 10.0, rate=2.5)
    failed = TrialRecord("seqs512", {}, "failed", number=2, failure={"class": "OOM"})
    record = SearchRecord(trials=(sat, poisson, failed), objective="throughput", best="seqs64")
    lines = screen(record).splitlines()
    [row] = [ln for ln in lines if ln.startswith("0  seqs64")]
    assert "4.41 (sat.)" in row
    [row] = [ln for ln in lines if ln.startswith("0  seqs16")]
    assert " 2.5 " in row and "(sat.)" not in row
    [note] = [ln for ln in lines if ln.strip().startswith("(sat.):")]
    assert "saturation" in note
    record = replace(record, trials=(poisson,))
    assert "(sat.)" not in screen(record)  # no footnote without a saturated row


# --- predicted beside measured ------------------------------------------------------------------


@dataclass(frozen=True)
class RegimeTrial(TrialRecord):
    """A trial that knows its regime (TrialRecord.regime, when the record has it)."""

    @property
    def regime(self) -> str:
        return "memory-bound" if (self.objective or 0) < 5 else "compute-bound"


def with_regime(t: TrialRecord) -> RegimeTrial:
    return RegimeTrial(**{f.name: getattr(t, f.name) for f in fields(TrialRecord)})


def test_the_prediction_stands_beside_the_measurement():
    rec = load_record(SAMPLE)  # goodput: measured tok/s is a column of its own
    lines = screen(rec, width=200).splitlines()
    header = next(ln for ln in lines if "predicted tok/s" in ln)
    assert "measured tok/s" in header and "regime" not in header and "calibrated" not in header
    [chosen] = [ln for ln in lines if "seqs256-mbt16384-kvfp8 *" in ln]
    assert "1,717" in chosen and "4,019" in chosen  # measured and predicted, one line
    [check] = [ln for ln in lines if ln.startswith("Measured / predicted output tok/s")]
    assert "analytic x0.12 to x0.58, median x0.38 over 6 trials" in check

    est = {t.name: {**t.estimate, "calibrated_tokens_per_s": 1717.0 / 1.05} for t in rec.trials}
    calibrated = replace(
        rec, trials=tuple(with_regime(replace(t, estimate=est[t.name])) for t in rec.trials)
    )
    lines = screen(calibrated, width=200).splitlines()
    header = next(ln for ln in lines if "predicted tok/s" in ln)
    assert "calibrated tok/s" in header and "regime" in header
    [chosen] = [ln for ln in lines if "seqs256-mbt16384-kvfp8 *" in ln]
    assert "1,635" in chosen and "compute-bound" in chosen
    [check] = [ln for ln in lines if ln.startswith("Measured / predicted")]
    assert "; calibrated x" in check


def test_a_throughput_search_puts_the_prediction_beside_its_objective():
    record = SearchRecord(
        trials=(trial("seqs64", 4413.0, 20.0), trial("seqs16", 1000.0, 10.0)),
        objective="throughput",
        best="seqs64",
    )
    lines = screen(record).splitlines()
    header = next(ln for ln in lines if "predicted tok/s" in ln)
    assert "measured tok/s" not in header  # the objective column is the measured tok/s
    assert header.index("throughput") < header.index("predicted tok/s") < header.index("rate")
    [row] = [ln for ln in lines if ln.startswith("0  seqs64")]
    assert "4,413" in row and "8,826" in row


@pytest.mark.parametrize("width", [80, 100, 120])
def test_names_are_never_cut_with_the_new_columns(width):
    rec = load_record(SAMPLE)
    long = replace(rec.trials[2], name="seqs256-mbt16384-gmu0.95-kvfp8-cp1-pc1-bs32-qawq", number=8)
    record = replace(rec, trials=tuple(with_regime(t) for t in (*rec.trials, long)))
    text = screen(record, width=width)
    assert "…" not in text
    for t in record.trials:
        assert t.name in text, t.name
    lines = text.splitlines()
    assert all(len(ln) <= width for ln in lines)
    if width == 80:  # too narrow for one table: the predictions get their own
        assert "Predicted beside measured" in text
        assert sum("seqs256-mbt16384-kvfp8 *" in ln for ln in lines) == 1


def test_the_progress_line_writes_the_objective_as_the_table_does():
    from tuner.cli.progress import SearchProgress

    buf = StringIO()
    progress = SearchProgress(Console(width=100, file=buf))
    progress.on_trial_end(replace(trial("seqs64", 13856.0, 9.3), number=0))
    assert "trial 0 seqs64: complete, objective 13,856\n" in buf.getvalue()
    runs = [{"value": 13500.0, "in_trial": True}, {"value": 12999.6, "in_trial": True}]
    progress.on_trial_end(replace(trial("seqs64", 13856.0, 9.3), number=1, in_trial_runs=runs))
    assert "trial 1 seqs64: complete, objective 13,856; re-run in its launch: 13,500, 13,000" in (
        buf.getvalue()
    )
