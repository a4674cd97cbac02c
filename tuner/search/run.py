"""``vtune search``'s run: build the variants, run (or resume) the study, write the profile
and its record. :func:`tuner.search.prepare.prepare` comes first."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from tuner.measure.ratesearch import RateSearchConfig
from tuner.plan.prune import feasible_concurrency, plan
from tuner.plan.space import Space
from tuner.quant.variants import materialize
from tuner.search.outcome import TuneOutcome, build_record, profile_config, profile_header
from tuner.search.prepare import Prepared, fixed_settings, storage_for
from tuner.search.profile import write_profile
from tuner.search.record_parts import ProfileInfo
from tuner.search.runner import Search, directions, make_sampler, queue_all
from tuner.search.store import TrialStore
from tuner.search.study import open_study
from tuner.search.trial import TrialSetup, VllmTrialRunner
from tuner.specs.vllm_defaults import vllm_defaults


def run_search(prep: Prepared, observer: Any = None) -> TuneOutcome:
    """Run (or resume) the study, then write the profile YAML and its JSON record
    (``SearchRecord.to_json()``); observers' ``on_finish`` gets the typed record."""
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
        record = replace(record, profile=ProfileInfo(str(prep.yaml_path), config))
        header = profile_header(prep, result, record)
        write_profile(prep.yaml_path, config, header, record.to_json())
        yaml_path = prep.yaml_path
    else:
        from tuner.files import atomic_write_json

        atomic_write_json(prep.json_path, record.to_json())
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
    """The baseline's load: vLLM's default max_num_seqs, capped to what the KV cache holds."""
    _, seqs = vllm_defaults().batch_limits(prep.gpu)
    return feasible_concurrency(seqs, fits)


def observer_call(observer: Any, hook: str, *args: Any) -> None:
    fn = getattr(observer, hook, None) if observer is not None else None
    if fn is not None:
        fn(*args)
