"""The analytic picks of a search, handed out one at a time by the calibrated model
(:class:`AnalyticQueue`); :mod:`tuner.search.runner` enqueues them into its study."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tuner.plan.prune import Planned, Pruned
from tuner.search.calibration import OnlineCalibration
from tuner.search.record import STATE_COMPLETE, TrialRecord


class AnalyticQueue:
    """The analytic picks, handed out one at a time so that each is chosen by the model as
    calibrated so far (the search enqueues one whenever its study has none waiting).

    vLLM's defaults come first. A grid (``picks`` None) then hands out every candidate, best
    calibrated prediction first; otherwise ``picks`` candidates in all (measured ones count,
    so a resumed search does not start over), each the best untried one whose prediction
    (3 significant figures) differs from those of the candidates measured so far (a tie only
    when nothing else is left: ``Plan.first_picks``' rule), and then the sampler takes over.
    A candidate the ``calibrated`` rule rules out is never handed out; it is in ``pruned``
    (unless ``prune`` is off: a grid the user asked for measures every candidate).

    Once a screen has measured max_num_seqs (``calibration.ranking`` set), the picks follow
    its order with no distinct-prediction rule: that rule spreads the picks along the model's
    ranking, which the screen has replaced by measurements; what is left to learn is the
    knobs that need a relaunch, best explored at the screened best max_num_seqs."""

    def __init__(
        self,
        baseline: Planned,
        candidates: Iterable[Planned],
        picks: int | None,
        calibration: OnlineCalibration,
        prune: bool = True,
    ) -> None:
        self.baseline, self.picks, self.calibration = baseline, picks, calibration
        self.prune = prune
        self.candidates = [p for p in candidates if p.name != baseline.name]
        self.pruned: list[Pruned] = []
        self._handed: set[str] = set()

    def next(self, done: Mapping[str, TrialRecord], pending: Iterable[str] = ()) -> list[Planned]:
        """The next pick (a list of one), or [] when the queue has nothing more to give."""
        skip = set(done) | set(pending) | self._handed | {p.candidate.name for p in self.pruned}
        if self.baseline.name not in skip:
            return self._hand(self.baseline)
        self.calibration.refit(done.values())
        measured = [r for r in done.values() if r.state != "pruned" and not r.baseline]
        if self.picks is not None and len(measured) >= self.picks:
            return []
        incumbent = _incumbent(done.values())
        untried = [p for p in self.candidates if p.name not in skip]
        judge = self.calibration.prune if self.prune else (lambda p, incumbent: None)
        verdicts = {p.name: judge(p, incumbent) for p in untried}
        self.pruned += [v for v in verdicts.values() if v is not None]
        ranked = self.calibration.order(p for p in untried if verdicts[p.name] is None)
        if not ranked:
            return []
        if self.picks is None or self.calibration.ranking is not None:
            return self._hand(ranked[0])
        by_name = {p.name: p for p in self.candidates}
        seen = {
            _key(self.calibration.predict(by_name[r.name])) for r in measured if r.name in by_name
        }
        distinct = [p for p in ranked if _key(self.calibration.predict(p)) not in seen]
        return self._hand((distinct or ranked)[0])

    def _hand(self, planned: Planned) -> list[Planned]:
        self._handed.add(planned.name)
        return [planned]


def _incumbent(records: Iterable[TrialRecord]) -> TrialRecord | None:
    """The complete trial with the highest objective (the pruning rule's objectives are
    maximised)."""
    complete = [r for r in records if r.state == STATE_COMPLETE and r.objective is not None]
    return max(complete, key=lambda r: r.objective or 0.0, default=None)


def _key(value: float | None) -> str:
    return "?" if value is None else f"{value:.3g}"
