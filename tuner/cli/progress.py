"""A rich progress display for a running search (a SearchObserver)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tuner.cli.tables import num
from tuner.search.record import SearchRecord, TrialRecord


class SearchProgress:
    """Trials bar plus a status line (phase, running candidate, last measured point)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task("trials", total=None, status="planning")

    def __enter__(self) -> SearchProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_plan(self, total_candidates: int, pruned: int, budget: int) -> None:
        self.progress.update(self.task, total=min(total_candidates, budget))

    def on_phase(self, phase: str, detail: str = "") -> None:
        self.progress.update(self.task, description=phase, status=detail[:60])
        if phase == "screen" and detail:  # what the screen launches and finds stays on screen
            self.console.print(f"  screen: {detail}", highlight=False)

    def on_trial_start(self, number: int, name: str, knobs: dict[str, Any]) -> None:
        self.progress.update(self.task, status=f"#{number} {name}: starting vLLM")

    def on_point(self, name: str, point: dict[str, Any]) -> None:
        load, summary = point.get("load", {}), point.get("summary", {})
        rate = load.get("rate")
        where = f"{rate:.3g} req/s" if rate else f"concurrency {load.get('concurrency')}"
        ok = "SLO ok" if point.get("slo_met") else "SLO missed"
        thr = summary.get("output_throughput") or 0.0
        self.progress.update(self.task, status=f"{name}: {where}, {thr:,.0f} tok/s, {ok}")

    def on_trial_end(self, trial: TrialRecord) -> None:
        self.progress.advance(self.task)
        value = num(trial.objective)  # as the final table writes it: 13,856, not 1.386e+04
        failure = (trial.failure or {}).get("class") or (trial.failure or {}).get("rule")
        again = [num(s.value) for s in trial.in_trial_samples]
        self.console.print(
            f"  trial {trial.number} {trial.name}: {trial.state}"
            f"{' (' + failure + ')' if failure else ''}, objective {value}"
            f"{'; re-run in its launch: ' + ', '.join(again) if again else ''}",
            highlight=False,
        )

    def on_finish(self, record: SearchRecord) -> None:
        self.progress.update(self.task, description="done", status=f"best {record.best}")
