"""The TrialRecord of one trial, built in steps as :class:`tuner.search.trial.VllmTrialRunner`
measures it: before the launch (:func:`base_record`), once vLLM answers (:func:`launched_record`),
when the rate search ends (:func:`finished_record`); plus a start failure's JSON. Pure."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from tuner.measure.ratesearch import RateSearchResult
from tuner.plan.prune import Planned, Variant
from tuner.search.record import (
    RULE_EARLY_STOP,
    STATE_COMPLETE,
    STATE_FAILED,
    STATE_PRUNED,
    FinalistSample,
    TrialRecord,
)


def base_record(number: int, planned: Planned, variant: Variant) -> TrialRecord:
    """A trial before its launch: failed until it is finished."""
    cand = planned.candidate
    return TrialRecord(
        name=planned.name,
        knobs=cand.knobs(),
        state=STATE_FAILED,
        number=number,
        baseline=cand.is_baseline,
        variant=variant.name,
        estimate=planned.estimate_json(),
        started_at=now(),
    )


def launched_record(base: TrialRecord, server: Any) -> TrialRecord:
    """``base`` with what the started server reported (its info, log, redacted argv)."""
    assert server.info is not None
    return replace(
        base,
        server_info=server.info.to_json(),
        log_path=str(server.log_path),
        vllm_args=list(server.info.argv),
    )


def finished_record(
    base: TrialRecord,
    result: RateSearchResult,
    again: Sequence[FinalistSample],
    seconds: float,
    objective: Callable[[RateSearchResult], float],
) -> TrialRecord:
    """The record of a rate search that ran to its end (complete, with its in-trial re-runs
    ``again``) or stopped early (pruned, rule early_stop, the probe kept)."""
    if result.stopped_early:
        return replace(
            base,
            state=STATE_PRUNED,
            rate_search=result.to_json(),
            failure={"rule": RULE_EARLY_STOP, "reason": result.reason},
            engine_time_s=seconds,
            finished_at=now(),
        )
    best = None
    if result.best is not None:
        rate = result.best.load.rate
        best = {
            **result.best.summary.to_json(),
            "rate": None if math.isinf(rate) else rate,
            "concurrency": result.best.load.concurrency,
        }
    return replace(
        base,
        state=STATE_COMPLETE,
        objective=objective(result),
        rate_search=result.to_json(),
        best=best,
        engine_time_s=seconds,
        in_trial_runs=[sample.to_json() for sample in again],
        finished_at=now(),
    )


def failure_json(failure: Any) -> dict[str, Any]:
    """An engine failure as the record keeps it (``class``, message, log path...)."""
    data = failure.to_json()
    data["class"] = data.pop("failure_class")
    return data


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
