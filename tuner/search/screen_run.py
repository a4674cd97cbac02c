"""What a max_num_seqs screen measures (:mod:`tuner.search.screen` decides with it): one
launch, a closed loop at each concurrency (:func:`vllm_screen`, :class:`ScreenPoint`), saved
for a resumed search (:class:`ScreenRun`); and how faithful it was (:func:`faithfulness`):
Spearman's rank correlation (:func:`spearman`) and the capacity error of the screened figures
against the real launches of the same candidates (:func:`probe_capacity`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuner.engine.server import ServerStartError
from tuner.files import atomic_write_json, read_json
from tuner.measure.ratesearch import LoadPoint, RatePoint
from tuner.measure.session import ServerDied, launched, run_watched
from tuner.plan.prune import Planned, Variant
from tuner.search.record import TrialRecord, finite
from tuner.search.record_parts import ScreenResult
from tuner.search.requests_failed import RequestsFailed
from tuner.search.trial import WARMUP_REQUESTS

# --- measuring -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScreenPoint:
    """One closed loop of ``concurrency`` requests in flight on the screen's launch."""

    concurrency: int
    output_throughput: float | None
    request_throughput: float | None
    p95_ttft_ms: float | None
    p95_tpot_ms: float | None
    slo_met: bool
    completed: int = 0
    failed: int = 0

    @classmethod
    def of(cls, point: RatePoint) -> ScreenPoint:
        summary = point.summary.to_json()
        return cls(
            concurrency=int(point.load.concurrency or 0),
            output_throughput=finite(summary.get("output_throughput")),
            request_throughput=finite(summary.get("request_throughput")),
            p95_ttft_ms=finite(summary.get("p95_ttft_ms")),
            p95_tpot_ms=finite(summary.get("p95_tpot_ms")),
            slo_met=point.slo_met,
            completed=int(point.summary.completed),
            failed=int(point.summary.failed),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScreenPoint:
        return cls(
            int(data["concurrency"]),
            *(finite(data.get(k)) for k in FIGURES),
            slo_met=data.get("slo_met") is True,
            completed=int(data.get("completed") or 0),
            failed=int(data.get("failed") or 0),
        )


FIGURES = ("output_throughput", "request_throughput", "p95_ttft_ms", "p95_tpot_ms")


class ScreenFailed(Exception):
    """The screen's launch failed to start or died; ``points`` are those measured before."""

    def __init__(self, message: str, points: Sequence[ScreenPoint] = ()) -> None:
        super().__init__(message)
        self.points = list(points)


@dataclass(frozen=True)
class ScreenMeasured:
    """A screen's points and, when its launch was also the launched candidate's trial (its
    rate search in the same launch, after the rungs), that trial's record."""

    points: list[ScreenPoint]
    trial: TrialRecord | None = None


# What measures a screen: the group (members[0] is launched), the variant -> one point per
# distinct concurrency (and the launched candidate's trial, when it ran one). A runner may
# bring its own as ``runner.screen``.
Measure = Callable[[Sequence[Planned], Variant], "list[ScreenPoint] | ScreenMeasured"]


def screen_measure(runner: Any, trial: bool = False) -> Measure | None:
    """``runner.screen`` when it has one; :func:`vllm_screen` for a runner that launches vLLM
    (``VllmTrialRunner``), with the launched candidate's ``trial`` in the same launch; None
    for anything else (no screen)."""
    own = getattr(runner, "screen", None)
    if callable(own):
        return own
    if all(hasattr(runner, a) for a in ("_point", "_concurrency", "engine_settings", "setup")):
        return lambda group, variant: vllm_screen(runner, group, variant, trial)
    return None


def vllm_screen(
    runner: Any, group: Sequence[Planned], variant: Variant, trial: bool = True
) -> ScreenMeasured:
    """Launch ``group[0]`` once and measure a closed loop (``seconds_per_point`` long) at each
    member's concurrency, largest first, with the trial runner's own load point
    (``VllmTrialRunner._point``: same request pool, warm-up, SLO verdict, telemetry). With
    ``trial`` (and a runner that has ``trial_in_launch``), ``group[0]``'s own trial follows in
    the same launch: the launch a trial of it would have cost is spent once. ScreenFailed
    (with the points before) when the server does not start or dies; a trial whose every
    request failed is left out (the screen stands)."""
    launch, setup = group[0], runner.setup
    ladder = sorted({runner._concurrency(p) for p in group}, reverse=True)
    settings = runner.engine_settings(launch.candidate, variant)
    log_path = setup.log_dir / f"screen-{launch.name[:100]}.log"
    points: list[ScreenPoint] = []
    ran: list[TrialRecord] = []
    with_trial = trial and hasattr(runner, "trial_in_launch")

    async def measure_all(server: Any, stop: Any) -> None:
        offset = 0
        for i, conc in enumerate(ladder):
            warmup = WARMUP_REQUESTS if i == 0 else 0
            n = max(setup.rate.min_requests, 2 * conc)  # as the capacity probe sizes its set
            load = LoadPoint(math.inf, conc, n, setup.rate.seconds_per_point)
            point = await runner._point(server, "screen", load, warmup, offset, stop)
            offset += n + warmup
            points.append(ScreenPoint.of(point))
        if with_trial:
            with contextlib.suppress(RequestsFailed):
                ran.append(await runner.trial_in_launch(server, launch, variant, stop, offset))

    try:
        with launched(settings, setup.launch, log_path=log_path) as server:
            run_watched(server, lambda stop: measure_all(server, stop))
    except ServerStartError as exc:
        raise ScreenFailed(f"{launch.name} did not start: {exc.failure}", points) from None
    except ServerDied as died:
        raise ScreenFailed(f"{launch.name} died: {died.failure or 'crashed'}", points) from None
    return ScreenMeasured(points, ran[0] if ran else None)


@dataclass(frozen=True)
class ScreenRun:
    """What one screen measured (saved, so that a resumed search does not measure it again)."""

    launch: str
    ladder: tuple[int, ...]
    points: tuple[ScreenPoint, ...]
    engine_time_s: float  # the launch and the rungs (a trial in it counts its own time)
    failure: str | None = None
    trial: TrialRecord | None = None  # the launched candidate's trial in this launch

    def save(self, directory: Path) -> None:
        data = {**asdict(self), "points": [asdict(p) for p in self.points]}
        data["trial"] = None if self.trial is None else self.trial.to_json()
        atomic_write_json(directory / "screen" / f"{self.launch}.json", data)

    @classmethod
    def load(cls, directory: Path, launch: str, ladder: tuple[int, ...]) -> ScreenRun | None:
        """The saved screen of ``launch`` over ``ladder``; None when there is none."""
        path = directory / "screen" / f"{launch}.json"
        if not path.exists():
            return None
        data = read_json(path)
        if tuple(data.get("ladder") or ()) != ladder:
            return None  # another plan's screen: measure this one
        points = tuple(ScreenPoint.from_json(p) for p in data.get("points") or ())
        failure = data.get("failure")
        trial = data.get("trial")
        return cls(
            launch,
            ladder,
            points,
            float(data.get("engine_time_s") or 0.0),
            None if failure is None else str(failure),
            TrialRecord.from_json(trial) if isinstance(trial, dict) else None,
        )


# --- faithfulness --------------------------------------------------------------------------------


def probe_capacity(record: TrialRecord | None) -> float | None:
    """Output tokens/s of a trial's capacity probe (its first closed-loop point); None when
    it has none (not launched, or failed before)."""
    for point in record.points if record is not None else ():
        load = point.get("load") if isinstance(point.get("load"), dict) else {}
        if load.get("rate") is None and load.get("concurrency"):
            summary = point.get("summary") if isinstance(point.get("summary"), dict) else {}
            return finite(summary.get("output_throughput"))
    return None


def faithfulness(results: Iterable[ScreenResult]) -> dict[str, Any]:
    """``compared``, ``spearman_capacity``, ``spearman_objective`` (3 pairs at least),
    ``capacity_mape`` and ``capacity_bias`` (%, 1 at least) of screened against real."""
    results = list(results)
    cap = [
        (r.output_throughput, r.real_capacity)
        for r in results
        if r.output_throughput is not None and r.real_capacity
    ]
    obj = [(r.value, r.real_objective) for r in results if r.value is not None]
    obj = [(v, real) for v, real in obj if real is not None]
    errors = [screened / real - 1.0 for screened, real in cap]
    return {
        "compared": len(cap),
        "spearman_capacity": _rounded(spearman(*zip(*cap, strict=True)) if len(cap) >= 3 else None),
        "spearman_objective": _rounded(
            spearman(*zip(*obj, strict=True)) if len(obj) >= 3 else None
        ),
        "capacity_mape": _pct(sum(abs(e) for e in errors) / len(errors)) if errors else None,
        "capacity_bias": _pct(sum(errors) / len(errors)) if errors else None,
    }


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation of paired ``xs`` and ``ys``; None when it is undefined
    (fewer than 2 pairs, or one side constant). scipy's when installed, else the same figure
    computed here."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None
    try:
        from scipy.stats import spearmanr  # optional: vtune does not depend on scipy
    except ImportError:
        pass
    else:
        value = float(spearmanr(xs, ys)[0])
        return value if math.isfinite(value) else None
    # Pearson's correlation of the ranks, tied values sharing their mean rank (scipy's rule).
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else None


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values getting the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _pct(fraction: float) -> float:
    return round(100.0 * fraction, 2)
