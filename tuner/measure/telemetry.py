"""Telemetry beside one load point: what the device (or the host's CPUs) did while it ran.

A :class:`Sampler` reads a :class:`Source` in a background thread every ``period_s`` seconds
(default 0.1 s) and, when stopped, reduces the readings to a :class:`Telemetry`: mean, median
and maximum per key, the number of samples, and the errors counted on the way. It is a context
manager around the load::

    with Sampler(ProcessTreeSource(server_pid)) as sampler:  # or NvmlSource([0, 1])
        result = await run_load(...)
    telemetry = sampler.result.between(result.window.start, result.window.end)

Contract: the sampler never raises into the load. A source that fails to start, a reading that
fails, a process that vanishes mid-reading: each is counted in ``Telemetry.errors`` (the last
message in ``last_error``) and sampling goes on. Times are ``time.perf_counter()`` seconds, the
clock of the load generator's :class:`~tuner.load.generator.Window`.

Sources: :class:`~tuner.measure.telemetry_cpu.ProcessTreeSource` (psutil over the vLLM process
tree: vLLM's CPU build), :mod:`tuner.measure.telemetry_nvidia` (NVML, dcgm-exporter), and here
:class:`CombinedSource`, several read as one.

Keys: each reading is a flat ``{key: value}``. Totals have plain names (``cpu_percent_total``,
``gpu_util_percent``); a per-part value (one process, one GPU) is ``"<part>/<key>"``, e.g.
``"EngineCore_0[4242]/cpu_percent"`` or ``"gpu1/power_w"`` (see :data:`PART_SEP`). Statistics
of a key are over the samples that hold it, so a process that starts late is averaged over its
own lifetime.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

DEFAULT_PERIOD_S = 0.1
PART_SEP = "/"
"""Separates a part (a process, a GPU) from the metric in a per-part key: ``gpu0/power_w``."""
SERIES_POINTS = 200
"""Default number of series points ``Telemetry.to_json(series=True)`` keeps (for the report)."""

Sample = tuple[float, dict[str, float]]
"""One reading: ``perf_counter`` time and values."""


class Source(Protocol):
    """Something to sample. ``device`` names what is measured ("cpu", "cuda:0,1").

    ``start`` is called once in the sampler thread before the first ``read`` (prime counters,
    open handles); ``read`` returns the values now; ``close`` releases what ``start`` took. Any
    of them may raise: the sampler counts the error. ``read`` may also report partial failures
    through ``errors()`` (the messages since the last call) without losing the other values.
    """

    device: str

    def start(self) -> None: ...

    def read(self) -> dict[str, float]: ...

    def errors(self) -> list[str]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Telemetry:
    """What a sampler saw over one load point (all statistics per key; see the module doc)."""

    device: str
    period_s: float
    samples: int
    mean: dict[str, float]
    p50: dict[str, float]
    max: dict[str, float]
    series: list[Sample] = field(default_factory=list, repr=False)
    errors: int = 0
    last_error: str | None = None

    @classmethod
    def from_series(
        cls,
        device: str,
        period_s: float,
        series: Sequence[Sample],
        errors: int = 0,
        last_error: str | None = None,
    ) -> Telemetry:
        """Summarise a series: mean, median and max of each key over the samples holding it."""
        columns: dict[str, list[float]] = {}
        for _, values in series:
            for key, value in values.items():
                columns.setdefault(key, []).append(value)
        return cls(
            device=device,
            period_s=period_s,
            samples=len(series),
            mean={k: statistics.fmean(v) for k, v in columns.items()},
            p50={k: statistics.median(v) for k, v in columns.items()},
            max={k: max(v) for k, v in columns.items()},
            series=list(series),
            errors=errors,
            last_error=last_error,
        )

    def between(self, start: float, end: float) -> Telemetry:
        """The same telemetry restricted to samples taken in ``[start, end]`` (perf_counter
        seconds, e.g. the load's measurement window, which leaves out the warm-up)."""
        kept = [s for s in self.series if start <= s[0] <= end]
        return Telemetry.from_series(self.device, self.period_s, kept, self.errors, self.last_error)

    @property
    def totals(self) -> dict[str, float]:
        """Means of the whole-device keys (those without a part prefix)."""
        return {k: v for k, v in self.mean.items() if PART_SEP not in k}

    @property
    def parts(self) -> dict[str, dict[str, float]]:
        """Means of the per-part keys, by part: ``{"gpu0": {"power_w": 412.0, ...}, ...}``."""
        out: dict[str, dict[str, float]] = {}
        for key, value in self.mean.items():
            part, sep, metric = key.rpartition(PART_SEP)
            if sep:
                out.setdefault(part, {})[metric] = value
        return out

    def to_json(self, *, series: bool | int = False) -> dict[str, Any]:
        """``{device, period_s, samples, errors, last_error, mean, p50, max}``; with ``series``
        (True for :data:`SERIES_POINTS`, or a number of points) also ``series``: a list of
        ``[seconds since the first sample, {total key: value}]``, evenly downsampled."""
        out: dict[str, Any] = {
            "device": self.device,
            "period_s": self.period_s,
            "samples": self.samples,
            "errors": self.errors,
            "last_error": self.last_error,
            "mean": self.mean,
            "p50": self.p50,
            "max": self.max,
        }
        if series:
            points = SERIES_POINTS if series is True else int(series)
            out["series"] = downsample_series(self.series, points)
        return out


def downsample_series(series: Sequence[Sample], points: int) -> list[list[Any]]:
    """At most ``points`` evenly spaced samples (first and last kept), as
    ``[seconds since the first sample, {total key: value}]`` (per-part keys left out)."""
    if not series or points <= 0:
        return []
    n = len(series)
    if n <= points:
        picks = list(range(n))
    elif points == 1:
        picks = [0]
    else:
        picks = sorted({round(i * (n - 1) / (points - 1)) for i in range(points)})
    t0 = series[0][0]
    return [
        [
            round(series[i][0] - t0, 4),
            {k: v for k, v in series[i][1].items() if PART_SEP not in k},
        ]
        for i in picks
    ]


class Sampler:
    """Reads ``source`` every ``period_s`` seconds in a daemon thread between ``start()`` and
    ``stop()`` (or a ``with`` block). Ticks are on a fixed schedule from the start; a tick
    missed because a reading was slow is skipped, not queued. The first reading is one period
    after the start (so rate counters such as CPU percent have an interval behind them).
    Never raises from ``start``, ``stop`` or the thread."""

    def __init__(
        self,
        source: Source,
        period_s: float = DEFAULT_PERIOD_S,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not period_s > 0:
            raise ValueError(f"sampling period must be positive, got {period_s}")
        self.source = source
        self.period_s = period_s
        self._clock = clock
        self._series: list[Sample] = []
        self._errors = 0
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: Telemetry | None = None

    def start(self) -> Sampler:
        """Start sampling in the background (once); returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vtune-telemetry", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> Telemetry:
        """Stop, wait for the thread (at most ``timeout_s``), and return the result. A thread
        stuck in a reading is left behind (it is a daemon) and counted as an error."""
        if self._result is not None:
            return self._result
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._fail(f"sampler thread did not stop within {timeout_s:g} s")
        series = list(self._series)  # a stuck thread may still append: take a copy
        self._result = Telemetry.from_series(
            self.source.device, self.period_s, series, self._errors, self._last_error
        )
        return self._result

    @property
    def result(self) -> Telemetry:
        """The result after ``stop()`` (or the ``with`` block); a snapshot while running."""
        if self._result is not None:
            return self._result
        return Telemetry.from_series(
            self.source.device,
            self.period_s,
            list(self._series),
            self._errors,
            self._last_error,
        )

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the thread ----------------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        self._errors += 1
        self._last_error = message

    def _run(self) -> None:
        try:
            self.source.start()
        except Exception as exc:
            self._fail(f"telemetry source {self.source.device} did not start: {_describe(exc)}")
            self._close()
            return
        t0 = self._clock()
        tick = 1
        while not self._stop.wait(max(0.0, t0 + tick * self.period_s - self._clock())):
            try:
                values = self.source.read()
                now = self._clock()
                self._series.append((now, values))
            except Exception as exc:
                now = self._clock()
                self._fail(_describe(exc))
            with contextlib.suppress(Exception):
                for message in self.source.errors():
                    self._fail(message)
            # Next tick strictly after now: a slow reading skips ticks instead of bunching up.
            tick = max(tick + 1, int((now - t0) / self.period_s) + 1)
        self._close()

    def _close(self) -> None:
        try:
            self.source.close()
        except Exception as exc:
            self._fail(f"closing telemetry source: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- sources ----------------------------------------------------------------------------------


class CombinedSource:
    """Several sources read as one (e.g. NVML and dcgm-exporter): values merged in order, a
    later source's key wins. A source that fails to start is dropped with its error reported;
    one failing reading is reported and the others still count."""

    def __init__(self, sources: Iterable[Source], device: str | None = None) -> None:
        self.sources = list(sources)
        self.device = device or ",".join(s.device for s in self.sources)
        self._pending: list[str] = []

    def start(self) -> None:
        kept = []
        for source in self.sources:
            try:
                source.start()
                kept.append(source)
            except Exception as exc:
                self._pending.append(f"telemetry source {source.device}: {_describe(exc)}")
        if not kept and self.sources:
            raise RuntimeError("; ".join(self._pending))
        self.sources = kept

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for source in self.sources:
            try:
                out |= source.read()
            except Exception as exc:
                self._pending.append(_describe(exc))
            with contextlib.suppress(Exception):
                self._pending.extend(source.errors())
        return out

    def errors(self) -> list[str]:
        pending, self._pending = self._pending, []
        return pending

    def close(self) -> None:
        for source in self.sources:
            with contextlib.suppress(Exception):
                source.close()


def sample_mapping(values: Mapping[str, float], part: str) -> dict[str, float]:
    """``values`` as per-part keys of ``part``: ``{"power_w": 1}`` -> ``{"gpu0/power_w": 1}``."""
    return {f"{part}{PART_SEP}{key}": value for key, value in values.items()}
