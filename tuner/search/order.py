"""What a search measures first and how Optuna samples the rest: the study's settings
(:class:`SearchSettings`), its directions, the sampler, and the trial order (a grid in analytic
order, or the analytic picks and then TPE / NSGA-II). :mod:`tuner.search.runner` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuner.plan.prune import Plan, Planned
from tuner.search.objective import direction, minimized

# Candidates queued in analytic order before the sampler (TPE) takes over.
ANALYTIC_FIRST = 3
# The objectives a capacity probe bounds from above (maximised): early stop applies to them.
EARLY_STOP_OBJECTIVES = ("throughput", "goodput")
# The run-to-run noise of a capacity probe that early stop allows for (15 %).
EARLY_STOP_MARGIN = 0.15


@dataclass(frozen=True)
class SearchSettings:
    """How the study runs. ``budget``: measured trials (the baseline included; finalist
    re-runs not; a trial stopped early counts: it was launched); ``time_budget_s``: wall
    clock for the trial phase. ``early_stop_margin``: a trial whose capacity probe, raised
    by this fraction (the measured run-to-run noise), stays below the best objective so far
    stops there (:class:`tuner.measure.ratesearch.EarlyStop`; objectives throughput and
    goodput, not the Pareto study); None: never. ``finalist_runs``: where the finalists'
    ``repeats`` re-runs are measured: ``in-trial`` (right after a trial's rate search, in its
    own launch, when it is a contender: within the margin of the best so far) or ``relaunch``
    (a fresh launch per finalist after the trials; a finalist without in-trial runs is
    relaunched in either mode)."""

    objective: str = "throughput"
    budget: int | None = None
    time_budget_s: float | None = None
    finalists: int = 3
    repeats: int = 2
    sampler: str = "auto"  # auto | grid | tpe | nsga2
    pareto: bool = False
    seed: int = 0
    early_stop_margin: float | None = EARLY_STOP_MARGIN
    # Screen max_num_seqs inside one launch after the baseline (tuner.search.screen); None:
    # on when a sampler drives the search, off for a grid (which measures everything anyway).
    screen: bool | None = None
    finalist_runs: str = "in-trial"  # in-trial | relaunch

    @property
    def in_trial_repeats(self) -> int:
        """Re-runs a contending trial measures in its own launch (0: none): the finalists'
        ``repeats``, when finalists are re-measured at all and in-trial."""
        if self.finalist_runs != "in-trial" or self.finalists < 2:
            return 0
        return self.repeats

    @property
    def ranks_incumbent(self) -> bool:
        """Whether a trial is given the best objective so far: for early stop, or to decide
        whether it contends (in-trial re-runs); only a maximised single objective has one."""
        single = not self.pareto and self.objective in EARLY_STOP_OBJECTIVES
        return single and (self.early_stop or self.in_trial_repeats > 0)

    @property
    def early_stop(self) -> bool:
        """Whether trials may stop after their capacity probe (see the class docstring)."""
        return (
            self.early_stop_margin is not None
            and not self.pareto
            and self.objective in EARLY_STOP_OBJECTIVES
        )

    @property
    def minimize(self) -> bool:
        """Whether the objective is minimised (its direction: :mod:`tuner.search.objective`)."""
        return minimized(self.objective)


def directions(settings: SearchSettings) -> list[str]:
    """The study's Optuna directions: the objective's, or (output throughput: maximize,
    p95 TPOT: minimize) for the Pareto study."""
    if settings.pareto:
        return ["maximize", "minimize"]
    return [direction(settings.objective)]


def _sampler_kind(settings: SearchSettings, queued_all: bool) -> str:
    if settings.pareto or settings.sampler == "nsga2":
        return "NSGA-II"
    if settings.sampler == "tpe" or not queued_all:
        return "TPE"
    return "random"  # never consulted: every candidate is queued


def make_sampler(settings: SearchSettings, queued_all: bool) -> Any:
    """TPE for large spaces (NSGA-II for the Pareto study); when every candidate is queued
    the sampler is never consulted, which makes the study a grid in analytic order."""
    import optuna

    kind = _sampler_kind(settings, queued_all)
    if kind == "NSGA-II":
        return optuna.samplers.NSGAIISampler(seed=settings.seed)
    if kind == "TPE":
        return optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=4)
    return optuna.samplers.RandomSampler(seed=settings.seed)


def queue_all(plan: Plan, settings: SearchSettings) -> bool:
    """Grid when asked, or when the whole plan fits the budget."""
    if settings.sampler == "grid":
        return True
    if settings.sampler in ("tpe", "nsga2"):
        return False
    return settings.budget is None or len(plan.all()) <= settings.budget


@dataclass(frozen=True)
class TrialOrder:
    """The order a search measures its plan in. ``queued`` are enqueued in this order before
    any sampling (vLLM's defaults first); ``rest`` is left to ``sampler`` ("TPE" or "NSGA-II"),
    which picks among the whole space; for a grid, ``sampler`` is None and ``rest`` empty."""

    queued: tuple[Planned, ...]
    rest: tuple[Planned, ...]
    sampler: str | None

    @property
    def candidates(self) -> list[Planned]:
        return [*self.queued, *self.rest]


def trial_order(plan: Plan, settings: SearchSettings) -> TrialOrder:
    """The one place that decides what runs first: the whole plan in analytic order when it is
    a grid (:func:`queue_all`), else the baseline and ``ANALYTIC_FIRST`` distinct analytic
    picks, then the sampler. The dry run prints it; the search hands the picks out one at a
    time, re-ordered by the model as calibrated on the trials so far
    (:class:`tuner.search.analytic_queue.AnalyticQueue`)."""
    if queue_all(plan, settings):
        return TrialOrder(tuple(plan.all()), (), None)
    first = plan.first_picks(ANALYTIC_FIRST)
    rest = tuple(p for p in plan.all() if p not in first)
    return TrialOrder(tuple(first), rest, _sampler_kind(settings, False))
