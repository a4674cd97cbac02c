"""``vtune search``, before any engine starts: resolve model, GPU, SLO, variants, space and
plan from a :class:`TuneConfig`, and fail fast (one line) on bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuner.analytic.estimate import CPU_DEFAULT_KV_CACHE_BYTES
from tuner.engine.server import LaunchConfig
from tuner.errors import ParameterError
from tuner.measure.bench import WorkloadSpec
from tuner.measure.slo import Slo, parse_slo
from tuner.measure.watch import DEFAULT_TELEMETRY, TelemetryOptions, WatchPlan
from tuner.plan.prune import Plan, Target, default_space, plan
from tuner.plan.space import Space, load_space_file, parse_param_overrides
from tuner.plan.variants import plan_variants
from tuner.search.profile import profile_paths, release_out_lock, slug, take_out_lock
from tuner.search.runner import (
    OBJECTIVES,
    SearchSettings,
    directions,
)
from tuner.search.study import open_study, storage_url
from tuner.specs.detect import gpu_choice_warnings
from tuner.specs.gpu import GpuSpec, get_gpu
from tuner.specs.model import ModelSpec, load_model
from tuner.specs.peaks import PeakFigures, with_peaks

# Rough per-launch start-up for the dry-run's time estimate (seen: 25-70 s on 2 CPU cores).


STARTUP_ESTIMATE_S = {"cpu": 60.0, "gpu": 120.0}


@dataclass(frozen=True)
class TuneConfig:
    """Everything ``vtune search`` needs, validated before any engine starts."""

    model: str
    gpu: str
    workload: WorkloadSpec
    settings: SearchSettings = field(default_factory=SearchSettings)
    slo: str | None = None
    params: tuple[str, ...] = ()
    space_file: Path | None = None
    max_model_len: int | None = None
    kv_cache_memory_bytes: int | None = None
    engine_args: tuple[tuple[str, Any], ...] = ()  # fixed for every candidate
    variants: tuple[tuple[str, str], ...] = ()  # (name, checkpoint path or hub id)
    build_variants: tuple[str, ...] = ()  # methods to build: awq, gptq
    max_quality_loss: float | None = None  # percent perplexity increase allowed
    calib: str | None = None  # calibration texts for building and the quality guard
    storage: str | None = None
    out: Path | None = None
    endpoint: str = "completions"
    seconds_per_point: float = 10.0
    iterations: int = 3
    latency_rate: float | None = None
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    telemetry: TelemetryOptions | None = DEFAULT_TELEMETRY  # None: no telemetry sampled
    gpu_hour_price: float | None = None  # USD per GPU-hour: the record's $/1M output tokens


@dataclass
class Prepared:
    """The resolved inputs: what a dry run prints and a real run measures."""

    config: TuneConfig
    model: ModelSpec
    gpu: GpuSpec
    slo: Slo | None
    target: Target
    space: Space
    plan: Plan
    warnings: list[str]
    study_name: str
    yaml_path: Path
    json_path: Path
    work_dir: Path
    quality: list[dict[str, Any]] = field(default_factory=list)
    peaks: PeakFigures | None = None  # the figures in ``gpu``: probed or datasheet

    def estimated_seconds(self) -> float:
        """Launch + the rate search's points, per trial (the baseline included), plus finalist
        relaunches; an upper bound rather than a promise."""
        cfg, settings = self.config, self.config.settings
        trials = len(self.plan.all())
        if settings.budget is not None:
            trials = min(trials, settings.budget)
        points = 1 if self.slo is None else 2 + cfg.iterations
        startup = STARTUP_ESTIMATE_S["cpu" if self.gpu.is_cpu else "gpu"]
        per_trial = startup + points * cfg.seconds_per_point
        finals = min(settings.finalists, trials) if settings.repeats else 0
        per_final = startup + settings.repeats * cfg.seconds_per_point
        return trials * per_trial + finals * per_final


def prepare(cfg: TuneConfig) -> Prepared:
    """Resolve model, GPU, SLO, variants, space and plan; raise VtuneError on bad input."""
    if cfg.settings.objective not in OBJECTIVES:
        raise ParameterError(
            f"unknown objective {cfg.settings.objective!r}; choose from {', '.join(OBJECTIVES)}"
        )
    price = cfg.gpu_hour_price
    if price is not None and not (0 < price < math.inf):
        raise ParameterError(f"--gpu-hour-price must be a positive number, got {price}")
    if cfg.settings.objective == "latency" and not cfg.latency_rate:
        raise ParameterError("--objective latency needs --rate (the load to measure latency at)")
    model = load_model(cfg.model)
    gpu, peaks = with_peaks(get_gpu(cfg.gpu))  # the probed figures when a probe is cached
    warnings = gpu_choice_warnings(gpu)
    slo = parse_slo(cfg.slo) if cfg.slo else None
    yaml_path, json_path = profile_paths(cfg.model, gpu.name, cfg.out)
    check_out_dir(yaml_path.parent)
    variants = plan_variants(
        cfg.model,
        model,
        gpu,
        checkpoints=cfg.variants,
        build=cfg.build_variants,
        variants_dir=yaml_path.parent / "variants",
    )
    kv_bytes = cfg.kv_cache_memory_bytes
    if kv_bytes is None and gpu.is_cpu:
        kv_bytes = CPU_DEFAULT_KV_CACHE_BYTES
    target = Target(
        gpu,
        variants,
        context_len=_context_len(cfg.workload),
        max_model_len=cfg.max_model_len,
        kv_cache_memory_bytes=kv_bytes,
    )
    overrides: dict[str, tuple[Any, ...]] = {}
    if cfg.space_file is not None:
        overrides.update(load_space_file(cfg.space_file))
    overrides.update(parse_param_overrides(cfg.params))
    space = default_space(target, shared_prefix=cfg.workload.shares_prefixes)
    space = space.with_overrides(overrides)
    bad = [v for v in space.values.get("quantization", ()) if v not in variants]
    if bad:
        raise ParameterError(
            f"quantization variant(s) {', '.join(map(str, bad))} not defined; "
            f"known: {', '.join(variants)} (add one with --variant NAME=PATH)"
        )
    the_plan = plan(space, target)
    name = study_name(cfg, model, gpu, space, slo)
    work_dir = yaml_path.parent / f"{gpu.name}.study" / name.rsplit("-", 1)[-1]
    return Prepared(
        cfg,
        model,
        gpu,
        slo,
        target,
        space,
        the_plan,
        warnings,
        name,
        yaml_path,
        json_path,
        work_dir,
        peaks=peaks,
    )


def check_out_dir(directory: Path) -> None:
    """Fail with one line (ParameterError) when ``directory`` (the profile's, under ``--out``)
    cannot be created or written: a file in the way, no permission. Creates nothing (a dry run
    runs it too); the search creates the directory when it takes the lock."""
    path = directory
    while not path.exists():
        if path.is_symlink():  # a dangling link: mkdir would fail on it
            raise ParameterError(
                f"cannot create --out directory {directory}: {path} is a broken link"
            )
        if path.parent == path:
            break
        path = path.parent
    if not path.is_dir():
        raise ParameterError(
            f"cannot create --out directory {directory}: {path} is a file, not a directory"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        what = "write to" if path == directory else "create"
        raise ParameterError(f"cannot {what} --out directory {directory}: no permission on {path}")


def _context_len(workload: WorkloadSpec) -> int:
    """The typical request's context: mean input plus mean output tokens."""
    return workload.context_len()


def study_name(
    cfg: TuneConfig, model: ModelSpec, gpu: GpuSpec, space: Space, slo: Slo | None
) -> str:
    """Stable across reruns of the same command (so they resume), different when anything
    that changes the measurements changes."""
    key = json.dumps(
        {
            "model": cfg.model,
            "gpu": gpu.name,
            "space": {k: list(v) for k, v in sorted(space.values.items())},
            "workload": cfg.workload.describe(),
            "slo": str(slo) if slo else None,
            "objective": cfg.settings.objective,
            "pareto": cfg.settings.pareto,
            "fixed": sorted(cfg.engine_args),
            "max_model_len": cfg.max_model_len,
            "kv": cfg.kv_cache_memory_bytes,
            "endpoint": cfg.endpoint,
            "latency_rate": cfg.latency_rate,
            "spp": cfg.seconds_per_point,
            "it": cfg.iterations,
        },
        sort_keys=True,
        default=str,
    )
    return f"vtune-{slug(cfg.model)}-{gpu.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def fixed_settings(prep: Prepared) -> dict[str, Any]:
    """Settings every candidate runs with (and the profile keeps)."""
    fixed: dict[str, Any] = dict(prep.config.engine_args)
    if prep.config.max_model_len:
        fixed["max_model_len"] = prep.config.max_model_len
    if prep.target.kv_cache_memory_bytes is not None:
        fixed["kv_cache_memory_bytes"] = prep.target.kv_cache_memory_bytes
    return fixed


SEARCH_SERIES_POINTS = 60  # telemetry samples kept per load point in the record


def watch_for(prep: Prepared) -> WatchPlan:
    """How every trial's load points are watched: the search's telemetry options (at most
    :data:`SEARCH_SERIES_POINTS` samples kept per point) and the roofline against ``prep.gpu``'s
    peaks."""
    options = prep.config.telemetry
    if options is not None:
        options = replace(options, series_points=min(options.series_points, SEARCH_SERIES_POINTS))
    return WatchPlan(options, prep.gpu, prep.peaks, prep.model, prep.config.model)


def storage_for(prep: Prepared) -> str:
    """The study's storage URL: ``--storage``, or SQLite beside the profile."""
    path = prep.yaml_path.parent / f"{prep.gpu.name}.study.db"
    return storage_url(prep.config.storage, path)


def check_storage(prep: Prepared) -> None:
    """Take the ``--out`` lock (held until :func:`tuner.search.run.run_search` ends: a second
    search on the directory ends here, at once, with one line), then open the study once
    (creating it if new), so an unreachable storage is a one-line error before anything starts;
    StorageError otherwise."""
    lock = take_out_lock(prep.yaml_path.parent, prep.gpu.name)
    try:
        open_study(storage_for(prep), prep.study_name, directions(prep.config.settings), None)
    except BaseException:
        release_out_lock(lock)
        raise
