"""The max_num_seqs screen: relaunch groups, the ladder capped by the KV cache, the screened
value and the ``screened`` rule, the order it gives, Spearman's rank correlation, the record's
``screen`` block, and a search with a fake runner that screens (once, resumable)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuner.engine.settings import EngineSettings
from tuner.measure.ratesearch import RatePoint, RateSearchConfig
from tuner.measure.session import ServerDied
from tuner.plan.prune import Planned, Target, Variant, plan
from tuner.plan.space import Candidate, Space
from tuner.search import screen_run
from tuner.search.record import STATE_COMPLETE, SearchRecord, TrialRecord
from tuner.search.record_parts import ScreenInfo, ScreenResult
from tuner.search.runner import Search, SearchSettings, TrialStore, make_sampler, queue_all
from tuner.search.screen import (
    RULE_SCREENED,
    concurrency,
    relaunch_groups,
    relaunch_key,
    screen_values,
    screened_group,
)
from tuner.search.screen_run import (
    ScreenFailed,
    ScreenMeasured,
    ScreenPoint,
    ScreenRun,
    faithfulness,
    probe_capacity,
    spearman,
    vllm_screen,
)
from tuner.search.study import finished_records, open_study, storage_url
from tuner.specs.gpu import get_gpu
from tuner.specs.model import load_model

SPEC = load_model("qwen2.5-0.5b")


def cpu_target(kv_bytes: int | None = None) -> Target:
    """vLLM CPU (defaults: max_num_seqs 128, max_num_batched_tokens 2048); 170 sequences of
    the workload's 512 tokens fit, unless ``kv_bytes`` fixes a smaller pool."""
    return Target(
        get_gpu("cpu"),
        {"none": Variant("none", SPEC.name, SPEC)},
        context_len=512,
        max_model_len=2048,
        kv_cache_memory_bytes=kv_bytes,
    )


def tokens(conc: int) -> float:
    """The fake card: output tokens/s rise with the batch up to 32, then barely."""
    return 100.0 * conc if conc <= 32 else 3200.0 + 2.0 * (conc - 32)


SLO_LIMIT = 32  # the SLO holds up to 32 requests in flight


class ScreeningRunner:
    """Measures as the fake card would; ``screen`` gives one closed-loop point per distinct
    concurrency of the group (largest first). A real launch's probe reads 5 % above the
    screen's figure (``real_bias``); the objective is the capacity where the SLO holds at it,
    else 90 % of the capacity at 32 in flight (a larger max_num_seqs under the SLO at a lower
    rate does a little worse than the largest that holds it at saturation)."""

    def __init__(self, target: Target, real_bias: float = 0.05) -> None:
        self.target, self.real_bias = target, real_bias
        self.measured: list[str] = []
        self.screens: list[list[str]] = []

    def engine_settings(self, cand: Candidate, variant: Variant) -> EngineSettings:
        return EngineSettings.from_mapping(variant.model, cand.knobs())

    def measure(self, number: int, planned: Planned, variant: Variant, **_: object) -> TrialRecord:
        self.measured.append(planned.name)
        conc = concurrency(planned, self.target)
        capacity = tokens(conc) * (1 + self.real_bias)
        objective = capacity if conc <= SLO_LIMIT else 0.9 * tokens(SLO_LIMIT)
        probe = {"load": {"rate": None, "concurrency": conc}, "summary": {}}
        probe["summary"] = {"output_throughput": capacity, "request_throughput": conc / 10}
        return TrialRecord(
            planned.name,
            planned.candidate.knobs(),
            STATE_COMPLETE,
            objective=objective,
            number=number,
            baseline=planned.candidate.is_baseline,
            estimate=planned.estimate_json(),
            rate_search={"best_index": 0, "points": [probe]},
            engine_time_s=10.0,
        )

    def remeasure(self, record: TrialRecord, variant: Variant, repeats: int) -> list[float]:
        return [record.objective or 0.0] * repeats

    def screen(self, group: list[Planned], variant: Variant) -> list[ScreenPoint]:
        self.screens.append([p.name for p in group])
        ladder = sorted({concurrency(p, self.target) for p in group}, reverse=True)
        return [
            ScreenPoint(c, tokens(c), c / 10, 100.0, 20.0, c <= SLO_LIMIT, completed=50)
            for c in ladder
        ]


def search(tmp_path: Path, space: Space, runner: ScreeningRunner, **kw: object) -> Search:
    settings = SearchSettings(repeats=0, **kw)  # type: ignore[arg-type]
    target = runner.target
    p = plan(space, target)
    sampler = make_sampler(settings, queue_all(p, settings))
    study = open_study(storage_url(None, tmp_path / "study.db"), "s", ["maximize"], sampler)
    return Search(study, p, space, target, runner, settings, TrialStore(tmp_path / "store"))


LADDER = Space({"max_num_seqs": (4, 8, 16, 32, 64, 256)})


# --- groups and the ladder ------------------------------------------------------------------------


def test_relaunch_groups_are_every_knob_but_max_num_seqs() -> None:
    target = cpu_target()
    space = Space(
        {
            "max_num_seqs": (4, 16, 64, 256),
            "max_num_batched_tokens": (1024, 2048),
            "enable_prefix_caching": (True, False),
        }
    )
    p = plan(space, target)
    groups = relaunch_groups(p.all(), target)
    assert len(groups) == 4  # 2 token budgets x prefix caching on/off
    for group in groups:
        rest = {m.name.split("-", 1)[1] for m in group.members if not m.candidate.is_baseline}
        assert len(rest) == 1  # the members differ in max_num_seqs only
    # vLLM's defaults on CPU are 2048 batched tokens with prefix caching: the baseline's group.
    home = screened_group(p, target)
    assert home is not None
    assert [m.name for m in home.members] == [
        "seqs170-mbt2048-pc1",  # 256 capped to the 170 sequences that fit
        "vllm-defaults",
        "seqs64-mbt2048-pc1",
        "seqs16-mbt2048-pc1",
        "seqs4-mbt2048-pc1",
    ]
    assert home.launch.name == "seqs170-mbt2048-pc1"  # the largest max_num_seqs
    assert home.ladder == (170, 128, 64, 16, 4)  # largest first
    by_name = {x.name: x for x in p.all()}
    one, other = by_name["seqs4-mbt1024-pc1"], by_name["seqs64-mbt1024-pc1"]
    assert relaunch_key(one, target) == relaunch_key(other, target)
    assert relaunch_key(one, target) != relaunch_key(by_name["seqs4-mbt1024-pc0"], target)


def test_the_ladder_is_capped_by_what_the_kv_cache_holds() -> None:
    target = cpu_target(kv_bytes=200 * 2**20)  # 33 sequences of 512 tokens
    p = plan(Space({"max_num_seqs": (4, 16, 64, 256)}), target)
    group = screened_group(p, target)
    assert group is not None
    assert all(c <= 33 for c in group.concurrencies)
    assert group.ladder == (33, 16, 4)
    # vLLM's defaults (128) are the largest max_num_seqs: that launch holds every rung.
    assert group.launch.name == "vllm-defaults"
    assert concurrency(p.baseline, target) == 33


def test_no_group_with_three_rungs_means_no_screen() -> None:
    target = cpu_target()
    p = plan(Space({"max_num_seqs": (4, 16), "max_num_batched_tokens": (1024, 4096)}), target)
    assert screened_group(p, target) is None


class PointRunner:
    """The parts of ``VllmTrialRunner`` a screen uses; ``_point`` records what it was asked
    and dies (ServerDied) at the ``die_at``-th point."""

    def __init__(self, tmp_path: Path, target: Target, die_at: int | None = None) -> None:
        self.setup = SimpleNamespace(
            log_dir=tmp_path, launch=None, rate=RateSearchConfig(1, seconds_per_point=2.0)
        )
        self.target, self.die_at = target, die_at
        self.calls: list[tuple[int | None, int, int, float | None]] = []

    def engine_settings(self, cand: Candidate, variant: Variant) -> str:
        return cand.name

    def _concurrency(self, planned: Planned) -> int:
        return concurrency(planned, self.target)

    async def _point(self, server, name, load, warmup, offset, stop) -> RatePoint:  # type: ignore[no-untyped-def]
        self.calls.append((load.concurrency, warmup, offset, load.duration_s))
        if self.die_at is not None and len(self.calls) == self.die_at:
            raise ServerDied(None)
        figures = {"output_throughput": 10.0 * (load.concurrency or 0), "p95_ttft_ms": 5.0}
        summary = SimpleNamespace(completed=9, failed=0, to_json=lambda: figures)
        return RatePoint(load, summary, True)  # type: ignore[arg-type]


def test_the_vllm_screen_is_one_launch_largest_first(tmp_path: Path, monkeypatch) -> None:
    launches: list[tuple[str, Path]] = []

    @contextlib.contextmanager
    def launched(settings, launch, log_path):  # type: ignore[no-untyped-def]
        launches.append((settings, log_path))
        yield SimpleNamespace()

    monkeypatch.setattr(screen_run, "launched", launched)
    monkeypatch.setattr(screen_run, "run_watched", lambda s, work: asyncio.run(work(None)))
    target = cpu_target()
    group = screened_group(plan(Space({"max_num_seqs": (4, 16, 64)}), target), target)
    assert group is not None
    variant = target.variants["none"]
    runner = PointRunner(tmp_path, target)
    got = vllm_screen(runner, group.members, variant)
    points = got.points
    assert got.trial is None  # this runner cannot run a trial in the launch
    assert launches == [("vllm-defaults", tmp_path / "screen-vllm-defaults.log")]
    assert [p.concurrency for p in points] == [128, 64, 16, 4]
    assert points[0].output_throughput == 1280.0 and points[0].p95_ttft_ms == 5.0
    # Closed loops of 2 s, the warm-up on the first only, each its own slice of the pool.
    assert runner.calls == [
        (128, 4, 0, 2.0),
        (64, 0, 260, 2.0),
        (16, 0, 388, 2.0),
        (4, 0, 420, 2.0),
    ]
    dying = PointRunner(tmp_path, target, die_at=2)
    with pytest.raises(ScreenFailed, match="vllm-defaults died") as failed:
        vllm_screen(dying, group.members, variant)
    assert [p.concurrency for p in failed.value.points] == [128]  # what came before is kept


# --- values, the rule, the order -----------------------------------------------------------------


def test_screened_value_is_the_capacity_where_the_slo_held_else_the_best_below() -> None:
    results = [
        ScreenResult("a", 256, 256, 3000.0, slo_met=False),
        ScreenResult("b", 64, 64, 2500.0, slo_met=True),
        ScreenResult("c", 16, 16, 1200.0, slo_met=True),
        ScreenResult("d", 8, 8, 100.0, slo_met=False),
    ]
    values = {r.name: r.value for r in screen_values(results)}
    assert values == {"a": 2500.0, "b": 2500.0, "c": 1200.0, "d": 0.0}
    # No point met the SLO: the capacity is all there is to rank by.
    none = [ScreenResult("a", 8, 8, 300.0), ScreenResult("b", 4, 4, 200.0)]
    assert [r.value for r in screen_values(none)] == [300.0, 200.0]


def test_a_search_screens_once_prunes_the_losers_and_records_it(tmp_path: Path) -> None:
    runner = ScreeningRunner(cpu_target())
    s = search(tmp_path, LADDER, runner, budget=4, sampler="tpe")
    result = s.run()
    assert len(runner.screens) == 1
    assert runner.screens[0][0] == "seqs170"  # launched at the group's largest max_num_seqs
    # 400, 800, 1600 tok/s (+15 %) cannot reach 3200 under the SLO at 32 in flight.
    screened = {p.candidate.name: p for p in result.sampled_pruned if p.rule == RULE_SCREENED}
    assert set(screened) == {"seqs4", "seqs8", "seqs16"}
    assert "screened capacity 1,600 tok/s at 16 in flight (+15%: 1,840) < seqs32's 3,200" in (
        screened["seqs16"].reason
    )
    assert not set(screened) & set(runner.measured)  # never launched
    # Equal screened values (3,200): the one that met the SLO first, then the others from the
    # boundary up.
    assert runner.measured == ["vllm-defaults", "seqs32", "seqs64", "seqs170"]
    info = result.screen
    assert info is not None
    assert info.launch == "seqs170" and info.launch_max_num_seqs == 170
    assert set(info.pruned) == set(screened) and info.failure is None
    assert [r.concurrency for r in info.results] == [170, 128, 64, 32, 16, 8, 4]
    # Every launched candidate is compared: the real probe reads 5 % above the screen.
    assert info.compared == 4
    assert info.spearman_capacity == 1.0
    assert info.capacity_mape == pytest.approx(100 * (1 - 1 / 1.05), abs=0.01)
    assert info.capacity_bias == pytest.approx(-100 * (1 - 1 / 1.05), abs=0.01)
    # The record carries the block, and reads it back.
    record = SearchRecord(screen=info)
    data = record.to_json()
    assert data["screen"]["pruned"] == list(info.pruned)
    assert SearchRecord.from_json(data).screen == info


def test_a_resumed_search_reuses_the_screen(tmp_path: Path) -> None:
    first = ScreeningRunner(cpu_target())
    search(tmp_path, LADDER, first, budget=2, sampler="tpe").run()
    assert len(first.screens) == 1 and first.measured == ["vllm-defaults", "seqs32"]
    again = ScreeningRunner(cpu_target())
    result = search(tmp_path, LADDER, again, budget=4, sampler="tpe").run()
    assert again.screens == []  # read back, not measured twice
    assert again.measured == ["seqs64", "seqs170"]
    assert result.screen is not None and set(result.screen.pruned) == {"seqs4", "seqs8", "seqs16"}


class LaunchTrialRunner(ScreeningRunner):
    """A ScreeningRunner whose screen also runs its launched candidate's trial (4 s)."""

    def screen(self, group: list[Planned], variant: Variant) -> ScreenMeasured:
        points = super().screen(group, variant)
        trial = super().measure(-1, group[0], variant)
        self.measured.pop()  # measured in the screen's launch, not launched for it
        return ScreenMeasured(points, replace(trial, engine_time_s=4.0))


def test_the_trial_run_in_the_screens_launch_is_recorded_not_relaunched(tmp_path: Path) -> None:
    runner = LaunchTrialRunner(cpu_target())
    s = search(tmp_path, LADDER, runner, budget=4, sampler="tpe")
    result = s.run()
    assert len(runner.screens) == 1 and "seqs170" not in runner.measured
    record = result.records["seqs170"]
    assert record.state == STATE_COMPLETE and record.number is not None and record.number > 0
    assert record.engine_time_s == 4.0
    # It comes first after the screen and counts in the budget (the baseline, it, two more).
    assert runner.measured == ["vllm-defaults", "seqs32", "seqs64"]
    assert "seqs170" in finished_records(s.study)  # an Optuna trial like any other
    # A resumed search reads it back with the screen: nothing is measured again.
    again = LaunchTrialRunner(cpu_target())
    search(tmp_path, LADDER, again, budget=4, sampler="tpe").run()
    assert again.measured == [] and again.screens == []


def test_a_grid_does_not_screen_unless_asked(tmp_path: Path) -> None:
    space = Space({"max_num_seqs": (4, 16, 64)})
    runner = ScreeningRunner(cpu_target())
    result = search(tmp_path / "grid", space, runner).run()
    assert runner.screens == [] and result.screen is None
    assert not [p for p in result.sampled_pruned if p.rule == RULE_SCREENED]
    asked = ScreeningRunner(cpu_target())
    result = search(tmp_path / "asked", space, asked, screen=True).run()
    assert len(asked.screens) == 1 and result.screen is not None
    assert result.screen.pruned == ("seqs4",)  # 400 tok/s (+15 %) < 1,600 at 16 in flight
    assert "seqs4" not in asked.measured
    off = ScreeningRunner(cpu_target())
    search(tmp_path / "off", space, off, budget=2, sampler="tpe", screen=False).run()
    assert off.screens == []


@pytest.mark.parametrize("kw", [{"objective": "goodput"}, {"pareto": True}])
def test_only_the_throughput_objective_is_screened(tmp_path: Path, kw: dict) -> None:
    runner = ScreeningRunner(cpu_target())
    s = search(tmp_path, LADDER, runner, budget=3, sampler="tpe", **kw)
    assert not s.screen.enabled(grid=False)


def test_other_groups_are_ordered_by_prediction_times_the_screen_ratio(tmp_path: Path) -> None:
    space = Space({"max_num_seqs": (4, 16, 64, 256), "max_num_batched_tokens": (1024, 2048)})
    runner = ScreeningRunner(cpu_target())
    s = search(tmp_path, space, runner, budget=2, sampler="tpe")
    result = s.run()
    assert runner.screens[0][0] == "seqs170-mbt2048"  # the baseline's group (2048 tokens)
    assert runner.measured == ["vllm-defaults", "seqs16-mbt2048"]  # met the SLO at 1,600
    pruned = {p.candidate.name for p in result.sampled_pruned if p.rule == RULE_SCREENED}
    assert pruned == {"seqs4-mbt2048"}  # 400 tok/s; other groups are never pruned by it
    untried = [p for p in s.plan.candidates if p.name not in result.records]
    order = [p.name for p in s.screen.order(untried)]
    # Values: 16 in flight met the SLO (1,600); 64 and 170 did not, so 1,600 too (the best
    # below); the 1024-token group's are the model's, scaled by the screen's ratio at the
    # nearest rung: its model ties with the screened group's, so the measured come first,
    # from the boundary up.
    assert order[:2] == ["seqs64-mbt2048", "seqs170-mbt2048"]
    assert set(order[2:5]) == {"seqs170-mbt1024", "seqs64-mbt1024", "seqs16-mbt1024"}
    assert order[-2:] == ["seqs4-mbt2048", "seqs4-mbt1024"]  # 400: measured, then not
    ratio = s.screen._extrapolated(next(p for p in untried if p.name == "seqs4-mbt1024"))
    assert ratio == pytest.approx(400.0)  # the screened value at 4 in flight


# --- faithfulness -------------------------------------------------------------------------------


def test_spearman_on_known_inputs() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Tied values share their mean rank: ranks of y are 1, 2, 3.5, 5, 3.5.
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [5, 5, 5]) is None  # one side constant: undefined
    assert spearman([1], [2]) is None


def test_faithfulness_compares_screened_with_real() -> None:
    results = [
        ScreenResult("a", 64, 64, 1000.0, value=900.0, real_capacity=1250.0, real_objective=800),
        ScreenResult("b", 32, 32, 800.0, value=800.0, real_capacity=1000.0, real_objective=950),
        ScreenResult("c", 16, 16, 400.0, value=400.0, real_capacity=500.0, real_objective=300),
        ScreenResult("d", 8, 8, 200.0, value=200.0),  # never launched for real
    ]
    figures = faithfulness(results)
    assert figures["compared"] == 3
    assert figures["spearman_capacity"] == 1.0
    assert figures["spearman_objective"] == 0.5
    assert figures["capacity_mape"] == 20.0 and figures["capacity_bias"] == -20.0
    assert faithfulness(results[:1])["spearman_capacity"] is None  # too few to rank


def test_probe_capacity_is_the_first_closed_loop_point() -> None:
    points = [
        {"load": {"rate": None, "concurrency": 8}, "summary": {"output_throughput": 640.0}},
        {"load": {"rate": 2.0, "concurrency": None}, "summary": {"output_throughput": 90.0}},
    ]
    record = TrialRecord("x", {}, STATE_COMPLETE, rate_search={"points": points[::-1]})
    assert probe_capacity(record) == 640.0
    assert probe_capacity(None) is None


class TrialPointRunner(PointRunner):
    """A PointRunner that also runs the launched candidate's trial in the screen's launch."""

    def __init__(self, tmp_path: Path, target: Target) -> None:
        super().__init__(tmp_path, target)
        self.trials: list[tuple[str, int]] = []

    async def trial_in_launch(self, server, planned, variant, stop, offset) -> TrialRecord:  # type: ignore[no-untyped-def]
        self.trials.append((planned.name, offset))
        knobs = planned.candidate.knobs()
        return TrialRecord(planned.name, knobs, STATE_COMPLETE, objective=7.0, engine_time_s=3.0)


def test_the_screens_launch_runs_the_launched_candidates_trial_after_the_rungs(
    tmp_path: Path, monkeypatch
) -> None:
    @contextlib.contextmanager
    def launched(settings, launch, log_path):  # type: ignore[no-untyped-def]
        yield SimpleNamespace()

    monkeypatch.setattr(screen_run, "launched", launched)
    monkeypatch.setattr(screen_run, "run_watched", lambda s, work: asyncio.run(work(None)))
    target = cpu_target()
    group = screened_group(plan(Space({"max_num_seqs": (4, 16, 256)}), target), target)
    assert group is not None and group.launch.name == "seqs170"  # 256 capped by the KV cache
    runner = TrialPointRunner(tmp_path, target)
    got = vllm_screen(runner, group.members, target.variants["none"])
    assert [p.concurrency for p in got.points] == [170, 128, 16, 4]
    # After the rungs, past the requests they sent (the last rung's offset + its requests).
    last = runner.calls[-1][2] + max(runner.setup.rate.min_requests, 2 * 4)
    assert runner.trials == [("seqs170", last)] and last > 340 + 256 + 32
    assert got.trial is not None and got.trial.objective == 7.0
    assert vllm_screen(runner, group.members, target.variants["none"], trial=False).trial is None


def test_a_saved_screen_is_read_back_only_for_the_same_ladder(tmp_path: Path) -> None:
    run = ScreenRun("seqs64", (64, 16), (ScreenPoint(64, 10.0, 1.0, 5.0, 2.0, True, 9),), 42.0)
    run.save(tmp_path)
    assert ScreenRun.load(tmp_path, "seqs64", (64, 16)) == run
    assert ScreenRun.load(tmp_path, "seqs64", (64, 16, 4)) is None
    assert ScreenRun.load(tmp_path, "seqs128", (64, 16)) is None


def test_the_screen_block_reads_back_leniently() -> None:
    info = ScreenInfo(
        "seqs64",
        64,
        engine_time_s=12.5,
        results=(ScreenResult("seqs64", 64, 64, 10.0, 1.0, 5.0, 2.0, True, 10.0),),
        pruned=("seqs4",),
        compared=1,
        capacity_mape=3.5,
    )
    assert ScreenInfo.from_json(info.to_json()) == info
    data = {**info.to_json(), "results": [{"name": "x"}, "junk"], "capacity_bias": "n/a"}
    back = ScreenInfo.from_json(data)
    assert back is not None and back.results == () and back.capacity_bias is None
    assert ScreenInfo.from_json({"results": []}) is None


# --- the benchmark's report, on a saved pair of records ---------------------------------------


def _trial(name: str, objective: float, conc: int, capacity: float) -> dict:
    probe = {"load": {"rate": None, "concurrency": conc}, "summary": {}}
    probe["summary"]["output_throughput"] = capacity
    return {
        "name": name,
        "knobs": {},
        "state": "complete",
        "objective": objective,
        "engine_time_s": 30.0,
        "rate_search": {"best_index": 0, "points": [probe]},
    }


def test_the_benchmark_compares_two_saved_records() -> None:
    from benchmarks.search_efficiency import compare, engine_time, report

    rungs = [("vllm-defaults", 128, 1000.0), ("seqs64", 64, 1050.0), ("seqs16", 16, 500.0)]
    rungs.append(("seqs4", 4, 150.0))
    grid = {
        "study": {"engine_time_s": 1000.0, "finalist_engine_time_s": 0.0},
        "trials": [
            _trial("vllm-defaults", 900.0, 128, 1000.0),
            _trial("seqs64", 1000.0, 64, 1100.0),
            _trial("seqs16", 500.0, 16, 520.0),
            _trial("seqs4", 150.0, 4, 160.0),
        ],
        "calibration": {"mape_before": 40.0, "mape_after": 12.5},
    }
    screen = ScreenInfo(
        "seqs64",
        64,
        engine_time_s=20.0,
        results=tuple(ScreenResult(n, c, c, cap, value=cap, slo_met=True) for n, c, cap in rungs),
        pruned=("seqs4",),
        compared=2,
        capacity_mape=4.0,
    )
    vt = {
        "study": {"engine_time_s": 120.0, "finalist_engine_time_s": 60.0},
        "best": "seqs16",
        "trials": [_trial("vllm-defaults", 880.0, 128, 990.0), _trial("seqs16", 510.0, 16, 530.0)],
        "calibration": {"mape_before": 35.0, "mape_after": None},
        "screen": screen.to_json(),
    }
    assert engine_time(vt) == 200.0  # trials, finalists and the screen
    c = compare(grid, vt)
    assert c.ratio == pytest.approx(0.2)
    assert c.vtune_parts == (120.0, 20.0, 60.0) and c.grid_parts == (1000.0, 0.0, 0.0)
    assert c.grid_best == "seqs64" and c.chosen == "seqs16"
    assert c.regret_by_grid == pytest.approx(0.5)
    assert c.measured == (4, 2)
    assert c.screen_own is not None and c.screen_own["capacity_mape"] == 4.0
    assert c.screen_grid is not None and c.screen_grid["compared"] == 4
    assert c.screen_grid["spearman_capacity"] == 1.0
    errors = [0.0, 1050 / 1100 - 1, 500 / 520 - 1, 150 / 160 - 1]
    assert c.screen_grid["capacity_mape"] == pytest.approx(100 * sum(map(abs, errors)) / 4, 0.01)
    text = "\n".join(report(c, (3600.0, None)))
    assert "engine-time ratio vtune/grid: 0.20" in text
    assert re.search(r"finalist relaunches +0 +60\n", text)
    assert "regret by the grid's single measurements: 50.0%" in text
    assert "calibration MAPE on unseen trials (grid): before 40.0%, after 12.5%" in text
    assert "calibration MAPE on unseen trials (vtune): before 35.0%, after n/a" in text
    assert "screen vs the grid (4 candidates): Spearman capacity 1.00" in text
    assert "reused" in text  # vtune's wall time: a reused record
    # A vtune record without a screen says so rather than failing.
    bare = compare(grid, {k: v for k, v in vt.items() if k != "screen"})
    assert "no screen in the vtune record" in "\n".join(report(bare))
