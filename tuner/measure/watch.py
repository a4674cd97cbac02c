"""What vtune watches beside each load point: the hardware while it runs (telemetry) and where
the point sits on the roofline (computed from its measured tokens and the analytic model).

* :class:`WatchPlan` is what a whole bench or search shares: telemetry options, the GPU entry
  with the peaks in use (probed or datasheet, :mod:`tuner.specs.peaks`) and the model.
* :meth:`WatchPlan.for_server` / :meth:`WatchPlan.for_url` make a :class:`Watch` for one running
  server: the vLLM process tree to sample (the guard's pid; none for a ``--url`` server), NVML
  on the GPUs it uses, dcgm-exporter when a URL is given, and the roofline's model side from
  the server's own settings (model or quantized variant, quantization, KV dtype, TP size).
* :func:`tuner.measure.bench.measure` starts :meth:`Watch.sampler` before the load, keeps the
  samples inside the measured window (warm-up excluded) and calls :meth:`Watch.roofline` after.

Nothing here raises into a measurement: what cannot be watched is left out with a note.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from tuner.analytic.roofline import Peaks, RooflinePoint, model_roofline_point
from tuner.analytic.weights import resolve_scheme
from tuner.engine.settings import EngineSettings
from tuner.errors import VtuneError
from tuner.load.generator import LoadResult
from tuner.measure.scrape import ServerStats
from tuner.measure.telemetry import DEFAULT_PERIOD_S, SERIES_POINTS, CombinedSource, Sampler
from tuner.measure.telemetry import Source as TelemetrySource
from tuner.specs.gpu import GpuSpec
from tuner.specs.model import ModelSpec, load_model
from tuner.specs.peaks import PeakFigures, with_peaks

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0"})


@dataclass(frozen=True)
class TelemetryOptions:
    """How to sample: every ``period_s`` seconds; dcgm-exporter at ``dcgm_url`` too when
    given; ``series_points`` samples kept per point for the report (evenly downsampled)."""

    period_s: float = DEFAULT_PERIOD_S
    dcgm_url: str | None = None
    series_points: int = SERIES_POINTS


DEFAULT_TELEMETRY = TelemetryOptions()


@dataclass(frozen=True)
class PointRoofline:
    """One point's roofline (:class:`RooflinePoint`), how its batch was found ("server": the
    mean of vLLM's ``num_requests_running``; "client": the mean requests in flight), the
    token-weighted mean context of its decode steps, and the peaks it is measured against."""

    point: RooflinePoint
    batch_source: str
    mean_context: float
    peaks: Peaks
    figures: PeakFigures
    compute_dtype: str

    @property
    def regime(self) -> str:
        return self.point.regime

    def to_json(self) -> dict[str, Any]:
        return {
            **self.point.to_json(),
            "batch_source": self.batch_source,
            "mean_context": self.mean_context,
            "peak_bandwidth_bytes_per_s": self.peaks.bandwidth_bytes_per_s,
            "peak_flops_per_s": self.peaks.flops_per_s,
            "peaks": self.figures.to_json(self.compute_dtype),
        }


@dataclass(frozen=True)
class RooflineModel:
    """The model side of a server's roofline: the model (or variant) it serves, how, and the
    peaks of the ``devices`` serving it together."""

    model: ModelSpec
    peaks: Peaks
    figures: PeakFigures
    compute_dtype: str
    quantization: str | None = None
    kv_cache_dtype: str = "auto"


@dataclass(frozen=True)
class Watch:
    """What to watch on one server. ``root_pid``: the vLLM process tree (None: not ours);
    ``device``: "cpu" or "cuda"; ``gpus``: the NVML devices it uses; ``local_gpus``: whether
    this machine's NVML sees them (False for a remote ``--url``)."""

    telemetry: TelemetryOptions | None = None
    roofline_model: RooflineModel | None = None
    root_pid: int | None = None
    device: str = "cpu"
    gpus: tuple[int | str, ...] | None = None
    local_gpus: bool = True
    notes: tuple[str, ...] = ()

    def sampler(self) -> tuple[Sampler | None, tuple[str, ...]]:
        """A sampler over every source there is to read, and notes on those left out; no
        sampler when telemetry is off or nothing can be read."""
        if self.telemetry is None:
            return None, ()
        sources, notes = self._sources()
        if not sources:
            return None, notes
        source = sources[0] if len(sources) == 1 else CombinedSource(sources)
        return Sampler(source, self.telemetry.period_s), notes

    def _sources(self) -> tuple[list[TelemetrySource], tuple[str, ...]]:
        assert self.telemetry is not None
        sources: list[TelemetrySource] = []
        notes = list(self.notes)
        if self.root_pid is not None:
            from tuner.measure.telemetry_cpu import ProcessTreeSource

            sources.append(ProcessTreeSource(self.root_pid))
        else:
            notes.append("no vLLM process tree (a server vtune did not start): CPU skipped")
        if self.device == "cuda":
            if not self.local_gpus:
                notes.append("the server is not on this machine: NVML skipped (use --dcgm-url)")
            elif not _has_pynvml():
                notes.append("nvidia-ml-py (pynvml) is not installed: NVML skipped")
            else:
                from tuner.measure.telemetry_nvidia import NvmlSource

                sources.append(NvmlSource(self.gpus))
        if self.telemetry.dcgm_url:
            from tuner.measure.telemetry_nvidia import DcgmSource

            sources.append(DcgmSource(self.telemetry.dcgm_url, self.gpus))
        return sources, tuple(notes)

    def roofline(
        self, load: LoadResult, output_tokens_per_s: float, server: ServerStats | None
    ) -> PointRoofline | None:
        """The point's roofline, or None when there is no model side or nothing was decoded."""
        rm = self.roofline_model
        if rm is None:
            return None
        batch, source = mean_batch(load, server)
        context = mean_decode_context(load)
        point = model_roofline_point(
            rm.model,
            rm.peaks,
            output_tokens_per_s=max(0.0, output_tokens_per_s),
            mean_batch=batch,
            mean_context=context,
            quantization=rm.quantization,
            kv_cache_dtype=rm.kv_cache_dtype,
        )
        if point is None:
            return None
        return PointRoofline(point, source, context, rm.peaks, rm.figures, rm.compute_dtype)


@dataclass(frozen=True)
class WatchPlan:
    """What every server of a bench or search is watched with. ``gpu`` carries the peaks in
    use (``figures`` says which); ``model`` is the model at ``model_path`` (a server serving
    another path, a quantized variant, has its own loaded); None leaves the roofline out."""

    telemetry: TelemetryOptions | None = DEFAULT_TELEMETRY
    gpu: GpuSpec | None = None
    figures: PeakFigures | None = None
    model: ModelSpec | None = None
    model_path: str | None = None
    model_error: str | None = None  # why ``model_path`` could not be read (not tried again)

    def for_server(self, server: Any) -> Watch:
        """The watch of a server vtune started (a ``VllmServer``: ``pid``, ``settings``,
        ``launch``); a stand-in without them gets what it has."""
        settings: EngineSettings | None = getattr(server, "settings", None)
        launch = getattr(server, "launch", None)
        device = "cpu"
        if launch is not None:
            device = launch.resolved_device() if hasattr(launch, "resolved_device") else "cpu"
        elif self.gpu is not None and not self.gpu.is_cpu:
            device = "cuda"
        tp = (settings.tensor_parallel_size if settings else None) or 1
        visible = getattr(launch, "cuda_visible_devices", None)
        model, notes = self._roofline_model(settings, tp)
        return Watch(
            telemetry=self.telemetry,
            roofline_model=model,
            root_pid=getattr(server, "pid", None),
            device=device,
            gpus=_gpus(visible, tp) if device == "cuda" else None,
            notes=notes,
        )

    def for_url(self, url: str, tensor_parallel_size: int = 1) -> Watch:
        """The watch of a server someone else runs: no process tree; NVML only when the URL
        is on this machine."""
        device = "cuda" if self.gpu is not None and not self.gpu.is_cpu else "cpu"
        settings = EngineSettings(self.model_path) if self.model_path else None
        model, notes = self._roofline_model(settings, tensor_parallel_size)
        host = (urlparse(url).hostname or "").lower()
        return Watch(
            telemetry=self.telemetry,
            roofline_model=model,
            device=device,
            gpus=_gpus(None, tensor_parallel_size) if device == "cuda" else None,
            local_gpus=host in LOOPBACK,
            notes=notes,
        )

    def _roofline_model(
        self, settings: EngineSettings | None, tp: int
    ) -> tuple[RooflineModel | None, tuple[str, ...]]:
        if self.gpu is None or self.figures is None or settings is None:
            return None, ("no GPU figures or model: roofline skipped",)
        model = self.model
        if settings.model == self.model_path and self.model_error is not None:
            return None, (f"model {settings.model!r} unreadable ({self.model_error}): no roofline",)
        if model is None or settings.model != self.model_path:
            try:
                model = _load(settings.model)
            except VtuneError as exc:
                return None, (f"model {settings.model!r} unreadable ({exc}): no roofline",)
        try:
            scheme = resolve_scheme(model, settings.quantization)
            dtype = scheme.compute_dtype if scheme.compute_dtype in self.gpu.peak_flops else "bf16"
            peaks = Peaks(
                self.gpu.memory_bandwidth * tp, self.gpu.flops_for(dtype) * tp, self.figures.source
            )
        except VtuneError as exc:
            return None, (f"no roofline for this server: {exc}",)
        kv = settings.kv_cache_dtype or "auto"
        return RooflineModel(model, peaks, self.figures, dtype, settings.quantization, kv), ()

    def peaks_json(self) -> dict[str, Any] | None:
        """Which peak figures the roofline uses (``PeakFigures.to_json()``), or None."""
        return None if self.figures is None else self.figures.to_json()


def watch_plan(
    model_path: str | None,
    gpu: GpuSpec | None,
    telemetry: TelemetryOptions | None = DEFAULT_TELEMETRY,
    *,
    use_probe: bool = True,
) -> WatchPlan:
    """The plan for ``model_path`` served on ``gpu`` (a registry entry; None: no roofline),
    with the probed peaks when a probe of that device is cached. A model that cannot be read
    here leaves the roofline out, with a note in each point's telemetry block."""
    if gpu is None:
        return WatchPlan(telemetry, model_path=model_path)
    spec, figures = with_peaks(gpu, use_probe=use_probe)
    model, error = None, None
    if model_path:
        try:
            model = _load(model_path)
        except VtuneError as exc:
            error = str(exc)
    return WatchPlan(telemetry, spec, figures, model, model_path, error)


@functools.lru_cache(maxsize=16)
def _load(path: str) -> ModelSpec:
    return load_model(path)


def _has_pynvml() -> bool:
    try:
        import pynvml  # noqa: F401
    except Exception:
        return False
    return True


def _gpus(visible: str | None, tp: int) -> tuple[int | str, ...]:
    """The first ``tp`` GPUs the server sees: of ``visible`` (a CUDA_VISIBLE_DEVICES value),
    else of this process's CUDA_VISIBLE_DEVICES, else 0..tp-1."""
    from tuner.measure.telemetry_nvidia import cuda_visible_devices

    listed = cuda_visible_devices(
        None if visible is None else {"CUDA_VISIBLE_DEVICES": str(visible)}
    )
    return tuple(listed[:tp]) if listed else tuple(range(tp))


# --- the roofline's inputs from a load -------------------------------------------------------


def mean_batch(load: LoadResult, server: ServerStats | None) -> tuple[float, str]:
    """The point's mean batch and where it came from: the mean of vLLM's
    ``num_requests_running`` over the scrapes inside the window ("server"), else the client's
    mean requests in flight over the window ("client")."""
    if server is not None and server.series:
        span = load.window.duration
        inside = [r for t, _, r, _ in server.series if r is not None and 0 <= t <= span]
        if not inside:
            inside = [r for _, _, r, _ in server.series if r is not None]
        if inside and sum(inside) > 0:
            return sum(inside) / len(inside), "server"
    return client_in_flight(load), "client"


def client_in_flight(load: LoadResult) -> float:
    """Mean requests in flight over the measured window (each request's time inside it)."""
    start, end = load.window.start, load.window.end
    if not end > start:
        return 0.0
    busy = 0.0
    for r in load.records:
        stop = end if r.end is None else min(r.end, end)
        busy += max(0.0, stop - max(r.start, start))
    return busy / (end - start)


def mean_decode_context(load: LoadResult) -> float:
    """Token-weighted mean context of the decode steps of the measured, successful requests:
    the i-th output token of a request with P prompt tokens is decoded at context P + i."""
    tokens = weighted = 0.0
    for r in load.measured:
        if not r.ok:
            continue
        p, o = float(r.prompt_len), float(r.num_output)
        tokens += o
        weighted += p * o + o * (o - 1) / 2
    return weighted / tokens if tokens else 0.0


def telemetry_json(
    telemetry: Any, notes: Sequence[str], options: TelemetryOptions | None
) -> dict[str, Any] | None:
    """A point's ``telemetry`` block: the sampler's statistics and downsampled series, plus
    ``notes`` on what was not sampled; None when telemetry was off."""
    if options is None:
        return None
    if telemetry is None:
        return {"device": None, "period_s": options.period_s, "samples": 0, "notes": list(notes)}
    out: dict[str, Any] = telemetry.to_json(series=max(1, options.series_points))
    out["notes"] = list(notes)
    return out
