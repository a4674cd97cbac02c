"""The Pareto front of a search (output tokens/s vs p95 TPOT), over the figures the choice uses.

The choice is made on the finalists' re-measured means (:mod:`tuner.search.runner`); a front
drawn from first runs alone can leave the chosen setting off it for no better reason than one
lucky first run. So where the objective *is* output throughput, a re-measured finalist stands on
the front at its mean; every other trial (and p95 TPOT, which the re-runs do not record) at its
first run. The search writes this front into the record and the console recomputes it from a
record with this same function, so old records print the same front as new ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tuner.search.stats import pareto_front
from tuner.search.trial_record import STATE_COMPLETE, Finalist, TrialRecord, finite


@dataclass(frozen=True)
class FrontPoint:
    """One trial on the (throughput, latency) plane; ``on_mean``: its throughput is the mean
    of ``runs`` re-measured runs, not its first run."""

    name: str
    tokens_per_s: float
    p95_tpot_ms: float
    on_mean: bool = False
    runs: int = 1

    def dominates(self, other: FrontPoint) -> bool:
        """At least as good on both axes and better on one."""
        return (
            self.tokens_per_s >= other.tokens_per_s
            and self.p95_tpot_ms <= other.p95_tpot_ms
            and (self.tokens_per_s > other.tokens_per_s or self.p95_tpot_ms < other.p95_tpot_ms)
        )


def front_points(
    trials: Iterable[TrialRecord], finalists: Iterable[Finalist], objective: str | None
) -> list[FrontPoint]:
    """Every complete trial with both figures at its chosen point (``best``), its throughput
    replaced by the finalist mean when the objective is output throughput and it was
    re-measured (more than one sample)."""
    means = {f.name: f for f in finalists if len(f.samples) > 1}
    points = []
    for trial in trials:
        if trial.state != STATE_COMPLETE or not trial.best:
            continue
        thr = finite(trial.best.get("output_throughput"))
        tpot = finite(trial.best.get("p95_tpot_ms"))
        if thr is None or tpot is None:
            continue
        fin = means.get(trial.name) if objective == "throughput" else None
        if fin is not None:
            points.append(FrontPoint(trial.name, fin.mean, tpot, True, len(fin.samples)))
        else:
            points.append(FrontPoint(trial.name, thr, tpot))
    return points


def front(points: list[FrontPoint]) -> list[str]:
    """The names on the front, in the points' order."""
    return pareto_front([(p.name, p.tokens_per_s, p.p95_tpot_ms) for p in points])


def search_front(
    trials: Iterable[TrialRecord], finalists: Iterable[Finalist], objective: str | None
) -> list[str]:
    """The front a search records (:func:`front_points`, then :func:`front`)."""
    return front(front_points(trials, finalists, objective))


def dominating(points: list[FrontPoint], name: str | None) -> list[FrontPoint]:
    """The points that dominate ``name``'s (empty when it is on the front or has no point)."""
    mine = next((p for p in points if p.name == name), None)
    return [] if mine is None else [p for p in points if p.dominates(mine)]
