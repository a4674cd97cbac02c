"""A finalist's re-runs, apart from the server: which load each finalist is re-measured at, the
rounds of re-runs within one launch (with the step down when a run misses the SLO), and which
finalists can share a launch. :class:`tuner.search.trial.VllmTrialRunner` launches vLLM around
:func:`repeat_rounds`; :meth:`tuner.search.runner.Search._finalists` groups by
:func:`launch_key`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import fields, replace
from typing import Any

from tuner.engine.settings import EngineSettings
from tuner.measure.ratesearch import (
    LoadPoint,
    RatePoint,
    RateSearchConfig,
    RateSearchResult,
    measure_held,
)
from tuner.search.record import FinalistSample, TrialRecord
from tuner.specs.gpu import GpuSpec
from tuner.specs.vllm_defaults import vllm_defaults

# Measure one point: (finalist name, load, warm-up requests, offset into the request pool).
MeasurePoint = Callable[[str, LoadPoint, int, int], Awaitable[RatePoint]]
# The objective of a re-run's points (the trial runner's own, latency included).
ValueOf = Callable[[RateSearchResult], float]


def chosen_load(record: TrialRecord) -> LoadPoint | None:
    """The load point the trial's rate search chose (``best_index``); None when it chose none."""
    search = record.rate_search or {}
    index = search.get("best_index")
    if index is None:
        return None
    load = search["points"][index]["load"]
    rate = load.get("rate")
    return LoadPoint(
        math.inf if rate is None else float(rate),
        load.get("concurrency"),
        int(load["num_requests"]),
        load.get("duration_s"),
    )


def trial_sample(record: TrialRecord) -> FinalistSample:
    """The trial's own measurement as a finalist's first sample (its chosen rate)."""
    best = record.best or {}
    rate = best.get("rate")
    concurrency = best.get("concurrency")
    return FinalistSample(
        record.objective or 0.0,
        float(rate) if isinstance(rate, int | float) else None,
        concurrency if type(concurrency) is int else None,
    )


async def repeat_rounds(
    measure: MeasurePoint,
    loads: Mapping[str, LoadPoint],
    repeats: int,
    rate: RateSearchConfig,
    value_of: ValueOf,
    *,
    step: bool = True,
    warmup: int = 0,
    offset: int = 0,
    in_trial: bool = False,
) -> dict[str, list[FinalistSample]]:
    """``repeats`` rounds over ``loads`` (finalist name -> its chosen load), each finalist in
    turn within a round, so that a drift over the launch falls on all of them alike; the first
    point carries ``warmup`` requests. With ``step``, a run that misses the SLO is followed by
    one step down (:func:`~tuner.measure.ratesearch.measure_held`), whose value is that
    repeat's sample when it holds; only a step down that fails too scores as a miss (0 tokens/s).
    Without (the latency objective, measured at its fixed rate) each load is measured once.
    ``offset``: where in the request pool the rounds start (in a trial's launch: past what its
    rate search sent, so that a prefix cache sees new prompts); ``in_trial`` marks the samples."""
    sent = 0
    samples: dict[str, list[FinalistSample]] = {name: [] for name in loads}
    for _ in range(repeats):
        for name, load in loads.items():

            async def at(point: LoadPoint, name: str = name) -> RatePoint:
                nonlocal sent
                extra = warmup if sent == 0 else 0
                measured = await measure(name, point, extra, offset + sent)
                sent += point.num_requests + extra
                return measured

            first, lower = await measure_held(at, load, rate) if step else (await at(load), None)
            held = first if lower is None else lower
            single = RateSearchResult(
                (first,) if lower is None else (first, lower),
                held if held.slo_met else None,
                first.summary.request_throughput,
                "finalist re-run",
            )
            rate_of = None if math.isinf(held.load.rate) else held.load.rate
            samples[name].append(
                FinalistSample(
                    value_of(single),
                    rate_of,
                    held.load.concurrency,
                    step_down=lower is not None,
                    in_trial=in_trial,
                )
            )
    return samples


def contends(value: float, incumbent: float | None, margin: float) -> bool:
    """Whether a trial's ``value`` may still be a finalist: within ``margin`` (the noise) of
    the best so far; always when there is no incumbent (the first trial, the baseline, an
    objective without one)."""
    return incumbent is None or value * (1.0 + margin) >= incumbent


def failed_samples(
    loads: Mapping[str, LoadPoint], repeats: int, objective: str
) -> dict[str, list[FinalistSample]]:
    """What a launch that failed (or a server that died) counts for each finalist: the worst
    value for every repeat (zero throughput, an endless latency), at its chosen load."""
    worst = math.inf if objective == "latency" else 0.0
    return {
        name: [
            FinalistSample(worst, None if math.isinf(load.rate) else load.rate, load.concurrency)
        ]
        * repeats
        for name, load in loads.items()
    }


def launch_key(settings: Any, gpu: GpuSpec) -> Hashable:
    """What decides whether two finalists can share a launch: their effective settings. For
    :class:`EngineSettings`, every typed knob left unset reads as vLLM's default on ``gpu``
    (:mod:`tuner.specs.vllm_defaults`), so vLLM's defaults and a candidate that sets a knob to
    its default value compare equal; the model (the variant's) is part of the settings. Any
    other value (a test's runner) is its own key."""
    if not isinstance(settings, EngineSettings):
        return settings
    defaults = vllm_defaults()
    unset = defaults.knob_values(gpu, settings.tensor_parallel_size or 1)
    if settings.enable_chunked_prefill is False and settings.max_num_batched_tokens is None:
        unset.pop("max_num_batched_tokens")  # vLLM's budget then follows max_model_len
    names = {f.name for f in fields(settings)}
    filled = {k: v for k, v in unset.items() if k in names and getattr(settings, k) is None}
    return replace(settings, **filled)


def launch_groups(
    records: Iterable[TrialRecord], key: Callable[[TrialRecord], Hashable]
) -> list[list[TrialRecord]]:
    """``records`` grouped by ``key`` (:func:`launch_key` of their settings), each group in
    the records' order, groups in the order of their first record."""
    groups: dict[Hashable, list[TrialRecord]] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return list(groups.values())


__all__ = [
    "chosen_load",
    "contends",
    "failed_samples",
    "launch_groups",
    "launch_key",
    "repeat_rounds",
    "trial_sample",
]
