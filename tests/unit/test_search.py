"""The study loop with a fake runner: order, budget, resume, failures, finalists, noise."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuner.engine import interrupt
from tuner.engine.settings import EngineSettings
from tuner.errors import EnvironmentFailedError, Interrupted
from tuner.measure.ratesearch import EarlyStop
from tuner.plan.prune import Planned, Target, Variant, plan
from tuner.plan.space import Candidate, Space
from tuner.search import runner as runner_mod
from tuner.search.finalist_runs import contends
from tuner.search.record import (
    RULE_EARLY_STOP,
    STATE_COMPLETE,
    STATE_FAILED,
    STATE_PRUNED,
    Finalist,
    FinalistSample,
    TrialRecord,
)
from tuner.search.runner import Search, SearchSettings, TrialStore, make_sampler, queue_all
from tuner.search.stats import mean_ci, mean_interval
from tuner.search.study import finished_records, open_study, storage_url
from tuner.specs.gpu import get_gpu
from tuner.specs.model import load_model


class FakeRunner:
    """Objective = 100 x max_num_seqs (vLLM default 128 for the baseline); optional failures
    (``fail``: the candidate's OOM; ``env``: the environment's, a start-up timeout) and an
    optional interrupt after N trials (like Ctrl-C). ``early``: stop a trial whose capacity
    (its objective) cannot reach the incumbent, by the trial runner's rule (EarlyStop).
    Finalists: ``zero`` re-run at 0 (missed the SLO a step down too), ``step`` held only a step
    down (90 %); ``same``: these max_num_seqs have equal settings (one launch); every launch
    takes 100 s of ``now``. ``in_trial``: a contending trial (the trial runner's rule,
    :func:`contends`) re-runs its point this many times in its own launch (1 % lower each)."""

    def __init__(
        self,
        fail: set[int] = frozenset(),
        interrupt_after: int | None = None,
        noise: float = 0.0,
        env: set[int] = frozenset(),
        early: bool = False,
        zero: set[int] = frozenset(),
        step: set[int] = frozenset(),
        same: set[int] = frozenset(),
        in_trial: int = 0,
    ) -> None:
        self.in_trial = in_trial
        self.fail, self.interrupt_after, self.noise = fail, interrupt_after, noise
        self.env, self.early, self.zero, self.step, self.same = env, early, zero, step, same
        self.measured: list[str] = []
        self.remeasured: list[str] = []
        self.groups: list[list[str]] = []
        self.incumbents: list[float | None] = []
        self.now = 0.0

    def engine_settings(self, cand: Candidate, variant: Variant) -> EngineSettings:
        seqs = cand.max_num_seqs or 128
        values = {"max_num_seqs": 999} if seqs in self.same else cand.knobs()
        return EngineSettings.from_mapping(variant.model, values)

    def measure(
        self, number: int, planned: Planned, variant: Variant, incumbent: float | None = None
    ) -> TrialRecord:
        if self.interrupt_after is not None and len(self.measured) >= self.interrupt_after:
            raise KeyboardInterrupt
        cand = planned.candidate
        self.measured.append(planned.name)
        self.incumbents.append(incumbent)
        seqs = cand.max_num_seqs or 128
        probe = SimpleNamespace(output_throughput=100.0 * seqs, request_throughput=seqs / 10)
        rule = EarlyStop(incumbent) if incumbent is not None else None
        if self.early and rule is not None and rule.stops(probe):
            point = {"load": {"rate": None}, "summary": {"output_throughput": 100.0 * seqs}}
            return TrialRecord(
                planned.name,
                cand.knobs(),
                STATE_PRUNED,
                number=number,
                rate_search={"best_index": None, "points": [point], "stopped_early": True},
                failure={"rule": RULE_EARLY_STOP, "reason": rule.reason(probe)},
                engine_time_s=5.0,
            )
        if seqs in self.env:
            return TrialRecord(
                planned.name,
                cand.knobs(),
                STATE_FAILED,
                number=number,
                baseline=cand.is_baseline,
                failure={"class": "health_timeout", "message": "no /health answer within 5 s"},
                log_path=f"/logs/{number:03d}.log",
            )
        if seqs in self.fail:
            return TrialRecord(
                planned.name,
                cand.knobs(),
                STATE_FAILED,
                number=number,
                baseline=cand.is_baseline,
                failure={"class": "OOM", "message": "out of memory"},
            )
        value = 100.0 * seqs
        again = []
        if self.in_trial and contends(value, incumbent, 0.15):
            samples = (value * (1 - 0.01 * (i + 1)) for i in range(self.in_trial))
            again = [FinalistSample(v, None, seqs, in_trial=True).to_json() for v in samples]
        return TrialRecord(
            planned.name,
            cand.knobs(),
            STATE_COMPLETE,
            objective=value,
            number=number,
            baseline=cand.is_baseline,
            best={"output_throughput": value, "p95_tpot_ms": seqs / 10},
            in_trial_runs=again,
        )

    def remeasure(
        self, record: TrialRecord, variant: Variant, repeats: int
    ) -> list[float | FinalistSample]:
        self.remeasured.append(record.name)
        self.now += 100.0
        return self._samples(record, repeats)

    def remeasure_group(
        self, records: list[TrialRecord], variant: Variant, repeats: int
    ) -> dict[str, list[float | FinalistSample]]:
        self.groups.append([r.name for r in records])
        self.now += 100.0
        return {r.name: self._samples(r, repeats) for r in records}

    def _samples(self, record: TrialRecord, repeats: int) -> list[float | FinalistSample]:
        seqs = record.knobs.get("max_num_seqs") or 128
        value = record.objective or 0.0
        if seqs in self.zero:
            return [FinalistSample(0.0, 2.7, None, step_down=True)] * repeats
        if seqs in self.step:
            return [FinalistSample(0.9 * value, 2.7, None, step_down=True)] * repeats
        return [value * (1 + self.noise * (i + 1)) for i in range(repeats)]


def make(
    tmp_path: Path, seqs: tuple[int, ...] | Space, settings: SearchSettings, runner: FakeRunner
) -> Search:
    spec = load_model("qwen2.5-0.5b")
    target = Target(
        get_gpu("cpu"),
        {"none": Variant("none", spec.name, spec)},
        context_len=512,
        max_model_len=2048,
    )
    space = seqs if isinstance(seqs, Space) else Space({"max_num_seqs": seqs})
    p = plan(space, target)
    sampler = make_sampler(settings, queue_all(p, settings))
    study = open_study(storage_url(None, tmp_path / "study.db"), "s", ["maximize"], sampler)
    return Search(study, p, space, target, runner, settings, TrialStore(tmp_path / "store"))


def test_grid_runs_baseline_first_then_every_candidate(tmp_path: Path) -> None:
    runner = FakeRunner()
    result = make(tmp_path, (2, 8, 32), SearchSettings(repeats=0), runner).run()
    assert runner.measured[0] == "vllm-defaults"
    assert sorted(runner.measured[1:]) == ["seqs2", "seqs32", "seqs8"]
    assert result.best is not None and result.best.name == "vllm-defaults"  # 128 seqs wins
    assert result.baseline is not None and result.baseline.baseline


def test_budget_limits_measured_trials(tmp_path: Path) -> None:
    runner = FakeRunner()
    make(tmp_path, (2, 4, 8, 16, 32), SearchSettings(budget=3, repeats=0), runner).run()
    assert len(runner.measured) == 3


def test_failed_trial_is_recorded_and_search_goes_on(tmp_path: Path) -> None:
    runner = FakeRunner(fail={8})
    result = make(tmp_path, (2, 8, 32), SearchSettings(repeats=0), runner).run()
    assert result.records["seqs8"].state == STATE_FAILED
    assert result.records["seqs8"].failure["class"] == "OOM"
    assert len(runner.measured) == 4


def test_interrupted_search_resumes_without_repeating(tmp_path: Path) -> None:
    first = FakeRunner(interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, (2, 8, 32), SearchSettings(repeats=0), first).run()
    assert len(first.measured) == 2
    second = FakeRunner()
    result = make(tmp_path, (2, 8, 32), SearchSettings(repeats=0), second).run()
    assert not set(first.measured) & set(second.measured)
    assert len(second.measured) == 2
    assert set(result.records) == {"vllm-defaults", "seqs2", "seqs8", "seqs32"}


def test_resume_from_trial_files_with_a_fresh_study(tmp_path: Path) -> None:
    make(tmp_path, (2, 8), SearchSettings(repeats=0), FakeRunner()).run()
    (tmp_path / "study.db").unlink()
    again = FakeRunner()
    make(tmp_path, (2, 8), SearchSettings(repeats=0), again).run()
    assert again.measured == []


def test_finalists_rerun_and_noise_verdict(tmp_path: Path) -> None:
    runner = FakeRunner(noise=0.3)
    search = make(tmp_path, (64, 96, 120), SearchSettings(finalists=3, repeats=2), runner)
    result = search.run()
    assert len(result.finalists) == 3 and len(runner.remeasured) == 3
    assert all(len(f.samples) == 3 for f in result.finalists)
    assert result.within_noise  # 30 % noise on values within 25 % of each other
    assert result.best is not None and result.best.name == result.finalists[0].name
    # Finalist samples are saved: a rerun does not measure them again.
    runner2 = FakeRunner(noise=0.3)
    make(tmp_path, (64, 96, 120), SearchSettings(finalists=3, repeats=2), runner2).run()
    assert runner2.remeasured == [] and runner2.measured == []


def test_baseline_outside_the_top_is_remeasured_with_the_finalists(tmp_path: Path) -> None:
    runner = FakeRunner(noise=0.01)  # the baseline runs at vLLM's 128 sequences: the slowest
    settings = SearchSettings(finalists=2, repeats=2)
    result = make(tmp_path, (140, 150, 160), settings, runner).run()
    assert runner.remeasured == ["seqs160", "seqs150", "vllm-defaults"]
    assert [f.name for f in result.finalists] == ["seqs160", "seqs150", "vllm-defaults"]
    assert result.best is not None and result.best.name == "seqs160"
    # A baseline that failed (or never met the SLO) has no rate to re-measure.
    runner = FakeRunner(fail={128})
    make(tmp_path / "again", (140, 150, 160), settings, runner).run()
    assert runner.remeasured == ["seqs160", "seqs150"]


def test_clear_winner_is_not_within_noise(tmp_path: Path) -> None:
    result = make(
        tmp_path, (2, 8), SearchSettings(finalists=2, repeats=2), FakeRunner(noise=0.001)
    ).run()
    assert not result.within_noise


def test_tpe_sampled_search_skips_duplicates_and_records_in_study(tmp_path: Path) -> None:
    runner = FakeRunner()
    settings = SearchSettings(budget=4, sampler="tpe", repeats=0)
    search = make(tmp_path, (1, 2, 4, 8, 16, 32, 64), settings, runner)
    result = search.run()
    assert len(runner.measured) == 4 and len(set(runner.measured)) == 4
    assert set(finished_records(search.study)) == set(runner.measured)
    assert result.pareto  # every complete trial with a best point takes part


def test_tpe_search_measures_distinct_analytic_picks_first(tmp_path: Path) -> None:
    runner = FakeRunner()
    settings = SearchSettings(budget=4, sampler="tpe", repeats=0)
    space = Space({"max_num_seqs": (8, 32, 128), "max_num_batched_tokens": (2048, 4096, 8192)})
    make(tmp_path, space, settings, runner).run()
    # Baseline, then one candidate per distinct prediction, not 128 with three token budgets.
    assert runner.measured[0] == "vllm-defaults"
    assert [n.split("-")[0] for n in runner.measured[1:]] == ["seqs128", "seqs32", "seqs8"]


def test_sampler_never_measures_vllm_defaults_twice(tmp_path: Path) -> None:
    # On CPU, seqs128-mbt2048 is exactly vLLM's defaults: the plan prunes it, and when TPE
    # suggests it anyway it is told as pruned, not launched.
    runner = FakeRunner()
    space = Space({"max_num_seqs": (64, 128), "max_num_batched_tokens": (2048, 4096)})
    search = make(tmp_path, space, SearchSettings(budget=20, sampler="tpe", repeats=0), runner)
    result = search.run()
    assert "seqs128-mbt2048" not in runner.measured
    assert sorted(runner.measured) == [
        "seqs128-mbt4096",
        "seqs64-mbt2048",
        "seqs64-mbt4096",
        "vllm-defaults",
    ]
    assert any(p.candidate.name == "seqs128-mbt2048" for p in result.sampled_pruned)


# --- what runs again: environment failures, stop requests ---------------------------------------


def test_environment_failure_of_the_baseline_stops_and_a_rerun_measures_it(tmp_path: Path) -> None:
    first = FakeRunner(env={128})
    with pytest.raises(EnvironmentFailedError) as err:
        make(tmp_path, (2, 8), SearchSettings(repeats=0), first).run()
    line = str(err.value)
    assert "\n" not in line and first.measured == ["vllm-defaults"]
    assert "health_timeout in the baseline" in line and "log: /logs/000.log" in line
    assert not (tmp_path / "store" / "trials").exists()  # nothing saved as finished
    fixed = FakeRunner()
    result = make(tmp_path, (2, 8), SearchSettings(repeats=0), fixed).run()
    assert fixed.measured[0] == "vllm-defaults" and sorted(fixed.measured) == sorted(result.records)
    assert all(r.state == STATE_COMPLETE for r in result.records.values())


def test_two_environment_failures_in_a_row_stop_the_search(tmp_path: Path) -> None:
    runner = FakeRunner(env={2, 8, 32})
    with pytest.raises(EnvironmentFailedError, match="health_timeout in 2 trials in a row"):
        make(tmp_path, (2, 8, 32), SearchSettings(repeats=0), runner).run()
    assert len(runner.measured) == 3  # the baseline, then two failures


def test_one_environment_failure_goes_on_and_runs_again_next_time(tmp_path: Path) -> None:
    runner = FakeRunner(env={8})
    search = make(tmp_path, (2, 8, 32), SearchSettings(repeats=0), runner)
    result = search.run()
    assert len(runner.measured) == 4 and result.records["seqs8"].environment_failure
    assert "seqs8" not in finished_records(search.study)
    assert not (tmp_path / "store" / "trials" / "seqs8.json").exists()
    failed = [t for t in search.study.trials if t.user_attrs.get("candidate") == "seqs8"]
    assert failed[0].state.name == "FAIL" and failed[0].user_attrs["environment"] is True
    again = FakeRunner()
    make(tmp_path, (2, 8, 32), SearchSettings(repeats=0), again).run()
    assert again.measured == ["seqs8"]


class SignalledRunner(FakeRunner):
    """Gets SIGTERM while its load runs in an event loop (where the handler cannot raise), then
    returns a complete-looking record: what the trial saw of a cut-short rate search."""

    def measure(
        self, number: int, planned: Planned, variant: Variant, incumbent: float | None = None
    ) -> TrialRecord:
        if len(self.measured) == 1:

            async def load() -> None:
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(0.1)

            asyncio.run(load())
        return super().measure(number, planned, variant, incumbent)


def test_a_trial_under_a_stop_request_is_not_a_result(tmp_path: Path) -> None:
    interrupt.reset()
    interrupt.install()
    try:
        runner = SignalledRunner()
        search = make(tmp_path, (2, 8), SearchSettings(repeats=0), runner)
        with pytest.raises(Interrupted):
            search.run()
    finally:
        interrupt.reset()
    assert len(runner.measured) == 2
    saved = {p.stem for p in (tmp_path / "store" / "trials").glob("*.json")}
    assert saved == {"vllm-defaults"}  # the interrupted second trial is not saved
    cut = search.study.trials[-1]
    assert cut.state.name == "FAIL" and cut.user_attrs["interrupted"] is True
    assert "record" not in cut.user_attrs
    again = FakeRunner()
    make(tmp_path, (2, 8), SearchSettings(repeats=0), again).run()
    assert again.measured == [runner.measured[1], *again.measured[1:]]
    assert "vllm-defaults" not in again.measured and len(again.measured) == 2


def test_every_asked_trial_is_claimed_and_stale_ones_are_failed_before_each_ask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []

    def spy(study: object, *, settle: bool = True) -> list[int]:
        calls.append(settle)
        return []

    monkeypatch.setattr(runner_mod, "fail_stale", spy)
    settings = SearchSettings(budget=3, sampler="tpe", repeats=0)
    search = make(tmp_path, (1, 2, 4, 8, 16, 32, 64), settings, FakeRunner())
    search.run()
    trials = search.study.trials
    assert calls[0] is True and calls[1:] == [False] * len(trials)
    assert all(t.user_attrs.get("worker_id") for t in trials)  # pruned and duplicates too


def test_a_missing_objective_is_the_worst_value_for_its_direction(tmp_path: Path) -> None:
    blank = TrialRecord("x", {}, STATE_COMPLETE, objective=None)
    search = make(tmp_path, (2,), SearchSettings(objective="latency", repeats=0), FakeRunner())
    assert search._values(blank) == math.inf
    search = make(tmp_path / "t", (2,), SearchSettings(repeats=0), FakeRunner())
    assert search._values(blank) == 0.0


def test_null_samples_read_back_as_the_worst_value(tmp_path: Path) -> None:
    store = TrialStore(tmp_path)
    store.save_samples("seqs8", [12.5, math.inf], 3.0)  # written as null
    assert store.load_samples("seqs8", "latency") == ([12.5, math.inf], 3.0)
    assert store.load_samples("seqs8", "throughput") == ([12.5, 0.0], 3.0)
    finalist = Finalist.from_json({"name": "seqs8", "samples": [12.5, None]}, "latency")
    assert finalist.samples == (12.5, math.inf) and finalist.mean == math.inf
    assert Finalist.from_json({"name": "a", "samples": [3.0, None]}).samples == (3.0, 0.0)


# --- early stop, finalists a step down, one launch for equal settings ---------------------------


def test_a_trial_that_cannot_reach_the_incumbent_stops_early_and_is_finished(
    tmp_path: Path,
) -> None:
    runner = FakeRunner(early=True)
    settings = SearchSettings(finalists=3, repeats=1)
    search = make(tmp_path, (115, 120, 8), settings, runner)
    result = search.run()
    stopped = result.records["seqs8"]
    # 800 tok/s x 1.15 cannot reach the baseline's 12,800; seqs115's 11,500 x 1.15 can.
    assert stopped.state == STATE_PRUNED and stopped.stopped_early
    assert stopped.failure == {
        "rule": "early_stop",
        "reason": "stopped early: capacity 800 tok/s cannot reach the incumbent's 12,800 "
        "tok/s (margin 15%)",
    }
    assert stopped.engine_time_s == 5.0 and len(stopped.points) == 1  # the probe, kept
    assert result.records["seqs115"].state == STATE_COMPLETE
    assert runner.incumbents[0] is None and max(i or 0 for i in runner.incumbents) == 12800.0
    assert "seqs8" not in runner.remeasured and "seqs8" not in [f.name for f in result.finalists]
    assert result.best is not None and result.best.name == "vllm-defaults"
    # In the study: PRUNED with the probe as its step-0 value, and finished (not re-run).
    (trial,) = [t for t in search.study.trials if t.user_attrs.get("candidate") == "seqs8"]
    assert trial.state.name == "PRUNED" and trial.intermediate_values == {0: 800.0}
    assert "seqs8" in finished_records(search.study)
    again = FakeRunner(early=True)
    make(tmp_path, (115, 120, 8), settings, again).run()
    assert again.measured == [] and again.remeasured == []
    (tmp_path / "study.db").unlink()  # the trial files alone keep it finished too
    fresh = FakeRunner(early=True)
    make(tmp_path, (115, 120, 8), settings, fresh).run()
    assert fresh.measured == []


def test_vllm_defaults_never_stop_early(tmp_path: Path) -> None:
    # Another worker measured a far better candidate first: the baseline runs to the end anyway.
    better = TrialRecord("seqs64", {"max_num_seqs": 64}, STATE_COMPLETE, objective=1e6)
    TrialStore(tmp_path / "store").save(better)
    runner = FakeRunner(early=True)
    result = make(tmp_path, (8, 64), SearchSettings(repeats=0), runner).run()
    assert runner.measured == ["vllm-defaults", "seqs8"] and runner.incumbents == [None, 1e6]
    assert result.records["vllm-defaults"].state == STATE_COMPLETE
    assert result.records["seqs8"].stopped_early


def test_a_trial_stopped_early_counts_in_the_budget(tmp_path: Path) -> None:
    runner = FakeRunner(early=True)
    settings = SearchSettings(budget=3, sampler="tpe", repeats=0)
    result = make(tmp_path, (1, 2, 4, 8, 16, 32, 64), settings, runner).run()
    assert len(runner.measured) == 3
    assert any(r.stopped_early for r in result.records.values())


@pytest.mark.parametrize(
    "settings",
    [
        SearchSettings(finalists=3, repeats=0, early_stop_margin=None),
        SearchSettings(finalists=3, repeats=0, objective="latency"),
    ],
    ids=["off", "latency"],
)
def test_no_incumbent_is_given_when_trials_may_not_stop_early(
    tmp_path: Path, settings: SearchSettings
) -> None:
    runner = FakeRunner(early=True)
    result = make(tmp_path, (100, 8), settings, runner).run()
    assert runner.incumbents == [None, None, None]
    assert not any(r.stopped_early for r in result.records.values())
    assert not SearchSettings(pareto=True).early_stop  # a slower trial may be on the front
    assert SearchSettings(objective="goodput").early_stop


def test_a_finalist_rerun_that_held_a_step_down_takes_that_value(tmp_path: Path) -> None:
    runner = FakeRunner(step={150}, zero={140})
    settings = SearchSettings(finalists=3, repeats=2)
    search = make(tmp_path, (140, 150, 160), settings, runner)
    result = search.run()
    by_name = {f.name: f for f in result.finalists}
    held = by_name["seqs150"]
    assert held.samples == (15000.0, 13500.0, 13500.0)
    assert [r.step_down for r in held.runs] == [False, True, True]
    assert [r.rate for r in held.runs][1:] == [2.7, 2.7]
    # Two re-runs at 0 (a step down failed too): the interval never goes below zero.
    zero = by_name["seqs140"]
    assert zero.samples == (14000.0, 0.0, 0.0) and zero.ci_low == 0.0
    assert zero.ci_high > zero.mean
    # The runs are saved with the samples: a rerun reads them back, measuring nothing.
    again = FakeRunner(step={150}, zero={140})
    result = make(tmp_path, (140, 150, 160), settings, again).run()
    assert again.remeasured == [] and again.groups == []
    assert {f.name: f.runs for f in result.finalists} == {f.name: f.runs for f in by_name.values()}


def test_finalists_with_equal_settings_share_one_launch(tmp_path: Path) -> None:
    runner = FakeRunner(same={150, 160}, noise=0.01)
    settings = SearchSettings(finalists=3, repeats=2)
    search = make(tmp_path, (140, 150, 160), settings, runner)
    search.clock = lambda: runner.now
    result = search.run()
    assert runner.groups == [["seqs160", "seqs150"]]
    assert runner.remeasured == ["seqs140", "vllm-defaults"]
    assert all(len(f.samples) == 3 for f in result.finalists)
    assert result.finalist_engine_time_s == 300.0  # three launches, the shared one counted once
    names = ("seqs150", "seqs160", "seqs140")
    saved = {n: search.store.load_samples(n) for n in names}
    seconds = {n: s[1] for n, s in saved.items() if s}
    assert seconds == dict(zip(names, (50.0, 50.0, 100.0), strict=True))


def test_the_interval_of_a_finalist_never_goes_below_zero_and_its_runs_read_back() -> None:
    # The demo's finalist: one re-run missed the SLO at saturation (before the step down).
    demo = Finalist.of("x", [4413.0, 0.0, 4352.0])
    mean, half = mean_ci([4413.0, 0.0, 4352.0])
    assert mean - half < 0 and demo.ci_low == 0.0 and demo.ci_high == mean + half
    assert mean_interval([100.0, 102.0])[1] > 0  # a tight interval is not clipped
    assert mean_interval([5.0])[1:] == (0.0, math.inf)
    runs = (FinalistSample(4413.0, None, 8), FinalistSample(3900.0, None, 7, step_down=True))
    finalist = Finalist.of("x", [4413.0, 3900.0], runs)
    data = finalist.to_json()
    assert data["runs"][1] == {
        "value": 3900.0,
        "rate": None,
        "concurrency": 7,
        "step_down": True,
        "in_trial": False,
    }
    assert Finalist.from_json(data) == finalist
    assert Finalist.from_json({**data, "runs": None}).runs == ()  # a record from before runs


def test_contenders_rerun_in_their_own_launch_and_no_finalist_is_relaunched(
    tmp_path: Path,
) -> None:
    runner = FakeRunner(in_trial=2)
    settings = SearchSettings(finalists=3, repeats=2, early_stop_margin=None)
    assert settings.in_trial_repeats == 2 and not settings.early_stop
    search = make(tmp_path, (8, 120, 125), settings, runner)
    search.clock = lambda: runner.now
    result = search.run()
    # The incumbent is given for in-trial re-runs even without early stop (not to the baseline).
    assert runner.incumbents[0] is None and runner.incumbents[1:] == [12800.0] * 3
    # 12,500 and 12,000 x 1.15 reach 12,800: contenders; 800 x 1.15 does not.
    ran = {n: len(r.in_trial_samples) for n, r in result.records.items()}
    assert ran == {"vllm-defaults": 2, "seqs125": 2, "seqs120": 2, "seqs8": 0}
    assert runner.remeasured == [] and runner.groups == []  # no launch for the finalists
    assert result.finalist_engine_time_s == 0.0
    by_name = {f.name: f for f in result.finalists}
    assert set(by_name) == {"vllm-defaults", "seqs125", "seqs120"}
    top = by_name["vllm-defaults"]
    assert top.samples == (12800.0, 12672.0, 12544.0)
    assert [r.in_trial for r in top.runs] == [False, True, True]
    assert [r.concurrency for r in top.runs][1:] == [128, 128]


def test_a_finalist_without_in_trial_runs_is_relaunched(tmp_path: Path) -> None:
    runner = FakeRunner(in_trial=2)
    settings = SearchSettings(finalists=4, repeats=2)
    result = make(tmp_path, (8, 120, 125), settings, runner).run()
    assert runner.remeasured == ["seqs8"]  # not a contender when it ran, a finalist now
    assert {f.name: len(f.samples) for f in result.finalists} == dict.fromkeys(
        ("vllm-defaults", "seqs125", "seqs120", "seqs8"), 3
    )


@pytest.mark.parametrize(
    "settings",
    [
        SearchSettings(finalists=3, repeats=2, finalist_runs="relaunch"),
        SearchSettings(finalists=1, repeats=2),
        SearchSettings(finalists=3, repeats=0),
    ],
    ids=["relaunch", "one-finalist", "no-repeats"],
)
def test_no_in_trial_runs_unless_finalists_are_rerun_in_trial(settings: SearchSettings) -> None:
    assert settings.in_trial_repeats == 0
    assert not replace(settings, early_stop_margin=None).ranks_incumbent


def test_a_contender_is_within_the_margin_of_the_incumbent() -> None:
    assert contends(100.0, None, 0.15)  # nothing to beat yet
    assert contends(87.0, 100.0, 0.15) and not contends(86.0, 100.0, 0.15)
    assert contends(120.0, 100.0, 0.0)
