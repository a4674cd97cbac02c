"""Online calibration in the search: fit inputs from trial records, re-prediction equal to the
plan's with the plan's constants, re-ordering, the ``calibrated`` rule, the record's block,
and ``vtune estimate --calibration``."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from tuner.analytic import calibrate as calibrate_mod
from tuner.analytic.calibrate import predict_point, prefix_fit
from tuner.analytic.estimate import Efficiency, ServingConfig, estimate
from tuner.cli import cli
from tuner.plan.prune import Planned, Target, Variant, feasible_concurrency, plan
from tuner.plan.space import Space
from tuner.search import fleet_run
from tuner.search.analytic_queue import AnalyticQueue
from tuner.search.calibration import (
    RULE_CALIBRATED,
    OnlineCalibration,
    peak_figures,
    point_batch,
    rescaled,
    step_model,
    trial_points,
)
from tuner.search.record import STATE_COMPLETE, SearchRecord, TrialRecord
from tuner.search.record_parts import CalibrationInfo, GpuInfo
from tuner.search.runner import Search, SearchSettings, TrialStore, make_sampler, queue_all
from tuner.search.storage import journal_url
from tuner.search.study import open_study, storage_url
from tuner.search.workers import tell_record
from tuner.specs.gpu import get_gpu
from tuner.specs.model import load_model

SPEC = load_model("qwen2.5-0.5b")
# Long context on an H100: the plan's constants say memory-bound (fp8 KV halves the reads);
# the card of these tests is compute-bound, where fp8 KV buys nothing and batch wins.
H100 = Target(
    get_gpu("h100"), {"none": Variant("none", SPEC.name, SPEC)}, 16384, max_model_len=32768
)
H100_SPACE = Space({"max_num_seqs": (16, 32, 64, 128), "kv_cache_dtype": ("auto", "fp8")})
TRUTH = Efficiency(memory_bandwidth=0.7, compute=0.004, step_overhead_s=0.002)


def truth_of(planned: Planned, target: Target = H100, truth: Efficiency = TRUTH) -> float:
    model = step_model(planned.candidate.knobs(), "none", target)
    assert model is not None
    batch = feasible_concurrency(model.max_num_seqs, planned.max_concurrency)
    return predict_point(truth, model.point(batch))


def measured(
    planned: Planned, number: int, target: Target = H100, truth: Efficiency = TRUTH
) -> TrialRecord:
    """A complete trial whose load points (full, a quarter and a sixteenth of its batch)
    follow ``truth`` exactly; Little's law gives each point's batch back."""
    model = step_model(planned.candidate.knobs(), "none", target)
    assert model is not None
    full = feasible_concurrency(model.max_num_seqs, planned.max_concurrency)
    points = []
    for batch in (full, full / 4, full / 16):
        tokens = predict_point(truth, model.point(batch))
        summary = {"output_throughput": tokens, "request_throughput": 2.0}
        summary["mean_e2el_ms"] = 1000.0 * batch / 2.0
        points.append({"load": {"concurrency": None}, "summary": summary})
    return TrialRecord(
        planned.name,
        planned.candidate.knobs(),
        STATE_COMPLETE,
        objective=points[0]["summary"]["output_throughput"],
        number=number,
        baseline=planned.candidate.is_baseline,
        estimate=planned.estimate_json(),
        rate_search={"points": points},
    )


class TruthRunner:
    """Measures every candidate as the card of ``truth`` would."""

    def __init__(self, target: Target, truth: Efficiency) -> None:
        self.target, self.truth, self.measured = target, truth, []

    def measure(
        self, number: int, planned: Planned, variant: Variant, incumbent: float | None = None
    ) -> TrialRecord:
        self.measured.append(planned.name)
        return measured(planned, number, self.target, self.truth)

    def remeasure(self, record: TrialRecord, variant: Variant, repeats: int) -> list[float]:
        return [record.objective or 0.0] * repeats


def search(tmp_path: Path, target: Target, space: Space, runner: TruthRunner, **kw) -> Search:
    settings = SearchSettings(repeats=0, **kw)
    p = plan(space, target)
    sampler = make_sampler(settings, queue_all(p, settings))
    study = open_study(storage_url(None, tmp_path / "s.db"), "s", ["maximize"], sampler)
    return Search(study, p, space, target, runner, settings, TrialStore(tmp_path / "store"))


def test_with_the_plans_constants_the_prediction_is_the_plans() -> None:
    cal = OnlineCalibration(H100)
    for planned in plan(H100_SPACE, H100).all():
        assert cal.predict(planned) == pytest.approx(planned.predicted_tokens_per_s, rel=1e-9)


def test_the_step_model_is_the_estimators_ladder_for_any_constants() -> None:
    eff = Efficiency(0.3, 0.2, 0.01)
    cfg = ServingConfig(max_model_len=32768, context_len=16384, kv_cache_dtype="fp8")
    ladder = estimate(SPEC, H100.gpu, cfg, efficiency=eff, ladder=(1, 16, 256)).ladder
    model = step_model({"kv_cache_dtype": "fp8"}, "none", H100)
    assert model is not None
    for point in ladder:
        assert predict_point(eff, model.point(point.batch)) == pytest.approx(point.tokens_per_s)


def test_a_points_batch_is_littles_law_capped_at_max_num_seqs() -> None:
    point = {"summary": {"request_throughput": 4.0, "mean_e2el_ms": 2500.0}}
    assert point_batch(point, 64) == pytest.approx(10.0)
    assert point_batch(point, 8) == 8.0
    assert point_batch({"load": {"concurrency": 16}, "summary": {}}, 64) == 16.0
    assert point_batch({"summary": {}}, 64) is None


def test_only_complete_trials_with_output_give_points() -> None:
    p = plan(H100_SPACE, H100)
    record = measured(p.baseline, 0)
    assert len(trial_points(record, H100)) == 3
    assert trial_points(replace(record, state="failed"), H100) == []
    empty = replace(record, rate_search={"points": [{"summary": {"output_throughput": 0}}]})
    assert trial_points(empty, H100) == []


def test_refit_learns_the_card_and_reorders_the_untried() -> None:
    p = plan(H100_SPACE, H100)
    by_name = {x.name: x for x in p.all()}
    cal = OnlineCalibration(H100)
    prior_order = [x.name for x in cal.order(p.candidates)]
    assert prior_order[:2] == ["seqs128-kvfp8", "seqs64-kvfp8"]  # memory-bound: fp8 KV helps
    # One candidate's points are met as well by a slow memory as by slow compute; a second
    # candidate whose fp8 KV bought nothing settles it.
    cal.refit([measured(p.baseline, 0), measured(by_name["seqs128-kvfp8"], 1)])
    untried = [x for x in p.candidates if x.name != "seqs128-kvfp8"]
    ranked = cal.order(untried)
    assert ranked[0].name == "seqs128-kvauto"
    assert truth_of(ranked[0]) == pytest.approx(max(truth_of(x) for x in untried), rel=1e-6)
    for x in ranked:
        assert cal.predict(x) == pytest.approx(truth_of(x), rel=0.05)


def test_the_search_measures_in_calibrated_order_and_records_it(tmp_path: Path) -> None:
    runner = TruthRunner(H100, TRUTH)
    result = search(tmp_path, H100, H100_SPACE, runner).run()
    assert runner.measured[0] == "vllm-defaults"
    assert set(runner.measured[1:3]) == {"seqs128-kvfp8", "seqs128-kvauto"}
    base = result.records["vllm-defaults"].estimate
    # Before any trial the calibrated prediction is the plan's; later ones are the card's.
    assert base["calibrated_tokens_per_s"] == pytest.approx(base["predicted_tokens_per_s"])
    later = result.records[runner.measured[2]]  # predicted from two trials
    assert later.estimate["calibrated_tokens_per_s"] == pytest.approx(later.objective, rel=0.05)
    assert later.estimate["measured_tokens_per_s"] == later.max_output_throughput
    info = result.calibration
    assert info is not None and info.points_used == 3 * len(runner.measured)
    assert info.mape_before is not None and info.mape_after is not None
    # Unseen trials include the second, predicted from the baseline alone (ambiguous).
    assert info.mape_after < info.mape_before / 5
    assert info.fit_mape_after is not None and info.fit_mape_after < 1
    assert info.factors["compute"] == pytest.approx(TRUTH.compute, rel=0.1)


CPU = Target(get_gpu("cpu"), {"none": Variant("none", SPEC.name, SPEC)}, 512, max_model_len=2048)
SLOW = Efficiency(memory_bandwidth=0.5, compute=0.5, step_overhead_s=0.05)  # overhead-bound


def test_hopeless_candidates_are_pruned_with_the_reason(tmp_path: Path) -> None:
    runner = TruthRunner(CPU, SLOW)
    space = Space({"max_num_seqs": (1, 2, 64, 96)})
    result = search(tmp_path, CPU, space, runner).run()
    pruned = {p.candidate.name: p for p in result.sampled_pruned if p.rule == RULE_CALIBRATED}
    assert set(pruned) == {"seqs1", "seqs2"}
    assert "seqs1" not in runner.measured and "seqs2" not in runner.measured
    assert "calibrated capacity" in pruned["seqs1"].reason
    assert "measured" in pruned["seqs1"].reason
    # A grid the user asked for (--sampler grid) measures every candidate all the same.
    asked = TruthRunner(CPU, SLOW)
    result = search(tmp_path / "grid", CPU, space, asked, sampler="grid").run()
    assert not [p for p in result.sampled_pruned if p.rule == RULE_CALIBRATED]
    assert sorted(asked.measured) == sorted(p.name for p in plan(space, CPU).all())


def test_pruning_waits_for_two_trials_and_never_judges_latency() -> None:
    p = plan(Space({"max_num_seqs": (1, 64, 96)}), CPU)
    by_name = {x.name: x for x in p.all()}
    one = measured(p.baseline, 0, CPU, SLOW)
    cal = OnlineCalibration(CPU)
    cal.refit([one])
    assert cal.current.points_used == 3 and cal.prune(by_name["seqs1"], one) is None
    two = measured(by_name["seqs96"], 1, CPU, SLOW)
    cal.refit([one, two])
    assert len(cal.unseen_errors) == 3  # two's points, scored by the fit to one alone
    verdict = cal.prune(by_name["seqs1"], one)
    assert verdict is not None and verdict.rule == RULE_CALIBRATED
    latency = OnlineCalibration(CPU, objective="latency")
    latency.refit([one, two])
    assert latency.prune(by_name["seqs1"], one) is None


def test_the_queue_hands_out_baseline_then_distinct_picks_then_stops() -> None:
    space = Space({"max_num_seqs": (16, 64), "max_num_batched_tokens": (4096, 8192)})
    p = plan(space, CPU)
    no_pruning = OnlineCalibration(CPU, objective="goodput")
    queue = AnalyticQueue(p.baseline, p.candidates, 2, no_pruning)
    done: dict[str, TrialRecord] = {}
    handed = []
    for number in range(4):
        pick = queue.next(done)
        if not pick:
            break
        handed.append(pick[0].name)
        done[pick[0].name] = measured(pick[0], number, CPU, SLOW)
    assert handed[0] == "vllm-defaults" and len(handed) == 3
    assert {n.split("-")[0] for n in handed[1:]} == {"seqs64", "seqs16"}  # no tie twice


def test_the_record_keeps_the_block_and_reads_it_back() -> None:
    info = CalibrationInfo(
        factors={"memory_bandwidth": 0.5, "compute": 0.2, "step_overhead_s": 0.003},
        peaks={"memory_bandwidth": 3.35e12, "bf16": 989e12},
        fitted=("step_overhead_s",),
        points_used=4,
        trials_used=2,
        mape_before=80.0,
        mape_after=12.5,
    )
    record = SearchRecord(gpu=GpuInfo(name="h100"), calibration=info)
    again = SearchRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again.calibration == info
    assert "calibration" not in SearchRecord().to_json()
    assert SearchRecord.from_json(SearchRecord().to_json()).calibration is None


def test_factors_keep_their_absolute_figures_on_other_peaks() -> None:
    gpu = get_gpu("h100")
    probed = {"memory_bandwidth": gpu.memory_bandwidth / 2, "bf16": gpu.peak_flops["bf16"] * 2}
    eff = rescaled(Efficiency(0.8, 0.3, 0.004), probed, gpu)
    assert eff == Efficiency(pytest.approx(0.4), pytest.approx(0.6), 0.004)


def write_record(path: Path, calibration: CalibrationInfo | None, gpu: str = "h100") -> Path:
    record = SearchRecord(gpu=GpuInfo(name=gpu), calibration=calibration)
    path.write_text(json.dumps(record.to_json()))
    return path


FACTORS = {"memory_bandwidth": 0.35, "compute": 0.25, "step_overhead_s": 0.004}
H100_PEAKS = peak_figures(get_gpu("h100"))  # the search ran on the datasheet's peaks


def estimate_cli(*args: str) -> object:
    base = ["estimate", "--model", "qwen2.5-0.5b", "--gpu", "h100", "--datasheet"]
    return CliRunner().invoke(cli, [*base, "--max-model-len", "4096", *args])


def test_estimate_applies_a_records_calibration(tmp_path: Path) -> None:
    info = CalibrationInfo(factors=FACTORS, peaks=H100_PEAKS, points_used=9, mape_after=11.0)
    path = write_record(tmp_path / "rec.json", info)
    result = estimate_cli("--json", "--calibration", str(path))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["calibration"]["record"] == str(path)
    assert data["calibration"]["factors"] == pytest.approx(FACTORS)
    cfg = ServingConfig(max_model_len=4096)
    want = estimate(SPEC, get_gpu("h100"), cfg, efficiency=Efficiency(**FACTORS))
    got = [p["tokens_per_s"] for p in data["ladder"]]
    assert got == pytest.approx([p.tokens_per_s for p in want.ladder])
    closed = data["calibration"]["closed_loop"]  # max_num_seqs (vLLM's 1024 here), KV-capped
    batch = feasible_concurrency(data["max_num_seqs"], data["max_concurrency"])
    at = estimate(SPEC, get_gpu("h100"), cfg, efficiency=Efficiency(**FACTORS), ladder=(batch,))
    assert closed == {"batch": batch, "tokens_per_s": pytest.approx(at.ladder[0].tokens_per_s)}
    plain = json.loads(estimate_cli("--json").output)
    assert plain["ladder"][0]["tokens_per_s"] != pytest.approx(got[0])
    assert "calibration" not in plain
    table = estimate_cli("--calibration", str(path))
    assert table.exit_code == 0 and "Calibrated from" in table.output
    assert f"closed loop at {batch} sequences" in table.output


@pytest.mark.parametrize(
    ("calibration", "gpu", "needle"),
    [(None, "h100", "no calibration block"), ("yes", "a100-80gb", "calibrated on a100-80gb")],
)
def test_estimate_refuses_a_record_it_cannot_use_in_one_line(
    tmp_path: Path, calibration: str | None, gpu: str, needle: str
) -> None:
    info = CalibrationInfo(factors=FACTORS, peaks=H100_PEAKS) if calibration else None
    path = write_record(tmp_path / "rec.json", info, gpu)
    result = estimate_cli("--calibration", str(path))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output


def counting_fits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Empties the prefix fits kept so far; the list grows by one per prefix fitted."""
    calls: list[int] = []
    real = calibrate_mod.fit
    monkeypatch.setattr(calibrate_mod, "fit", lambda *a, **k: calls.append(1) or real(*a, **k))
    prefix_fit.cache_clear()
    return calls


def test_the_unseen_errors_keep_each_prefix_fit_and_a_worker_writes_no_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = [measured(x, i) for i, x in enumerate(plan(H100_SPACE, H100).all())]
    assert len(records) >= 6
    expected = OnlineCalibration(H100).info(records)
    assert expected is not None and expected.mape_after is not None
    assert OnlineCalibration(H100, summary=False).info(records) is None  # a fleet's worker

    calls = counting_fits(monkeypatch)
    cal = OnlineCalibration(H100)
    cal.unseen_mape(records[:4])  # trials 1-3, each predicted by the fit to those before it
    assert len(calls) == 3
    cal.unseen_mape(reversed(records[:4]))  # the trials' order is their numbers', kept
    assert len(calls) == 3
    assert cal.info(records) == expected  # the same block; only the new prefixes fitted
    assert len(calls) == len(records) - 1


def test_a_fleets_parent_fits_the_finished_trials_while_the_workers_measure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tuner.search.fleet_run.Warmup on a real journal study: once a trial has finished it
    imports the final run's modules, then fits the prefixes of what finished; the final run's
    calibration block then costs no prefix fit."""
    records = [measured(x, i) for i, x in enumerate(plan(H100_SPACE, H100).all())]
    expected_before, expected_after = OnlineCalibration(H100).unseen_mape(records)
    study = open_study(journal_url(tmp_path / "s.journal"), "s", ["maximize"], None)
    prep = SimpleNamespace(target=H100, config=SimpleNamespace(settings=SearchSettings()))
    monkeypatch.setattr(fleet_run, "WARMUP_S", 0.05)
    calls = counting_fits(monkeypatch)
    imported = threading.Event()
    warmup = fleet_run.Warmup(prep, study, imported.set)  # type: ignore[arg-type]
    warmup.start()
    try:
        time.sleep(0.3)
        assert not imported.is_set() and not calls  # nothing finished: the workers start

        def finish(batch: list[TrialRecord]) -> None:
            for record in batch:
                tell_record(study, study.ask(), record, record.objective)
            deadline = time.monotonic() + 30
            while len(calls) < batch[-1].number and time.monotonic() < deadline:
                time.sleep(0.05)

        finish(records[:3])
        assert imported.is_set() and len(calls) == 2
        finish(records[3:])
        assert len(calls) == len(records) - 1
    finally:
        warmup.done.set()
        warmup.join(timeout=30)
    assert not warmup.is_alive()
    before = len(calls)
    assert OnlineCalibration(H100).unseen_mape(records) == (expected_before, expected_after)
    assert len(calls) == before  # every prefix was fitted while the workers measured
