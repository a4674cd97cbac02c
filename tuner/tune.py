"""``vtune search`` as one function: model and GPU -> plan -> study -> record -> profile.

:func:`prepare` does everything that needs no engine (and fails fast on bad input);
:func:`run_search` runs the study and writes the profile and its record.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuner import __version__
from tuner.bench import WorkloadSpec
from tuner.detect import check_gpu_choice, detect_gpus
from tuner.engine import LaunchConfig
from tuner.errors import ParameterError, VtuneError
from tuner.estimate import CPU_DEFAULT_KV_CACHE_BYTES
from tuner.hardware import GpuSpec, get_gpu
from tuner.model import ModelSpec, load_model
from tuner.profile import profile_paths, slug, write_profile
from tuner.prune import Plan, Target, default_space, plan
from tuner.ratesearch import RateSearchConfig
from tuner.record import SCHEMA, STATE_COMPLETE
from tuner.search import (
    OBJECTIVES,
    Search,
    SearchResult,
    SearchSettings,
    TrialStore,
    directions,
    make_sampler,
    queue_all,
)
from tuner.slo import Slo, parse_slo
from tuner.space import Space, load_space_file, parse_param_overrides
from tuner.study import open_study, redact, storage_url
from tuner.trial import TrialSetup, VllmTrialRunner
from tuner.variants import materialize, plan_variants

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


@dataclass
class TuneOutcome:
    prepared: Prepared
    result: SearchResult
    record: dict[str, Any]
    yaml_path: Path | None


def prepare(cfg: TuneConfig) -> Prepared:
    """Resolve model, GPU, SLO, variants, space and plan; raise VtuneError on bad input."""
    if cfg.settings.objective not in OBJECTIVES:
        raise ParameterError(
            f"unknown objective {cfg.settings.objective!r}; choose from {', '.join(OBJECTIVES)}"
        )
    if cfg.settings.objective == "latency" and not cfg.latency_rate:
        raise ParameterError("--objective latency needs --rate (the load to measure latency at)")
    model = load_model(cfg.model)
    gpu = get_gpu(cfg.gpu)
    warnings = [w for w in [check_gpu_choice(gpu, detect_gpus())] if w]
    slo = parse_slo(cfg.slo) if cfg.slo else None
    yaml_path, json_path = profile_paths(cfg.model, gpu.name, cfg.out)
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
    space = default_space(target, shared_prefix=cfg.workload.prefix_len > 0)
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
    )


def _context_len(workload: WorkloadSpec) -> int:
    """The typical request's context: mean input plus mean output tokens."""
    if workload.dataset is not None:
        return 1024  # ShareGPT-like data: about 1K tokens of context per conversation
    out = workload.output_len
    assert out is not None
    return int((workload.input_len.low + workload.input_len.high) / 2 + (out.low + out.high) / 2)


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


def storage_for(prep: Prepared) -> str:
    """The study's storage URL: ``--storage``, or SQLite beside the profile."""
    path = prep.yaml_path.parent / f"{prep.gpu.name}.study.db"
    return storage_url(prep.config.storage, path)


def check_storage(prep: Prepared) -> None:
    """Open the study once (creating it if new), so an unreachable storage is a one-line error
    before anything starts; StorageError otherwise."""
    open_study(storage_for(prep), prep.study_name, directions(prep.config.settings), None)


def run_search(prep: Prepared, observer: Any = None) -> TuneOutcome:
    """Run (or resume) the study, then write the profile YAML and its JSON record."""
    cfg = prep.config
    started = time.time()
    _materialize_variants(prep, observer)
    url = storage_for(prep)
    sampler = make_sampler(cfg.settings, queue_all(prep.plan, cfg.settings))
    study = open_study(url, prep.study_name, directions(cfg.settings), sampler)
    runner = VllmTrialRunner(trial_setup(prep), observer)
    search = Search(
        study,
        prep.plan,
        prep.space,
        prep.target,
        runner,
        cfg.settings,
        TrialStore(prep.work_dir),
        observer,
    )
    result = search.run()
    observer_call(observer, "on_phase", "write")
    record = build_record(prep, result, url, started)
    yaml_path = None
    if result.best is not None:
        config = profile_config(prep, result)
        record["profile"] = {"path": str(prep.yaml_path), "config": config}
        write_profile(prep.yaml_path, config, profile_header(prep, result, record), record)
        yaml_path = prep.yaml_path
    else:
        from tuner.profile import atomic_write_json

        atomic_write_json(prep.json_path, record)
    observer_call(observer, "on_finish", record)
    observer_call(observer, "on_phase", "done")
    return TuneOutcome(prep, result, record, yaml_path)


def trial_setup(prep: Prepared) -> TrialSetup:
    """How every trial of this search launches vLLM and measures it."""
    cfg = prep.config
    launch = replace(
        cfg.launch, log_dir=prep.work_dir / "logs", device="cpu" if prep.gpu.is_cpu else "cuda"
    )
    return TrialSetup(
        tokenizer=cfg.model,
        workload=cfg.workload,
        launch=launch,
        log_dir=prep.work_dir / "logs",
        slo=prep.slo,
        objective=cfg.settings.objective,
        latency_rate=cfg.latency_rate,
        fixed=fixed_settings(prep),
        rate=RateSearchConfig(
            concurrency=_baseline_seqs(prep, prep.plan.baseline.max_concurrency),
            seconds_per_point=cfg.seconds_per_point,
            iterations=cfg.iterations,
        ),
        endpoint=cfg.endpoint,
    )


def _materialize_variants(prep: Prepared, observer: Any) -> None:
    """Build the variants to be built and apply the quality guard, before any trial; a
    variant the guard drops leaves the space (and the plan) with the reason recorded."""
    variants = prep.target.variants
    if (
        not any(v.source == "built" for v in variants.values())
        and prep.config.max_quality_loss is None
    ):
        return
    observer_call(observer, "on_phase", "plan", "building variants / quality guard")
    kept, figures = materialize(
        variants, prep.gpu, calib=prep.config.calib, max_quality_loss=prep.config.max_quality_loss
    )
    prep.quality = figures
    prep.target = replace(prep.target, variants=kept)
    dropped = [name for name in variants if name not in kept]
    if dropped:
        values = dict(prep.space.values)
        values["quantization"] = tuple(v for v in values.get("quantization", ()) if v in kept)
        prep.space = Space({k: v for k, v in values.items() if v})
    prep.plan = plan(prep.space, prep.target)


def _baseline_seqs(prep: Prepared, fits: float) -> int:
    from tuner.estimate import default_batch_limits

    _, seqs = default_batch_limits(prep.gpu, 1)
    return max(1, min(seqs, math.floor(fits) if fits >= 1 else 1))


def observer_call(observer: Any, hook: str, *args: Any) -> None:
    fn = getattr(observer, hook, None) if observer is not None else None
    if fn is not None:
        fn(*args)


def profile_config(prep: Prepared, result: SearchResult) -> dict[str, Any]:
    """The chosen settings as ``vllm serve --config`` keys (fixed settings included)."""
    from tuner.profile import vllm_config

    best = result.best
    assert best is not None
    variant = prep.target.variants[best.variant]
    model = variant.model
    if Path(model).exists():  # a local directory: absolute, so the profile loads from anywhere
        model = str(Path(model).resolve())
    values: dict[str, Any] = {"model": model}
    if variant.flag:
        values["quantization"] = variant.flag
    settings = fixed_settings(prep)
    settings.update({k: v for k, v in best.knobs.items() if k != "quantization"})
    values.update(settings)
    return vllm_config(values)


def profile_header(prep: Prepared, result: SearchResult, record: dict[str, Any]) -> list[str]:
    best, base = result.best, result.baseline
    assert best is not None
    gain = record.get("gain") or {}
    lines = [
        f"vtune {__version__} profile for {prep.model.name} on {prep.gpu.name} "
        f"(vLLM {record.get('vllm_version') or '?'})",
        f"Load: `vllm serve --config {prep.yaml_path.name}`",
        f"Workload: {json.dumps(prep.config.workload.describe(), sort_keys=True)}",
        f"SLO: {record['slo'] or 'none'}; objective: {prep.config.settings.objective}",
        f"Chosen: {best.name} -> {prep.config.settings.objective} {best.objective:.4g}",
    ]
    if base is not None and base.objective is not None and gain:
        line = f"vLLM defaults: {base.objective:.4g}; gain x{gain.get('ratio') or 0:.3g}"
        if gain.get("ratio_of_finalist_means"):
            line += f" (x{gain['ratio_of_finalist_means']:.3g} on the re-measured means)"
        lines.append(line)
    if result.within_noise:
        lines.append("Note: the best two finalists are within measurement noise of each other.")
    lines.append(f"Trials: {len(result.records)} finished; record: {prep.json_path.name}")
    return lines


def build_record(prep: Prepared, result: SearchResult, url: str, started: float) -> dict[str, Any]:
    """The JSON record beside the profile (schema in tuner.record)."""
    cfg = prep.config
    trials = sorted(result.records.values(), key=lambda r: (r.number is None, r.number or 0))
    versions = [(r.server_info or {}).get("vllm_version") for r in trials]
    vllm_version = next((v for v in versions if v), None)
    base, best = result.baseline, result.best
    gain = None
    if base is not None and best is not None and base.state == STATE_COMPLETE:
        ratio = None
        if base.objective and best.objective is not None:
            ratio = (
                base.objective / best.objective
                if cfg.settings.minimize
                else best.objective / base.objective
            )
        gain = {
            "objective": cfg.settings.objective,
            "baseline": base.objective,
            "best": best.objective,
            "ratio": ratio,
        }
        # Re-measured finalists: the same comparison on the means, which noise moves less.
        means = {f.name: f.mean for f in result.finalists if len(f.samples) > 1}
        if base.name in means and best.name in means and means[base.name] > 0:
            b, m = means[base.name], means[best.name]
            gain["ratio_of_finalist_means"] = b / m if cfg.settings.minimize else m / b
    plan_ = prep.plan
    return {
        "schema": SCHEMA,
        "vtune_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {
            "name": prep.model.name,
            "source": prep.model.source,
            "param_count": prep.model.param_count,
            "attention": prep.model.attention,
        },
        "gpu": {"name": prep.gpu.name, "memory_bytes": prep.gpu.memory_bytes},
        "vllm_version": vllm_version,
        "workload": {**cfg.workload.describe(), "endpoint": cfg.endpoint},
        "slo": str(prep.slo) if prep.slo else None,
        "objective": cfg.settings.objective,
        "study": {
            "name": prep.study_name,
            "storage": redact(url),
            "sampler": cfg.settings.sampler,
            "budget": cfg.settings.budget,
            "elapsed_s": round(time.time() - started, 1),
            "engine_time_s": round(sum(r.engine_time_s for r in trials), 1),
            "finalist_engine_time_s": round(result.finalist_engine_time_s, 1),
        },
        "plan": {
            "space": {k: list(v) for k, v in prep.space.values.items()},
            "space_size": plan_.space_size,
            "candidates": [p.name for p in plan_.all()],
            "pruned": [
                {
                    "name": p.candidate.name,
                    "knobs": p.candidate.knobs(),
                    "rule": p.rule,
                    "reason": p.reason,
                }
                for p in (*plan_.pruned, *result.sampled_pruned)
            ],
            "capped": [
                {"from": c.original.name, "to": c.capped.name, "reason": c.reason}
                for c in plan_.capped
            ],
            "counts_by_rule": plan_.counts_by_rule(),
        },
        "trials": [r.to_json() for r in trials],
        "baseline": base.name if base else None,
        "best": best.name if best else None,
        "finalists": [f.to_json() for f in result.finalists],
        "within_noise": result.within_noise,
        "pareto_front": result.pareto,
        "gain": gain,
        "variants": [
            {
                "name": v.name,
                "model": v.model,
                "flag": v.flag,
                "source": v.source,
                "quality": v.quality,
            }
            for v in prep.target.variants.values()
        ],
        "quality": prep.quality,
        "fixed_settings": fixed_settings(prep),
    }


def ensure_feasible(outcome: TuneOutcome) -> None:
    """A search that found nothing meeting the SLO is a user-visible error (exit 2), raised
    after its record is written so no measurement is lost."""
    if outcome.yaml_path is None:
        raise VtuneError(
            f"no configuration met the SLO; every trial is in {outcome.prepared.json_path}"
        )
