"""What a search measures again, and when it stops instead of going on.

A trial is *finished* when it was measured, or failed as a property of its candidate (OOM at
its settings, an option vLLM rejects or cannot run): the next run skips it. Everything else
runs again on the next run:

- a trial cut short by a stop request (:class:`tuner.errors.Interrupted`): told FAIL with
  ``interrupted: true`` (:func:`abandon`) and not saved;
- a trial whose worker died: its heartbeat goes stale, another worker (or the next run) fails
  it and queues its candidate again (:func:`stale_candidates`);
- a trial that failed for the environment (``TrialRecord.environment_failure``: vLLM not found,
  a start-up timeout, a port in use, memory taken, the guard killed, every request refused):
  told FAIL with ``environment: true``, not saved as a trial file. When that happens to the
  baseline, or to two measured trials in a row, the search stops at once with one line
  (:func:`environment_stop`): the next candidates would meet the same machine.
"""

from __future__ import annotations

from typing import Any

from tuner.engine import interrupt
from tuner.search.record import TrialRecord


def abandon(study: Any, trial: Any) -> None:
    """The run ends (a stop request, an error) before ``trial`` finished: fail it as
    interrupted, so that its candidate is neither finished nor pending and runs again. Never
    raises (the trial may be finished already, or the storage may be what failed)."""
    import optuna

    with interrupt.shielded():
        try:
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        except Exception:
            pass


def stale_candidates(study: Any, numbers: list[int]) -> list[str]:
    """The candidates of the trials ``numbers`` (failed as stale), in trial order."""
    wanted = set(numbers)
    if not wanted:
        return []
    trials = study.get_trials(deepcopy=False)
    names = [t.user_attrs.get("candidate") for t in trials if t.number in wanted]
    return [str(n) for n in names if n]


def environment_stop(record: TrialRecord, in_a_row: int) -> str:
    """The one line that stops a search on an environment failure."""
    failure = record.failure or {}
    message = " ".join(str(failure.get("message") or "no message").split())[:300]
    which = "the baseline (vLLM's defaults)" if record.baseline else f"{in_a_row} trials in a row"
    log = failure.get("log_path") or record.log_path or "none"
    return (
        f"the environment failed, not the candidate ({record.failure_class or 'failed'} in "
        f"{which}; trial {record.number}, {record.name}): {message}; log: {log}. Fix it and "
        "rerun: finished trials are kept, this one is measured again"
    )


__all__ = ["abandon", "environment_stop", "stale_candidates"]
