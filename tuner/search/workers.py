"""Several workers on one study (one storage, the same command, each its own ``--out``).

They share the work through the study: a worker skips what another finished, yields a
candidate another one measures (:func:`tuner.search.study.earlier_trial`), and fails what a dead
one left (:func:`tuner.search.study.fail_stale`). Two more rules make both of them end with the
whole study:

- a worker with nothing left to ask while others still measure candidates it has no result
  for waits for them (:func:`wait_for_others`) instead of writing its profile from part of the
  study; if one of them dies, its trial goes stale and its candidate is measured here;
- a finished measurement is never lost (:func:`tell_record`): when another worker failed the
  trial meanwhile (it saw this worker's heartbeat stand still for a grace period: a stopped
  process, a database that did not answer), the record goes into the study as a new trial.

A finished trial also carries what ``optuna-dashboard`` shows a person (:func:`dashboard_attrs`:
candidate, knobs, objective, SLO verdict) beside ``worker``/``worker_id`` (who measured it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

from tuner.search.record import STATE_COMPLETE, TrialRecord
from tuner.search.study import finished_records, measuring_elsewhere

log = logging.getLogger(__name__)

# How often a worker that waits for the others looks again: the delay from the last trial's end
# to the search's end (a study query each time, cheap on a journal file or PostgreSQL).
WAIT_S = 0.5


def wait_for_others(study: Any, done: dict[str, TrialRecord]) -> bool:
    """When other live workers measure candidates missing from ``done``: wait ``WAIT_S``,
    add what the study finished meanwhile to ``done`` and return True (look again); else
    False (nothing to wait for)."""
    if not measuring_elsewhere(study) - set(done):
        return False
    time.sleep(WAIT_S)
    done.update(finished_records(study))
    return True


def dashboard_attrs(record: TrialRecord) -> dict[str, Any]:
    """What a person reads of a measured trial in ``optuna-dashboard``, beside the full
    ``record``: ``candidate``, ``knobs``, ``objective`` (the value measured, None when there is
    none) and ``slo``: ``met`` (the chosen load point met the SLO, or there is none), ``not met``
    (it ran, and no load point met it), ``stopped early`` (its capacity probe could not reach the
    best so far) or ``failed`` (the candidate did not run through)."""
    objective = record.objective
    if objective is not None and not math.isfinite(objective):
        objective = None  # Optuna keeps user attributes as JSON: no infinities
    return {
        "candidate": record.name,
        "knobs": record.knobs,
        "objective": objective,
        "slo": slo_verdict(record),
    }


def slo_verdict(record: TrialRecord) -> str:
    """``met``, ``not met``, ``stopped early`` or ``failed`` (:func:`dashboard_attrs`)."""
    if record.stopped_early:
        return "stopped early"
    if record.state != STATE_COMPLETE:
        return "failed"
    search = record.rate_search or {}
    index, points = search.get("best_index"), search.get("points")
    if type(index) is not int or not isinstance(points, list) or not 0 <= index < len(points):
        return "not met"
    point = points[index]
    return "met" if isinstance(point, dict) and point.get("slo_met", True) else "not met"


def report_probe(trial: Any, value: float) -> None:
    """A trial stopped early reports its probe as its value at step 0 (TPE ranks pruned
    trials by it); not when another worker failed the trial meanwhile (tell_record keeps it)."""
    import optuna

    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        trial.report(value, 0)


def tell_record(study: Any, trial: Any, record: TrialRecord, values: Any) -> None:
    """Keep ``record`` in the study and end ``trial`` with it: complete with ``values``, or
    failed (with its failure class, and whether the environment failed). When the trial was
    failed by another worker meanwhile, the record goes into a new trial instead."""
    import optuna

    attrs: dict[str, Any] = {**dashboard_attrs(record), "record": record.to_json()}
    complete = record.state == STATE_COMPLETE
    # A trial stopped after its capacity probe ends PRUNED, as Optuna's own pruners end one.
    ended = optuna.trial.TrialState.PRUNED if record.stopped_early else optuna.trial.TrialState.FAIL
    if not complete:
        attrs.update(failure_class=record.failure_class, environment=record.environment_failure)
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if complete:
            study.tell(trial, values)
        else:
            study.tell(trial, state=ended)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning(
            "trial %d (%s) was failed by another worker while it was measured; its record is "
            "kept in a new trial",
            trial.number,
            record.name,
        )
        kept = {k: v for k, v in trial.user_attrs.items() if k != "stale"}
        state = optuna.trial.TrialState.COMPLETE if complete else ended
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                values=(values if isinstance(values, list) else [values]) if complete else None,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs={**kept, **attrs, "replaces": trial.number},
            )
        )


__all__ = [
    "WAIT_S",
    "dashboard_attrs",
    "report_probe",
    "slo_verdict",
    "tell_record",
    "wait_for_others",
]
