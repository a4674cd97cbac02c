"""Study orchestration: which candidate runs next, resuming, budget, finalists, the choice.

The measuring itself is behind :class:`TrialRunner` (``tuner.search.trial.VllmTrialRunner`` launches
vLLM; unit tests use a fake). The loop asks Optuna for a trial, resolves it to a candidate with
the pruning rules, skips what is already finished (this or an earlier run), measures, saves the
trial at once (atomically, in the study and as a JSON file), and tells Optuna. What runs
again instead (interrupted, stale, environment-failed trials) and when the search stops on an
environment failure: :mod:`tuner.search.resume`. Several workers on one study:
:mod:`tuner.search.workers`; the settings and the trial order: :mod:`tuner.search.order`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from tuner.engine import interrupt
from tuner.errors import EnvironmentFailedError
from tuner.plan.prune import Plan, Planned, Pruned, Target, Variant, evaluate
from tuner.plan.space import Candidate, Space
from tuner.search.analytic_queue import AnalyticQueue
from tuner.search.calibration import OnlineCalibration
from tuner.search.events import Fanout
from tuner.search.finalist_runs import launch_groups, launch_key, trial_sample
from tuner.search.front import search_front
from tuner.search.objective import OBJECTIVES as OBJECTIVES  # re-exported for prepare
from tuner.search.objective import worst
from tuner.search.order import ANALYTIC_FIRST as ANALYTIC_FIRST  # re-exported: settings, order
from tuner.search.order import SearchSettings, trial_order
from tuner.search.order import TrialOrder as TrialOrder
from tuner.search.order import directions as directions
from tuner.search.order import make_sampler as make_sampler
from tuner.search.order import queue_all as queue_all
from tuner.search.record import STATE_COMPLETE, STATE_PRUNED, Finalist, FinalistSample, TrialRecord
from tuner.search.record_parts import CalibrationInfo, ScreenInfo
from tuner.search.resume import abandon, environment_stop, stale_candidates
from tuner.search.screen import Screen
from tuner.search.store import TrialStore
from tuner.search.study import earlier_trial, fail_stale, finished_records, heartbeat, pending_names
from tuner.search.workers import report_probe, tell_record, wait_for_others

# After this many sampled trials in a row that ran nothing (pruned or already measured), the
# sampler has nothing new to offer: the search stops.
MAX_IDLE_ASKS = 40


class TrialRunner(Protocol):
    """Measures candidates; never raises for a server failure (it is a failed TrialRecord).
    ``incumbent``: the best objective so far, when the trial may stop after its capacity probe
    (a pruned record, rule early_stop); ``remeasure_group``: finalists whose
    ``engine_settings`` are equal, in one launch; a runner may give bare numbers as samples."""

    def measure(
        self, number: int, planned: Planned, variant: Variant, incumbent: float | None = None
    ) -> TrialRecord: ...

    def remeasure(
        self, record: TrialRecord, variant: Variant, repeats: int
    ) -> list[FinalistSample]: ...

    def remeasure_group(
        self, records: Sequence[TrialRecord], variant: Variant, repeats: int
    ) -> dict[str, list[FinalistSample]]: ...

    def engine_settings(self, cand: Candidate, variant: Variant) -> Any: ...


@dataclass
class SearchResult:
    records: dict[str, TrialRecord]
    baseline: TrialRecord | None
    best: TrialRecord | None
    finalists: list[Finalist]
    within_noise: bool
    pareto: list[str]
    sampled_pruned: list[Pruned] = field(default_factory=list)
    elapsed_s: float = 0.0
    finalist_engine_time_s: float = 0.0
    calibration: CalibrationInfo | None = None
    screen: ScreenInfo | None = None


class Search:
    """One worker's run of a study. ``trial_store`` persists each finished trial (atomic JSON
    files) so that a rerun skips it even if the study storage is new."""

    def __init__(
        self,
        study: Any,
        plan: Plan,
        space: Space,
        target: Target,
        runner: TrialRunner,
        settings: SearchSettings,
        trial_store: TrialStore,
        observer: Any = None,
        clock: Callable[[], float] = time.monotonic,
        calibration: OnlineCalibration | None = None,
        before_finalists: Callable[[], None] | None = None,
    ) -> None:
        self.study, self.plan, self.space, self.target = study, plan, space, target
        # Workers sharing a study: the one that takes the profile lease here re-measures the
        # finalists; the others end (tuner.search.lease raises) so finalists run once.
        self.before_finalists = before_finalists
        self.calibration = calibration or OnlineCalibration(target, settings.objective)
        self.runner, self.settings, self.store = runner, settings, trial_store
        self.observer = observer if observer is not None else Fanout()
        self.clock = clock
        self.varying = {k: v for k, v in space.values.items() if len(v) > 1}
        self.fixed = {k: v[0] for k, v in space.values.items() if len(v) == 1}
        self.screen = Screen(self)  # max_num_seqs in one launch (tuner.search.screen)

    # -- trial phase ---------------------------------------------------------------------------

    def run(self) -> SearchResult:
        started = self.clock()
        stale = fail_stale(self.study)
        done = {n: r for n, r in self.store.load_all().items() if not r.environment_failure}
        done.update(finished_records(self.study))
        self._requeue(stale, done)
        order = trial_order(self.plan, self.settings)
        grid = order.sampler is None
        # The analytic picks go into the study one at a time, each chosen by the model as
        # calibrated on every trial so far (tuner.search.calibration).
        picks = None if grid else len(order.queued) - 1
        exhaustive = self.settings.sampler == "grid"  # asked for: no calibrated pruning
        queue = AnalyticQueue(
            self.plan.baseline, order.candidates, picks, self.calibration, not exhaustive
        )
        self.calibration.refit(done.values())
        budget = (
            self.settings.budget
            if self.settings.budget is not None
            else (len(self.plan.all()) if grid else 20)
        )
        self.observer.on_plan(len(self.plan.all()), len(self.plan.pruned), budget)
        self.observer.on_phase("baseline" if self.plan.baseline.name not in done else "trials")
        sampled_pruned: list[Pruned] = []
        idle = 0
        environment_failures = 0  # measured trials in a row that failed for the environment
        while idle < MAX_IDLE_ASKS:
            interrupt.check()
            if self._out_of_time(started):
                break
            # Other workers share the study: with nothing left to ask here, wait for what
            # they still measure (tuner.search.workers), then end with the whole study.
            if self._measured(done) >= budget:
                if wait_for_others(self.study, done):
                    continue
                break
            done.update(finished_records(self.study))
            self.calibration.refit(done.values())  # once a loop: with the other workers' too
            self._requeue(fail_stale(self.study, settle=False), done)
            queue.pruned += self.screen.maybe_run(done, grid)  # once, after the baseline
            if not self._waiting():
                self._enqueue(done, tuple(queue.next(done, pending_names(self.study))))
            if grid and not self._waiting():
                if wait_for_others(self.study, done):
                    continue
                # A dead worker's trial failed while this one asked: its candidate runs here.
                self._requeue(fail_stale(self.study, settle=False), done)
                if self._waiting():
                    continue
                break
            trial = self.study.ask()
            try:
                with heartbeat(trial):  # claimed at once: a dead worker's trial goes stale
                    record = self._step(trial, done, sampled_pruned)
            except BaseException:
                abandon(self.study, trial)
                raise
            if record is None:  # pruned, finished already, or measured by another worker
                idle += 1
                continue
            idle = 0
            done[record.name] = record
            if record.baseline:
                self.observer.on_phase("trials")
            environment_failures = environment_failures + 1 if record.environment_failure else 0
            if record.environment_failure and (record.baseline or environment_failures >= 2):
                raise EnvironmentFailedError(environment_stop(record, environment_failures))
        if self.before_finalists is not None:
            self.before_finalists()
        finalists, within_noise, finalist_time = self._finalists(done)
        best = self._choose(done, finalists)
        return SearchResult(
            records=done,
            baseline=done.get(self.plan.baseline.name),
            best=best,
            finalists=finalists,
            within_noise=within_noise,
            pareto=search_front(done.values(), finalists, self.settings.objective),
            sampled_pruned=[*sampled_pruned, *queue.pruned],
            elapsed_s=self.clock() - started,
            finalist_engine_time_s=finalist_time,
            calibration=self.calibration.info(done.values()),
            screen=self.screen.info(done),
        )

    def _step(
        self, trial: Any, done: dict[str, TrialRecord], sampled_pruned: list[Pruned]
    ) -> TrialRecord | None:
        """Resolve an asked trial and measure it; None (the trial told) when there is nothing
        to measure: the bounds rule it out, it is finished, or another worker measures it."""
        outcome = self._resolve(trial)
        if isinstance(outcome, Pruned):
            sampled_pruned.append(outcome)
            record = TrialRecord(
                outcome.candidate.name,
                outcome.candidate.knobs(),
                STATE_PRUNED,
                failure={"rule": outcome.rule, "reason": outcome.reason},
            )
            trial.set_user_attr("record", record.to_json())
            self.study.tell(trial, state=_state("PRUNED"))
            return None
        planned = outcome
        done.update(finished_records(self.study))  # another worker may have finished it
        if planned.name in done:
            self._tell_known(trial, done[planned.name])
            return None
        trial.set_user_attr("candidate", planned.name)  # before looking for an earlier one
        if earlier_trial(self.study, planned.name, trial.number) is not None:
            trial.set_user_attr("running_elsewhere", planned.name)
            self.study.tell(trial, state=_state("PRUNED"))
            return None
        return self._run_trial(trial, planned, self._incumbent(done))

    def _requeue(self, stale: list[int], done: dict[str, TrialRecord]) -> None:
        """Queue again the candidates of ``stale`` trials (their worker died), to run here."""
        by_name = {p.name: p for p in self.plan.all()}
        names = stale_candidates(self.study, stale)
        self._enqueue(done, tuple(by_name[n] for n in names if n in by_name))

    def _enqueue(self, done: dict[str, TrialRecord], queue: tuple[Planned, ...]) -> None:
        pending = pending_names(self.study)
        for planned in queue:
            if planned.name in done or planned.name in pending:
                continue
            origin = planned.origin or planned.candidate
            params = {k: getattr(origin, k) for k in self.varying}
            self.study.enqueue_trial(
                params,
                user_attrs={"candidate": planned.name, "baseline": planned.candidate.is_baseline},
            )

    def _waiting(self) -> bool:
        return any(t.state.name == "WAITING" for t in self.study.get_trials(deepcopy=False))

    def _measured(self, done: dict[str, TrialRecord]) -> int:
        return sum(1 for r in done.values() if r.state != STATE_PRUNED or r.stopped_early)

    def _out_of_time(self, started: float) -> bool:
        limit = self.settings.time_budget_s
        return limit is not None and self.clock() - started >= limit

    def _resolve(self, trial: Any) -> Planned | Pruned:
        if trial.user_attrs.get("baseline"):
            return self.plan.baseline
        knobs = {k: trial.suggest_categorical(k, list(v)) for k, v in self.varying.items()}
        cand = Candidate(**{**self.fixed, **knobs})
        outcome = evaluate(cand, self.target)  # normalizes the single-variant quantization
        if isinstance(outcome, Pruned):
            return outcome
        return self.screen.verdict(outcome[0]) or outcome[0]  # the screen's losers too

    def _tell_known(self, trial: Any, record: TrialRecord) -> None:
        trial.set_user_attr("candidate", record.name)
        trial.set_user_attr("duplicate_of", record.name)
        if record.state == STATE_COMPLETE:
            self.study.tell(trial, self._values(record))
        else:
            self.study.tell(trial, state=_state("PRUNED"))

    def _incumbent(self, done: dict[str, TrialRecord]) -> float | None:
        """The best objective measured so far, which a trial's capacity probe must be able to
        reach (``SearchSettings.early_stop``) and its value come near to for in-trial re-runs;
        None when neither applies (``SearchSettings.ranks_incumbent``).

        A plain threshold, not Optuna's pruner interface: its pruners compare a trial's
        intermediate values step by step with other trials' at the same step, while this rule
        compares one figure (the probe's, an upper bound of the objective) with the
        incumbent's final objective, inside the measuring (which has no Optuna trial). The
        trial still ends PRUNED, with the probe reported as its value at step 0."""
        if not self.settings.ranks_incumbent:
            return None
        best = max((r.objective or 0.0 for r in self._ranked(done)), default=0.0)
        return best or None

    def _run_trial(self, trial: Any, planned: Planned, incumbent: float | None) -> TrialRecord:
        variant = self.target.variants[planned.candidate.quantization or "none"]
        trial.set_user_attr("knobs", planned.candidate.knobs())
        self.observer.on_trial_start(trial.number, planned.name, planned.candidate.knobs())
        screened = self.screen.launched_trial(planned.name)
        if screened is not None:  # measured whole in the screen's launch, after its rungs
            record = replace(screened, number=trial.number)
        elif incumbent is None or planned.candidate.is_baseline:  # the gain needs it whole
            record = self.runner.measure(trial.number, planned, variant)
        else:
            record = self.runner.measure(trial.number, planned, variant, incumbent=incumbent)
        interrupt.check()  # a stop request came while it was measured: not a result
        with interrupt.deferred():  # a finished trial is saved whole
            record = self.calibration.annotate(record, planned)  # the fit before this trial
            if not record.environment_failure:
                self.store.save(record)
            if record.stopped_early and record.max_output_throughput is not None:
                report_probe(trial, record.max_output_throughput)
            tell_record(self.study, trial, record, self._values(record))
        self.observer.on_trial_end(record)
        return record

    def _values(self, record: TrialRecord) -> float | list[float]:
        """What Optuna is told; a missing (non-finite) objective is its worst value."""
        objective = None if self.settings.pareto else self.settings.objective
        value = record.objective if record.objective is not None else worst(objective)
        if not self.settings.pareto:
            return value
        tpot = (record.best or {}).get("p95_tpot_ms")
        return [value, float(tpot) if tpot is not None else 1e12]

    # -- finalists and the choice --------------------------------------------------------------

    def _ranked(self, done: dict[str, TrialRecord]) -> list[TrialRecord]:
        complete = [
            r for r in done.values() if r.state == STATE_COMPLETE and r.objective is not None
        ]
        if self.settings.minimize:
            complete = [r for r in complete if math.isfinite(r.objective or math.inf)]
            return sorted(complete, key=lambda r: (r.objective, r.name))
        complete = [r for r in complete if (r.objective or 0.0) > 0.0]
        return sorted(complete, key=lambda r: (-(r.objective or 0.0), r.name))

    def _finalists(self, done: dict[str, TrialRecord]) -> tuple[list[Finalist], bool, float]:
        """Re-measure the top candidates and vLLM's defaults (so that the gain, too, is taken
        on means: one unlucky baseline run would inflate it); returns them best first, the
        noise verdict, and the engine time the re-runs took."""
        everyone = self._ranked(done)
        ranked = everyone[: self.settings.finalists]
        if self.settings.repeats <= 0 or len(ranked) < 2:
            alone = [Finalist.of(r.name, [r.objective or 0.0], (trial_sample(r),)) for r in ranked]
            return alone, False, 0.0
        ranked += [r for r in everyone[len(ranked) :] if r.name == self.plan.baseline.name]
        self.observer.on_phase("finalists", ", ".join(r.name for r in ranked))
        objective, repeats = self.settings.objective, self.settings.repeats
        saved = {r.name: self.store.load_samples(r.name, objective) for r in ranked}
        runs = {r.name: self.store.load_runs(r.name, objective) for r in ranked}
        # Re-run in the trial's own launch: no launch here (the time is the trial's).
        for r in ranked:
            if saved[r.name] is None and len(r.in_trial_samples) >= repeats:
                runs[r.name] = (trial_sample(r), *r.in_trial_samples[:repeats])
                saved[r.name] = ([x.value for x in runs[r.name]], 0.0)
                self.store.save_samples(r.name, *saved[r.name], runs[r.name])
        # Finalists whose settings are equal (vLLM's defaults, and a candidate setting a knob
        # to its default) are re-measured in one launch, their points in turn.
        todo = [r for r in ranked if saved[r.name] is None]
        for group in launch_groups(todo, self._launch_key):
            variant = self.target.variants[group[0].variant]
            t0 = self.clock()
            if len(group) == 1:
                extra = {group[0].name: self.runner.remeasure(group[0], variant, repeats)}
            else:
                extra = self.runner.remeasure_group(group, variant, repeats)
            interrupt.check()  # cut short by a stop request: measured again next run
            share = (self.clock() - t0) / len(group)  # one launch's time, counted once
            for record in group:
                got = [FinalistSample.of(v) for v in extra.get(record.name, [])]
                runs[record.name] = (trial_sample(record), *got)
                saved[record.name] = ([x.value for x in runs[record.name]], share)
                self.store.save_samples(record.name, *saved[record.name], runs[record.name])
        finalists = [Finalist.of(r.name, saved[r.name][0], runs[r.name]) for r in ranked]
        seconds = sum(saved[r.name][1] for r in ranked)
        finalists.sort(key=lambda f: f.mean, reverse=not self.settings.minimize)
        within_noise = len(finalists) >= 2 and finalists[0].overlaps(finalists[1])
        return finalists, within_noise, seconds

    def _launch_key(self, record: TrialRecord) -> Hashable:
        variant = self.target.variants[record.variant]
        settings = self.runner.engine_settings(Candidate(**record.knobs), variant)
        return launch_key(settings, self.target.gpu)

    def _choose(
        self, done: dict[str, TrialRecord], finalists: list[Finalist]
    ) -> TrialRecord | None:
        if finalists:
            return done[finalists[0].name]
        ranked = self._ranked(done)
        return ranked[0] if ranked else None


def _state(name: str) -> Any:
    import optuna

    return getattr(optuna.trial.TrialState, name)
