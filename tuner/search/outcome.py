"""What a finished search leaves: the record, the profile's settings and header, the verdict."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner import __version__
from tuner.engine.settings import redact_settings
from tuner.errors import VtuneError
from tuner.search.cost import cost_info, cost_line
from tuner.search.objective import gain_ratio
from tuner.search.prepare import Prepared, fixed_settings
from tuner.search.record import STATE_COMPLETE, SearchRecord
from tuner.search.record_parts import (
    CappedEntry,
    Gain,
    GpuInfo,
    ModelInfo,
    PlanInfo,
    PrunedEntry,
    StudyInfo,
    VariantInfo,
)
from tuner.search.runner import SearchResult
from tuner.search.study import redact


@dataclass
class TuneOutcome:
    """A finished search: its inputs, the loop's result, the record written beside the profile
    (what the console and the exporter read), and the profile (None: nothing met the SLO; then
    ``stale`` is where an earlier search's profile was moved, if there was one)."""

    prepared: Prepared
    result: SearchResult
    record: SearchRecord
    yaml_path: Path | None
    stale: Path | None = None


def profile_config(prep: Prepared, result: SearchResult) -> dict[str, Any]:
    """The chosen settings as ``vllm serve --config`` keys (fixed settings included)."""
    from tuner.plan.space import Candidate
    from tuner.plan.variants import serving_values
    from tuner.search.profile import vllm_config

    best = result.best
    assert best is not None
    variant = prep.target.variants[best.variant]
    values = serving_values(fixed_settings(prep), Candidate(**best.knobs), variant)
    if Path(variant.model).exists():  # a local directory: absolute, so the profile loads anywhere
        values["model"] = str(Path(variant.model).resolve())
    return vllm_config(values)


def profile_header(prep: Prepared, result: SearchResult, record: SearchRecord) -> list[str]:
    """The profile's comment lines: what it is, how to load it, the workload, the SLO, the
    choice and its gain, the measured tokens/s per GPU (and $/1M output tokens when the search
    was given a price), and the record it belongs to."""
    best, base = result.best, result.baseline
    assert best is not None
    gain = record.gain
    lines = [
        f"vtune {__version__} profile for {prep.model.name} on {prep.gpu.name} "
        f"(vLLM {record.vllm_version or '?'})",
        f"Load: `vllm serve --config {prep.yaml_path.name}`",
        f"Workload: {json.dumps(prep.config.workload.describe(), sort_keys=True)}",
        f"SLO: {record.slo or 'none'}; objective: {prep.config.settings.objective}",
        f"Chosen: {best.name} -> {prep.config.settings.objective} {best.objective:.4g}",
    ]
    if base is not None and base.objective is not None and gain is not None:
        line = f"vLLM defaults: {base.objective:.4g}; gain x{gain.ratio or 0:.3g}"
        if gain.ratio_of_finalist_means:
            line += f" (x{gain.ratio_of_finalist_means:.3g} on the re-measured means)"
        lines.append(line)
    if record.cost is not None:
        lines.append(cost_line(record.cost))
    if result.within_noise:
        lines.append("Note: the best two finalists are within measurement noise of each other.")
    # The record's creation time ties this profile to the record beside it (one run wrote both).
    lines.append(
        f"Trials: {len(result.records)} finished; record: {prep.json_path.name} "
        f"(created {record.created_at})"
    )
    return lines


def build_record(prep: Prepared, result: SearchResult, url: str, started: float) -> SearchRecord:
    """The record of a finished search (written beside the profile as ``to_json()``); the one
    place a search record is built. The gain is "times better" in the objective's direction;
    the cost block (:func:`tuner.search.cost.cost_info`) is the chosen candidate's measured
    tokens/s per GPU and, with ``--gpu-hour-price``, $/1M output tokens."""
    cfg = prep.config
    objective = cfg.settings.objective
    trials = sorted(result.records.values(), key=lambda r: (r.number is None, r.number or 0))
    versions = [(r.server_info or {}).get("vllm_version") for r in trials]
    vllm_version = next((v for v in versions if v), None)
    base, best = result.baseline, result.best
    gain = None
    if base is not None and best is not None and base.state == STATE_COMPLETE:
        # Re-measured finalists: the same comparison on the means, which noise moves less.
        means = {f.name: f.mean for f in result.finalists if len(f.samples) > 1}
        on_means = None
        if base.name in means and best.name in means and means[base.name] > 0:
            on_means = gain_ratio(objective, means[best.name], means[base.name])
        gain = Gain(
            objective=objective,
            baseline=base.objective,
            best=best.objective,
            ratio=gain_ratio(objective, best.objective, base.objective),
            ratio_of_finalist_means=on_means,
        )
    plan_ = prep.plan
    return SearchRecord(
        vtune_version=__version__,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model=ModelInfo(
            name=prep.model.name,
            source=prep.model.source,
            param_count=prep.model.param_count,
            attention=prep.model.attention,
        ),
        gpu=GpuInfo(
            name=prep.gpu.name,
            memory_bytes=prep.gpu.memory_bytes,
            peaks=None if prep.peaks is None else prep.peaks.to_json(),
        ),
        vllm_version=vllm_version,
        workload={**cfg.workload.describe(), "endpoint": cfg.endpoint},
        slo=str(prep.slo) if prep.slo else None,
        objective=objective,
        study=StudyInfo(
            name=prep.study_name,
            storage=redact(url),
            sampler=cfg.settings.sampler,
            budget=cfg.settings.budget,
            elapsed_s=round(time.time() - started, 1),
            engine_time_s=round(sum(r.engine_time_s for r in trials), 1),
            finalist_engine_time_s=round(result.finalist_engine_time_s, 1),
        ),
        plan=PlanInfo(
            space={k: tuple(v) for k, v in prep.space.values.items()},
            space_size=plan_.space_size,
            candidates=tuple(p.name for p in plan_.all()),
            pruned=tuple(
                PrunedEntry(p.candidate.name, p.candidate.knobs(), p.rule, p.reason)
                for p in (*plan_.pruned, *result.sampled_pruned)
            ),
            capped=tuple(
                CappedEntry(c.original.name, c.capped.name, c.reason) for c in plan_.capped
            ),
            counts_by_rule=plan_.counts_by_rule(),
        ),
        trials=tuple(trials),
        baseline=base.name if base else None,
        best=best.name if best else None,
        finalists=tuple(result.finalists),
        within_noise=result.within_noise,
        pareto_front=tuple(result.pareto),
        gain=gain,
        variants=tuple(
            VariantInfo(name=v.name, model=v.model, flag=v.flag, source=v.source, quality=v.quality)
            for v in prep.target.variants.values()
        ),
        quality=tuple(prep.quality),
        fixed_settings=redact_settings(fixed_settings(prep)),
        calibration=result.calibration,
        screen=result.screen,
        cost=cost_info(
            objective,
            best,
            result.finalists,
            fixed_settings(prep),
            on_cpu=prep.gpu.is_cpu,
            gpu_hour_price=cfg.gpu_hour_price,
        ),
    )


def ensure_feasible(outcome: TuneOutcome) -> None:
    """A search that found nothing meeting the SLO is a user-visible error (exit 2), raised
    after its record is written so no measurement is lost."""
    if outcome.yaml_path is None:
        stale = outcome.stale
        moved = f" (the earlier profile is now {stale.name}, not to be deployed)" if stale else ""
        raise VtuneError(
            f"no configuration met the SLO; every trial is in {outcome.prepared.json_path}{moved}"
        )
