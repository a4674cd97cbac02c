"""Running ``vtune search --workers N``: the parent, its children, and how they end (the plan:
:mod:`tuner.search.fleet`).

With one device group the search runs in this process, pinned to it. With more, this process
(the *parent*) opens the study once, then starts one child per group, each the same ``vtune
search`` command with ``--workers 1 --devices <its group>``, its own ``--out`` under ``<profile
dir>/<gpu>.workers/<label>`` and the shared ``--storage`` (default: Optuna's journal file beside
the profile: the processes of one node share it under a file lock). A child
(:func:`run_worker`) runs the trial phase only: no finalist re-runs, no profile, no lease; its
lines reach the console prefixed ``[w0]``. When every child has ended, the parent runs the
search once more on the finished study, as a rerun does: it measures no trial (its time budget
is spent: the children had it), re-measures the finalists once and writes the one profile and
record (:mod:`tuner.search.run`, which takes the study's profile lease, :mod:`tuner.search.lease`).

Ending: a stop request (Ctrl-C, SIGTERM) to the parent reaches every child exactly once (their
pids are kept; children run in their own session, so a terminal's Ctrl-C reaches only the
parent), the parent waits for them to stop their vLLM servers and ends with 128 + the signal.
A child whose parent dies anyway (SIGKILL) gets SIGTERM from the kernel (``PR_SET_PDEATHSIG``).
A child that ends with exit 2 (a user error, an environment failure) stops the others; the
parent repeats its one line and exits 2. A child that dies otherwise (killed) leaves its trial
to the others (it goes stale, :mod:`tuner.search.workers`): the parent warns, and writes the
profile when at least one worker ended normally, i.e. with the whole study.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tuner.engine import interrupt
from tuner.errors import Interrupted
from tuner.search.fleet import (
    PORT_RANGE_ENV,
    FleetPlan,
    Slot,
    WorkerFailed,
    child_args,
    pin,
    storage_line,
)
from tuner.search.prepare import Prepared

PARENT_ENV = "VTUNE_FLEET_PARENT"
STOP_WAIT_S = 60.0  # a stopped child stops its vLLM (10 s grace) and saves what it finished
POLL_S = 0.2
WARMUP_S = 1.0  # how often the parent looks for newly finished trials to fit (Warmup)
log = logging.getLogger(__name__)
RESUME_HINT = "finished trials are saved — rerun the same command to resume"  # as the CLI's
Echo = Callable[..., None]  # click.echo: (text, err=False)


def run_workers(
    prep: Prepared,
    plan: FleetPlan,
    args: Sequence[str],
    echo: Echo,
    imports: Callable[[], None] | None = None,
) -> Prepared:
    """One slot: pin this process to it; returns ``prep``. More: open the study, run one child
    per slot to its end (:class:`Fleet`; meanwhile :class:`Warmup` readies the final run, with
    ``imports``: the caller's modules for it), and return the prep of the parent's own final
    run (the shared storage; no time left for trials). Interrupted, WorkerFailed as the module
    docstring says."""
    if plan.size == 1:
        pin(prep, plan.slots[0])
        return prep
    from tuner.search import study_config
    from tuner.search.prepare import check_storage, storage_for
    from tuner.search.runner import directions
    from tuner.search.study import open_study

    url, _ = storage_line(prep, plan.size)  # the plan screen said it (fleet.describe)
    prep.config = replace(prep.config, storage=url)
    check_storage(prep)  # the --out lock, held until the final run ends; the study created once
    study = open_study(storage_for(prep), prep.study_name, directions(prep.config.settings), None)
    study_config.remember(study, prep, prep.space)
    root = prep.yaml_path.parent / f"{prep.gpu.name}.workers"

    def argv(slot: Slot) -> list[str]:
        out = str(root / slot.label)
        return [sys.executable, "-m", "tuner", "search", *child_args(args, slot, out, url)]

    warmup = Warmup(prep, study, imports)
    warmup.start()
    try:
        ends = Fleet(plan, argv, echo).run()
    finally:
        warmup.done.set()  # on a stop, not waited for: a daemon
    warmup.join()  # what it computes now, the final run would compute anyway
    if all(e.returncode != 0 for e in ends):
        raise WorkerFailed(
            f"every worker died ({', '.join(f'{e.label} {e.how()}' for e in ends)}); finished "
            "trials are kept — rerun the same command to finish"
        )
    for end in ends:
        if end.returncode != 0:
            echo(f"vtune: warning: worker {end.label} {end.how()}; the others took over", err=True)
    settings = replace(prep.config.settings, time_budget_s=0.0)  # the children spent it
    prep.config = replace(prep.config, settings=settings)
    return prep


class Warmup(threading.Thread):
    """While the workers measure, the parent readies its final run: once a trial has finished
    it imports that run's modules, then fits the calibration block's prefixes on the trials
    finished so far (:meth:`tuner.search.calibration.OnlineCalibration.unseen_mape` keeps each
    fit). It saves time after the last trial, which no worker shares: about 1 s of imports and
    1-2 s of fits (48 trials, two busy cores). Best effort: whatever fails here, the final run
    meets again and reports."""

    def __init__(self, prep: Prepared, study: Any, imports: Callable[[], None] | None) -> None:
        super().__init__(name="vtune-warmup", daemon=True)
        self.prep, self.study, self.imports = prep, study, imports
        self.done = threading.Event()

    def run(self) -> None:
        try:
            from tuner.search.study import finished_records

            calibration = None
            seen = 0
            while not self.done.wait(WARMUP_S):
                records = finished_records(self.study)
                if len(records) == seen:
                    continue
                seen = len(records)
                if calibration is None:  # not while the workers start: they import too
                    calibration = self._imported()
                calibration.unseen_mape(records.values())
        except Exception:  # an optimisation only
            log.debug("fleet warm-up failed", exc_info=True)

    def _imported(self) -> Any:
        """Import the final run's modules; the calibration its Search makes."""
        if self.imports is not None:
            self.imports()
        from tuner.search import run as _final_run  # noqa: F401  (its modules, imported)
        from tuner.search.calibration import OnlineCalibration

        return OnlineCalibration(self.prep.target, self.prep.config.settings.objective)


@dataclass(frozen=True)
class WorkerEnd:
    label: str
    returncode: int
    error: str | None

    def how(self) -> str:
        if self.returncode < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-self.returncode).name}"
        return f"ended with exit {self.returncode}"


@dataclass
class _Child:
    slot: Slot
    proc: subprocess.Popen[bytes]
    pumps: list[threading.Thread]
    error: str | None = None
    signalled: bool = False  # the parent sent it its one stop signal


class Fleet:
    """Runs one child per slot (``argv(slot)``, the slot's ports in its environment) to its
    end, their output to ``echo`` line by line, prefixed ``[w0] ``; a child's ``vtune: error``
    line is kept for the parent's own. Returns how each ended (:meth:`run`)."""

    def __init__(self, plan: FleetPlan, argv: Callable[[Slot], list[str]], echo: Echo) -> None:
        self.plan, self.argv, self.echo = plan, argv, echo
        self.children: list[_Child] = []
        self.lock = threading.Lock()

    def run(self) -> list[WorkerEnd]:
        """Start every child and wait for all. A stop request: each child gets it once, they
        are waited for (``STOP_WAIT_S``, then killed), and Interrupted goes on. A child's exit
        2: the others are stopped, then WorkerFailed with its line."""
        interrupt.on_stop(self._forward)
        try:
            for slot in self.plan.slots:
                self._start(slot)
            failed = None
            while any(c.proc.poll() is None for c in self.children):
                failed = failed or next((c for c in self.children if _failed(c)), None)
                if failed is not None:
                    self._signal_all(signal.SIGTERM)
                time.sleep(POLL_S)
        except BaseException as exc:
            with interrupt.shielded():  # a second request must not cut the wait short
                self._signal_all(interrupt.pending() or signal.SIGTERM)
                self._wait_all()
            if isinstance(exc, Interrupted) and not exc.hint:
                exc.hint = RESUME_HINT
            raise
        finally:
            for child in self.children:
                for pump in child.pumps:
                    pump.join(timeout=5)
        failed = next((c for c in self.children if _failed(c)), None)
        if failed is not None:
            raise WorkerFailed(f"worker {failed.slot.label}: {failed.error or 'exit 2'}")
        return [WorkerEnd(c.slot.label, c.proc.returncode, c.error) for c in self.children]

    def _start(self, slot: Slot) -> None:
        env = dict(os.environ)
        env.update(
            {PORT_RANGE_ENV: f"{slot.ports[0]}-{slot.ports[1]}", PARENT_ENV: str(os.getpid())},
            PYTHONUNBUFFERED="1",
        )
        with interrupt.shielded():  # a stop request waits until the pid is known
            proc = subprocess.Popen(
                self.argv(slot),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # the terminal's Ctrl-C reaches the parent only
            )
            child = _Child(slot, proc, [])
            self.children.append(child)
        for stream, err in ((proc.stdout, False), (proc.stderr, True)):
            pump = threading.Thread(target=self._pump, args=(child, stream, err), daemon=True)
            pump.start()
            child.pumps.append(pump)
        interrupt.check()

    def _pump(self, child: _Child, stream: Any, err: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            if err and line.startswith("vtune: error: "):
                child.error = line.removeprefix("vtune: error: ")
                continue  # the parent says it once, as its own line
            if line.startswith("vtune: interrupted"):
                continue  # so does it for a stop
            with self.lock:
                self.echo(f"[{child.slot.label}] {line}", err=err)
        stream.close()

    def _forward(self) -> None:
        """The stop callback (runs in the signal handler): pass the request on, once each."""
        self._signal_all(interrupt.pending() or signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for child in self.children:
            if not child.signalled and child.proc.poll() is None:
                child.signalled = True
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(sig)

    def _wait_all(self) -> None:
        deadline = time.monotonic() + STOP_WAIT_S
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()  # its guard then stops its vLLM (it watches this pid)
                child.proc.wait()


def _failed(child: _Child) -> bool:
    return child.proc.returncode == 2 and not child.signalled


# --- a child -------------------------------------------------------------------------------


def run_worker(prep: Prepared, plan: FleetPlan | None, label: str, echo: Echo) -> None:
    """A fleet's worker (the child): pinned to its slot, it measures trials of the shared
    study until the study has them all, as every worker of a study does
    (:mod:`tuner.search.workers`), then ends: no finalist re-runs, no profile, no lease, no
    calibration block (the parent's final run does those once). Trials are labelled
    ``<host>/<label>`` (so that sibling workers never take each other for a dead run of this
    host)."""
    from tuner.search import study as study_mod
    from tuner.search.calibration import OnlineCalibration
    from tuner.search.events import Fanout
    from tuner.search.prepare import storage_for
    from tuner.search.profile import out_lock
    from tuner.search.run import trial_setup
    from tuner.search.runner import Search, directions, make_sampler, queue_all
    from tuner.search.store import TrialStore
    from tuner.search.study import open_study
    from tuner.search.trial import VllmTrialRunner

    _die_with_parent()
    if plan is not None:
        pin(prep, plan.slots[0])
    study_mod.HOST = f"{socket.gethostname()}/{label}"
    # Finalists: the parent's, once (a contender's in-trial re-runs are the worker's own trial,
    # trial_setup keeps them). No max_num_seqs screen: each worker would launch its own (the
    # screen's result is not shared across workers yet).
    settings = replace(prep.config.settings, repeats=0, screen=False)
    lines = TrialLines(echo)
    observer = Fanout([lines])  # the hooks it does not have are skipped
    with out_lock(prep.yaml_path.parent, prep.gpu.name):
        sampler = make_sampler(settings, queue_all(prep.plan, settings))
        study = open_study(storage_for(prep), prep.study_name, directions(settings), sampler)
        runner = VllmTrialRunner(trial_setup(prep), observer)
        store = TrialStore(prep.work_dir)
        calibration = OnlineCalibration(prep.target, settings.objective, summary=False)
        search = Search(
            study,
            prep.plan,
            prep.space,
            prep.target,
            runner,
            settings,
            store,
            observer,
            calibration=calibration,
        )
        result = search.run()
    echo(f"done: {lines.measured} trials measured here, {len(result.records)} in the study")


def _die_with_parent() -> None:
    """Have the kernel send this worker SIGTERM when its parent dies (Linux); end at once when
    it has died already."""
    parent = os.environ.get(PARENT_ENV)
    with contextlib.suppress(OSError, AttributeError, TypeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if parent and parent.isdigit() and os.getppid() != int(parent):
        raise WorkerFailed("the vtune search that started this worker has ended")


class TrialLines:
    """A worker's observer: one line per trial start and end (the parent prefixes them)."""

    def __init__(self, echo: Echo) -> None:
        self.echo = echo
        self.measured = 0

    def on_trial_start(self, number: int, name: str, knobs: dict[str, Any]) -> None:
        self.echo(f"trial {number} {name}: starting vLLM")

    def on_trial_end(self, trial: Any) -> None:
        self.measured += 1
        failure = (trial.failure or {}).get("class")
        v = trial.objective
        value = "-" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        why = f" ({failure})" if failure else ""
        self.echo(f"trial {trial.number} {trial.name}: {trial.state}{why}, objective {value}")


__all__ = ["Fleet", "TrialLines", "Warmup", "WorkerEnd", "run_worker", "run_workers"]
