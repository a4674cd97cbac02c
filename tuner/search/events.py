"""What a running search or bench tells the outside: progress display, Prometheus exporter.

The search calls these hooks; observers must not raise (a broken display or exporter never
stops a tuning job) — :class:`Fanout` enforces that by logging and dropping their errors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

from tuner.search.record import SearchRecord, TrialRecord

log = logging.getLogger(__name__)

PHASES = ("plan", "baseline", "trials", "finalists", "write", "done")


class SearchObserver(Protocol):
    """Hooks a search calls, in this order: on_plan, then per trial on_trial_start,
    on_point (each measured load point), on_trial_end; on_phase at each phase change;
    on_finish with the typed search record (what the profile's JSON holds) at the end."""

    def on_plan(self, total_candidates: int, pruned: int, budget: int) -> None: ...

    def on_phase(self, phase: str, detail: str = "") -> None: ...

    def on_trial_start(self, number: int, name: str, knobs: dict[str, Any]) -> None: ...

    def on_point(self, name: str, point: dict[str, Any]) -> None: ...

    def on_trial_end(self, trial: TrialRecord) -> None: ...

    def on_finish(self, record: SearchRecord) -> None: ...


class Fanout:
    """Calls every observer; an observer's exception is logged and never propagates."""

    def __init__(self, observers: Iterable[Any] = ()) -> None:
        self.observers = [o for o in observers if o is not None]

    def __getattr__(self, hook: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            for obs in self.observers:
                fn = getattr(obs, hook, None)
                if fn is None:
                    continue
                try:
                    fn(*args, **kwargs)
                except Exception as exc:  # observers must never stop a search
                    log.warning("observer %s.%s failed: %s", type(obs).__name__, hook, exc)

        return call
