"""Screen max_num_seqs inside one launch, then launch only the promising candidates.

vLLM never runs more sequences at once than the client lets in, so on one server started at a
large max_num_seqs, a closed loop of ``c`` requests in flight stands for a server started at
max_num_seqs ``c``: the same batch, the same scheduler, the same KV pool. The search therefore
groups its candidates by everything *but* max_num_seqs (a :class:`RelaunchGroup`: the knobs
that need a relaunch), launches one group once at its largest max_num_seqs, and measures a
closed loop at each member's concurrency (its max_num_seqs capped to what the KV cache holds,
:func:`tuner.plan.prune.feasible_concurrency`: the load a real trial's capacity probe puts on
it). The measuring is :mod:`tuner.search.screen_run`'s; each member gets a
:class:`~tuner.search.record_parts.ScreenResult`.

Largest concurrency first: the first point runs at the launch's own max_num_seqs, the one
member the screen measures exactly as its own trial would (an anchor that a screen cut short
still has), and it takes the warm-up, so that every smaller batch after it runs on a server
whose paths for larger batches are already warm; each point waits for its last request before
the next begins, so no load spills from one into the next.

What the screen decides (the objective ``throughput`` only, not the Pareto study):

* order (:meth:`Screen.order`, installed as the calibration's ``ranking``): screened
  candidates by their screened value: the capacity where the SLO held at the closed loop,
  else the best SLO-meeting capacity at a smaller concurrency (a Poisson rate below
  saturation rarely fills max_num_seqs, so a larger limit does about as well as the smaller
  one that met the SLO), never above its own capacity; candidates of other groups by their
  calibrated prediction x (screened value / calibrated prediction) of the screened member at
  the nearest concurrency: the model keeps what it says about the relaunch knobs, the screen
  corrects its max_num_seqs curve. On a tie, measured before extrapolated.
* prune (:data:`RULE_SCREENED`): a screened candidate whose capacity, raised by
  :data:`SCREEN_MARGIN` (the run-to-run noise), stays below the best capacity that met the
  SLO in the same launch. Capacity bounds the objective from above, and the best SLO-meeting
  point is achieved: such a candidate cannot win.

Where it does not hold: knobs that change what is launched (max_num_batched_tokens, memory
utilization, KV dtype, quantization, block size, chunked prefill, prefix caching, parallelism)
need a relaunch, hence one group per combination of them. On GPUs max_num_seqs also sizes the
CUDA graphs captured and the sampler's memory profile (so the KV pool of a small max_num_seqs
is a little larger than the launch's); on vLLM CPU the pool is fixed and neither applies.
Only the closed loop is emulated, not the rate search under Poisson arrivals: the screen's
verdicts use capacity, and its faithfulness (rank correlation and capacity error against the
real launches the search makes anyway) is in the record's ``screen`` block (:meth:`Screen.info`).

The screen's measurements are saved (``screen/<launch>.json`` beside the trials) and a
resumed search reuses them. Two workers on one study each screen once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from tuner.engine import interrupt
from tuner.plan.prune import Plan, Planned, Pruned, Target, effective_knobs, feasible_concurrency
from tuner.search.record import STATE_COMPLETE, TrialRecord, finite
from tuner.search.record_parts import ScreenInfo, ScreenResult
from tuner.search.screen_run import (
    FIGURES,
    Measure,
    ScreenFailed,
    ScreenMeasured,
    ScreenRun,
    faithfulness,
    probe_capacity,
    screen_measure,
)
from tuner.specs.vllm_defaults import vllm_defaults

RULE_SCREENED = "screened"
SCREEN_MARGIN = 0.15  # run-to-run noise of one closed-loop point (the early stop's margin)
SCREEN_MIN_LADDER = 3  # distinct max_num_seqs values a screen needs to be worth a launch
SCREEN_OBJECTIVES = ("throughput",)  # objectives measured in output tokens/s
ORDER = "largest first"

Key = tuple[tuple[str, str], ...]


# --- the groups ----------------------------------------------------------------------------------


def max_num_seqs(planned: Planned, target: Target) -> int:
    """The candidate's max_num_seqs, vLLM's default when it leaves it unset."""
    cand, defaults = planned.candidate, vllm_defaults()
    if cand.max_num_seqs is not None:
        return cand.max_num_seqs
    tp = cand.tensor_parallel_size or defaults.tensor_parallel_size
    return defaults.batch_limits(target.gpu, tp)[1]


def concurrency(planned: Planned, target: Target) -> int:
    """The requests in flight that stand for ``planned``: its max_num_seqs capped to the
    KV-feasible concurrency (the load of its own trial's capacity probe)."""
    return feasible_concurrency(max_num_seqs(planned, target), planned.max_concurrency)


def relaunch_key(planned: Planned, target: Target) -> Key:
    """What needs a relaunch to change: every knob but max_num_seqs, as vLLM runs it (vLLM's
    defaults filled in, so ``mbt2048`` on CPU is in the baseline's group); the knobs as set
    when one of them has a default vtune does not model."""
    values = effective_knobs(planned.candidate, target)
    if values is None:
        values = {**planned.candidate.knobs(), "(as set)": True}
    return tuple(sorted((k, repr(v)) for k, v in values.items() if k != "max_num_seqs"))


@dataclass(frozen=True)
class RelaunchGroup:
    """Candidates that differ in max_num_seqs only. ``members`` by descending concurrency
    (then descending max_num_seqs): the first is the one launched."""

    key: Key
    members: tuple[Planned, ...]
    concurrencies: tuple[int, ...]  # one per member

    @property
    def launch(self) -> Planned:
        return self.members[0]

    @property
    def ladder(self) -> tuple[int, ...]:
        """The distinct concurrencies, in the order they are measured (largest first)."""
        return tuple(sorted(set(self.concurrencies), reverse=True))


def relaunch_groups(candidates: Iterable[Planned], target: Target) -> list[RelaunchGroup]:
    """``candidates`` grouped by :func:`relaunch_key`, groups in order of first appearance."""
    found: dict[Key, list[Planned]] = {}
    for planned in candidates:
        found.setdefault(relaunch_key(planned, target), []).append(planned)
    groups = []
    for key, members in found.items():
        ranked = sorted(
            members, key=lambda p: (-concurrency(p, target), -max_num_seqs(p, target), p.name)
        )
        conc = tuple(concurrency(p, target) for p in ranked)
        groups.append(RelaunchGroup(key, tuple(ranked), conc))
    return groups


def screened_group(plan: Plan, target: Target) -> RelaunchGroup | None:
    """The group to screen: the baseline's (vLLM's defaults but max_num_seqs), else the
    first group in the plan's order (best analytic prediction first), among those with at
    least :data:`SCREEN_MIN_LADDER` concurrencies; None when no group has them."""
    groups = relaunch_groups(plan.all(), target)
    groups = [g for g in groups if len(g.ladder) >= SCREEN_MIN_LADDER]
    home = relaunch_key(plan.baseline, target)
    return next((g for g in groups if g.key == home), groups[0] if groups else None)


def screen_values(results: Iterable[ScreenResult]) -> list[ScreenResult]:
    """``results`` with their ``value``: the capacity where the SLO held, else the best
    SLO-meeting capacity at a smaller concurrency, capped at its own (0 when there is none;
    the capacity itself when no point met the SLO: then capacity is all there is)."""
    results = list(results)
    met = [(r.concurrency, r.output_throughput or 0.0) for r in results if r.slo_met]
    out = []
    for r in results:
        own = r.output_throughput or 0.0
        if r.slo_met or not met:
            value = own
        else:
            below = [cap for conc, cap in met if conc <= r.concurrency]
            value = min(own, max(below)) if below else 0.0
        out.append(replace(r, value=value))
    return out


# --- in the search -------------------------------------------------------------------------------


class Screen:
    """The screen of one search (:class:`tuner.search.runner.Search` holds one, and gives
    itself: plan, space, target, settings, runner, store, observer, clock, calibration).
    Runs once, right after the baseline (:meth:`maybe_run`); then orders the untried,
    prunes (:meth:`verdict`), and reports (:meth:`info`)."""

    def __init__(self, search: Any) -> None:
        self.search = search
        self.group: RelaunchGroup | None = None
        self.run: ScreenRun | None = None
        self.results: dict[str, ScreenResult] = {}
        self.pruned: dict[str, Pruned] = {}
        self._asked = False

    def enabled(self, grid: bool) -> bool:
        """``settings.screen`` (None: on unless ``grid``), for the throughput objective, not
        the Pareto study, with at least :data:`SCREEN_MIN_LADDER` max_num_seqs values."""
        settings = self.search.settings
        wanted = settings.screen if settings.screen is not None else not grid
        seqs = self.search.space.values.get("max_num_seqs", ())
        return (
            bool(wanted)
            and settings.objective in SCREEN_OBJECTIVES
            and not settings.pareto
            and len(seqs) >= SCREEN_MIN_LADDER
        )

    def maybe_run(self, done: Mapping[str, TrialRecord], grid: bool) -> list[Pruned]:
        """Screen once, as soon as the baseline is finished (measured now, or read back from
        an earlier run); returns the candidates pruned (nothing when not due or disabled)."""
        s = self.search
        if self._asked or s.plan.baseline.name not in done:
            return []
        self._asked = True
        group = screened_group(s.plan, s.target) if self.enabled(grid) else None
        # The launch is the largest member's trial too, unless that one is measured already.
        measure = None if group is None else screen_measure(s.runner, group.launch.name not in done)
        if measure is None or group is None:
            return []
        saved = ScreenRun.load(s.store.directory, group.launch.name, group.ladder)
        self.group, self.run = group, saved or self._measure(group, measure)
        self._apply(done)
        return list(self.pruned.values())

    def _measure(self, group: RelaunchGroup, measure: Measure) -> ScreenRun:
        s, launch = self.search, group.launch
        variant = s.target.variants[launch.candidate.quantization or "none"]
        ladder = ", ".join(str(c) for c in group.ladder)
        s.observer.on_phase("screen", f"{launch.name}: {ladder} in flight, one launch")
        t0 = s.clock()
        trial = None
        try:
            got, failure = measure(group.members, variant), None
            points = got.points if isinstance(got, ScreenMeasured) else list(got)
            trial = got.trial if isinstance(got, ScreenMeasured) else None
        except ScreenFailed as exc:
            points, failure = exc.points, str(exc)
        interrupt.check()  # a stop request came while it was measured: not a result
        seconds = s.clock() - t0 - (trial.engine_time_s if trial is not None else 0.0)
        run = ScreenRun(launch.name, group.ladder, tuple(points), seconds, failure, trial)
        run.save(s.store.directory)
        return run

    def _apply(self, done: Mapping[str, TrialRecord]) -> None:
        s, group, run = self.search, self.group, self.run
        assert group is not None and run is not None
        by_conc = {p.concurrency: p for p in run.points if p.completed > 0}
        results = []
        for planned, conc in zip(group.members, group.concurrencies, strict=True):
            point = by_conc.get(conc)
            if point is None:
                continue
            figures = {k: getattr(point, k) for k in FIGURES}
            seqs = max_num_seqs(planned, s.target)
            results.append(ScreenResult(planned.name, seqs, conc, **figures, slo_met=point.slo_met))
        self.results = {r.name: r for r in screen_values(results)}
        if any(r.value for r in self.results.values()):
            s.calibration.ranking = self.order
        self.pruned = self._prune(done)
        failure = f" ({run.failure})" if run.failure else ""
        s.observer.on_phase(
            "screen",
            f"{len(run.points)} points in {run.engine_time_s:.0f} s, "
            f"{len(self.pruned)} of {len(group.members)} pruned{failure}",
        )
        s.observer.on_phase("trials")

    def _prune(self, done: Mapping[str, TrialRecord]) -> dict[str, Pruned]:
        """The ``screened`` verdicts on the untried members (never the baseline)."""
        assert self.group is not None
        met = [r for r in self.results.values() if r.slo_met and r.output_throughput]
        if not met:
            return {}
        best = max(met, key=lambda r: r.output_throughput or 0.0)
        bar = best.output_throughput or 0.0
        seqs = max_num_seqs(self.group.launch, self.search.target)
        out = {}
        for planned in self.group.members:
            r = self.results.get(planned.name)
            if r is None or planned.name in done or planned.candidate.is_baseline:
                continue
            if self.launched_trial(planned.name) is not None:
                continue  # measured whole in the screen's launch: its trial decides
            reach = (r.output_throughput or 0.0) * (1.0 + SCREEN_MARGIN)
            if reach >= bar:
                continue
            reason = (
                f"screened capacity {r.output_throughput or 0.0:,.4g} tok/s at {r.concurrency} "
                f"in flight (+{SCREEN_MARGIN:.0%}: {reach:,.4g}) < {best.name}'s {bar:,.4g} "
                f"tok/s under the SLO, in one launch at max_num_seqs {seqs}"
            )
            out[planned.name] = Pruned(planned.candidate, RULE_SCREENED, reason)
        return out

    def verdict(self, planned: Planned) -> Pruned | None:
        """The ``screened`` verdict on ``planned`` (for candidates the sampler proposes)."""
        return self.pruned.get(planned.name)

    def launched_trial(self, name: str) -> TrialRecord | None:
        """The trial of ``name`` measured in the screen's launch (its largest member), which
        the search records as that candidate's trial instead of launching it; None else."""
        trial = self.run.trial if self.run is not None else None
        return trial if trial is not None and trial.name == name else None

    def order(self, untried: list[Planned]) -> list[Planned]:
        """A candidate whose trial ran in the screen's launch first (recording it costs
        nothing: the group's largest max_num_seqs); then by screened value; on a tie, the
        screened candidates that met the SLO, then the others from the smallest concurrency up
        (nearest the boundary where the SLO stops holding at saturation, where the best
        SLO-meeting rate tends to be: on vLLM CPU the rungs that missed it measured from 55 %
        to 145 % of the boundary's value in their own launches, worse the further above);
        then the extrapolated; then the order given."""
        keys = {p.name: self._key(p, i) for i, p in enumerate(untried)}
        return sorted(untried, key=lambda p: keys[p.name])

    def _key(self, planned: Planned, index: int) -> tuple[float, int, int, int]:
        if self.launched_trial(planned.name) is not None:
            return (-math.inf, 0, 0, index)  # measured already, in the screen's launch
        r = self.results.get(planned.name)
        if r is not None and r.value is not None:
            return (-r.value, 0 if r.slo_met else 1, r.concurrency, index)
        return (-self._extrapolated(planned), 2, 0, index)

    def _extrapolated(self, planned: Planned) -> float:
        """Calibrated prediction x (screened value / calibrated prediction) of the screened
        member at the nearest concurrency (in ratio; the larger on a tie)."""
        s, group = self.search, self.group
        assert group is not None
        mine = s.calibration.predict(planned) or planned.predicted_tokens_per_s
        anchors = [r for r in self.results.values() if r.value is not None]
        if not anchors:
            return mine
        conc = concurrency(planned, s.target)
        ref = min(anchors, key=lambda r: (abs(math.log(r.concurrency / conc)), -r.concurrency))
        member = next(p for p in group.members if p.name == ref.name)
        base = s.calibration.predict(member) or member.predicted_tokens_per_s
        return mine * (ref.value or 0.0) / base if base > 0 else mine

    def info(self, done: Mapping[str, TrialRecord]) -> ScreenInfo | None:
        """The record's block, with the faithfulness over the screened candidates that were
        also launched for real; None when no screen ran."""
        if self.run is None or self.group is None:
            return None
        results = []
        for r in sorted(self.results.values(), key=lambda r: -r.concurrency):
            record = done.get(r.name)
            objective = None
            if record is not None and record.state == STATE_COMPLETE:
                objective = finite(record.objective)
            results.append(
                replace(r, real_capacity=probe_capacity(record), real_objective=objective)
            )
        return ScreenInfo(
            launch=self.run.launch,
            launch_max_num_seqs=max_num_seqs(self.group.launch, self.search.target),
            order=ORDER,
            engine_time_s=round(self.run.engine_time_s, 1),
            results=tuple(results),
            pruned=tuple(self.pruned),
            failure=self.run.failure,
            **faithfulness(results),
        )
