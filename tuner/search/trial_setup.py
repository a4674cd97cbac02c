"""What every trial of a search shares (:class:`TrialSetup`), apart from the runner that uses it
(:class:`tuner.search.trial.VllmTrialRunner`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.engine.server import LaunchConfig
from tuner.measure.bench import WorkloadSpec
from tuner.measure.ratesearch import RateSearchConfig
from tuner.measure.slo import Slo
from tuner.measure.watch import WatchPlan
from tuner.search.order import EARLY_STOP_MARGIN


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares: workload, SLO, objective, how vLLM starts, and the
    settings fixed for all candidates (e.g. max_model_len, kv_cache_memory_bytes, extra flags)."""

    tokenizer: str
    workload: WorkloadSpec
    launch: LaunchConfig
    log_dir: Path
    slo: Slo | None = None
    objective: str = "throughput"
    latency_rate: float | None = None  # objective "latency": the rate to measure at
    latency_stat: tuple[str, str] = ("tpot", "p95")
    fixed: Mapping[str, Any] = field(default_factory=dict)
    rate: RateSearchConfig = field(default_factory=lambda: RateSearchConfig(concurrency=1))
    endpoint: str = "completions"
    request_timeout_s: float = 120.0
    watch: WatchPlan | None = None  # telemetry and roofline of every point (None: not watched)
    early_stop_margin: float | None = EARLY_STOP_MARGIN  # SearchSettings' (None: no early stop)
    in_trial_repeats: int = 0  # SearchSettings.in_trial_repeats: a contender's re-runs
