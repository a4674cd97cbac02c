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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tuner.engine import interrupt
from tuner.errors import EnvironmentFailedError
from tuner.plan.prune import Plan, Planned, Pruned, Target, Variant, evaluate
from tuner.plan.space import Candidate, Space
from tuner.search.calibration import AnalyticQueue, OnlineCalibration
from tuner.search.events import Fanout
from tuner.search.front import search_front
from tuner.search.objective import OBJECTIVES as OBJECTIVES  # re-exported for prepare
from tuner.search.objective import worst
from tuner.search.order import ANALYTIC_FIRST as ANALYTIC_FIRST  # re-exported: settings, order
from tuner.search.order import SearchSettings, trial_order
from tuner.search.order import TrialOrder as TrialOrder
from tuner.search.order import directions as directions
from tuner.search.order import make_sampler as make_sampler
from tuner.search.order import queue_all as queue_all
from tuner.search.record import STATE_COMPLETE, STATE_PRUNED, Finalist, TrialRecord
from tuner.search.record_parts import CalibrationInfo
from tuner.search.resume import abandon, environment_stop, stale_candidates
from tuner.search.store import TrialStore
from tuner.search.study import earlier_trial, fail_stale, finished_records, heartbeat, pending_names
from tuner.search.workers import tell_record, wait_for_others

# After this many sampled trials in a row that ran nothing (pruned or already measured), the
# sampler has nothing new to offer: the search stops.
MAX_IDLE_ASKS = 40


class TrialRunner(Protocol):
    """Measures candidates; never raises for a server failure (it is a failed TrialRecord)."""

    def measure(self, number: int, planned: Planned, variant: Variant) -> TrialRecord: ...

    def remeasure(self, record: TrialRecord, variant: Variant, repeats: int) -> list[float]: ...


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
    ) -> None:
        self.study, self.plan, self.space, self.target = study, plan, space, target
        self.calibration = calibration or OnlineCalibration(target, settings.objective)
        self.runner, self.settings, self.store = runner, settings, trial_store
        self.observer = observer if observer is not None else Fanout()
        self.clock = clock
        self.varying = {k: v for k, v in space.values.items() if len(v) > 1}
        self.fixed = {k: v[0] for k, v in space.values.items() if len(v) == 1}

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
        queue = AnalyticQueue(self.plan.baseline, order.candidates, picks, self.calibration)
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
            self._requeue(fail_stale(self.study, settle=False), done)
            if not self._waiting():
                self._enqueue(done, tuple(queue.next(done, pending_names(self.study))))
            if grid and not self._waiting():
                if wait_for_others(self.study, done):
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
            self.calibration.refit(done.values())
            if record.baseline:
                self.observer.on_phase("trials")
            environment_failures = environment_failures + 1 if record.environment_failure else 0
            if record.environment_failure and (record.baseline or environment_failures >= 2):
                raise EnvironmentFailedError(environment_stop(record, environment_failures))
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
        return self._run_trial(trial, planned)

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
        return sum(1 for r in done.values() if r.state != STATE_PRUNED)

    def _out_of_time(self, started: float) -> bool:
        limit = self.settings.time_budget_s
        return limit is not None and self.clock() - started >= limit

    def _resolve(self, trial: Any) -> Planned | Pruned:
        if trial.user_attrs.get("baseline"):
            return self.plan.baseline
        knobs = {k: trial.suggest_categorical(k, list(v)) for k, v in self.varying.items()}
        cand = Candidate(**{**self.fixed, **knobs})
        outcome = evaluate(cand, self.target)  # normalizes the single-variant quantization
        return outcome if isinstance(outcome, Pruned) else outcome[0]

    def _tell_known(self, trial: Any, record: TrialRecord) -> None:
        trial.set_user_attr("candidate", record.name)
        trial.set_user_attr("duplicate_of", record.name)
        if record.state == STATE_COMPLETE:
            self.study.tell(trial, self._values(record))
        else:
            self.study.tell(trial, state=_state("PRUNED"))

    def _run_trial(self, trial: Any, planned: Planned) -> TrialRecord:
        variant = self.target.variants[planned.candidate.quantization or "none"]
        trial.set_user_attr("knobs", planned.candidate.knobs())
        self.observer.on_trial_start(trial.number, planned.name, planned.candidate.knobs())
        record = self.runner.measure(trial.number, planned, variant)
        interrupt.check()  # a stop request came while it was measured: not a result
        with interrupt.deferred():  # a finished trial is saved whole
            record = self.calibration.annotate(record, planned)  # the fit before this trial
            if not record.environment_failure:
                self.store.save(record)
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
            return [Finalist.of(r.name, [r.objective or 0.0]) for r in ranked], False, 0.0
        ranked += [r for r in everyone[len(ranked) :] if r.name == self.plan.baseline.name]
        self.observer.on_phase("finalists", ", ".join(r.name for r in ranked))
        finalists = []
        seconds = 0.0
        for record in ranked:
            saved = self.store.load_samples(record.name, self.settings.objective)
            if saved is None:
                variant = self.target.variants[record.variant]
                t0 = self.clock()
                extra = self.runner.remeasure(record, variant, self.settings.repeats)
                interrupt.check()  # cut short by a stop request: measured again next run
                saved = ([record.objective or 0.0, *extra], self.clock() - t0)
                self.store.save_samples(record.name, *saved)
            finalists.append(Finalist.of(record.name, saved[0]))
            seconds += saved[1]
        finalists.sort(key=lambda f: f.mean, reverse=not self.settings.minimize)
        within_noise = len(finalists) >= 2 and finalists[0].overlaps(finalists[1])
        return finalists, within_noise, seconds

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
