"""The parts of a search record (:class:`tuner.search.record.SearchRecord`): the model, the GPU,
the study, the plan, the gain, the variants, the profile and the cost, each a frozen dataclass whose
fields are the JSON keys (:class:`CappedEntry` aside: ``from`` / ``to``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    name: str | None = None
    source: str | None = None
    param_count: int | None = None
    attention: str | None = None


@dataclass(frozen=True)
class GpuInfo:
    """The GPU entry searched on; ``peaks``: the figures its estimates and rooflines used
    (``PeakFigures.to_json()``: source "probe" or "datasheet", measured_at, ...)."""

    name: str | None = None
    memory_bytes: int | None = None
    peaks: dict[str, Any] | None = None


@dataclass(frozen=True)
class StudyInfo:
    """The Optuna study (storage with any password redacted) and the time it took."""

    name: str | None = None
    storage: str | None = None
    sampler: str | None = None
    budget: int | None = None
    elapsed_s: float | None = None
    engine_time_s: float | None = None
    finalist_engine_time_s: float | None = None


@dataclass(frozen=True)
class PrunedEntry:
    """A candidate the plan (or a sampled trial) ruled out, with the rule and the reason."""

    name: str
    knobs: dict[str, Any]
    rule: str
    reason: str


@dataclass(frozen=True)
class CappedEntry:
    """A candidate kept with max_num_seqs lowered to what fits (JSON keys from / to)."""

    original: str
    capped: str
    reason: str


@dataclass(frozen=True)
class PlanInfo:
    """The space and what pruning made of it. ``candidate_count`` is only set for a /1
    record that listed the kept candidates as a count rather than by name."""

    space: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    space_size: int | None = None
    candidates: tuple[str, ...] = ()
    pruned: tuple[PrunedEntry, ...] = ()
    capped: tuple[CappedEntry, ...] = ()
    counts_by_rule: dict[str, int] = field(default_factory=dict)
    candidate_count: int | None = None

    @property
    def kept(self) -> int | None:
        """Candidates kept after pruning (the baseline included); None when not recorded."""
        return len(self.candidates) if self.candidates else self.candidate_count

    def to_json(self) -> dict[str, Any]:
        names: list[str] | int = list(self.candidates)
        if not names and self.candidate_count is not None:
            names = self.candidate_count  # a /1 record's count, kept rather than lost
        return {
            "space": {k: list(v) for k, v in self.space.items()},
            "space_size": self.space_size,
            "candidates": names,
            "pruned": [asdict(p) for p in self.pruned],
            "capped": [
                {"from": c.original, "to": c.capped, "reason": c.reason} for c in self.capped
            ],
            "counts_by_rule": dict(self.counts_by_rule),
        }


@dataclass(frozen=True)
class Gain:
    """The chosen candidate against vLLM's defaults, as "times better" (above 1: better),
    whichever way the objective goes: on the first runs, and on the re-measured means."""

    objective: str | None
    baseline: float | None
    best: float | None
    ratio: float | None
    ratio_of_finalist_means: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.ratio_of_finalist_means is None:
            del data["ratio_of_finalist_means"]
        return data


@dataclass(frozen=True)
class VariantInfo:
    """A model variant the search could serve (``flag``: vLLM's --quantization value)."""

    name: str
    model: str | None = None
    flag: str | None = None
    source: str | None = None
    quality: dict[str, Any] | None = None


@dataclass(frozen=True)
class ProfileInfo:
    """The profile YAML written for the chosen candidate: its path and its vLLM keys."""

    path: str | None
    config: dict[str, Any]


@dataclass(frozen=True)
class CalibrationInfo:
    """The analytic model's online calibration over a search (``tuner.search.calibration``).

    ``factors``: the Efficiency fields fitted to every measured load point, as fractions of
    ``peaks`` (``memory_bandwidth`` B/s and ``bf16`` FLOP/s per device: the figures the
    search's estimates used, probed or datasheet); ``prior``: where the fit started;
    ``fitted``: the factors the points determined. ``mape_before`` / ``mape_after`` (%): error
    on trials the model had not yet seen (each trial's points predicted by the plan's
    uncalibrated model, and by the fit to the trials before it); ``fit_mape_before`` /
    ``fit_mape_after``: the same two models on every point, the fit having seen them all.
    None where there was too little to say."""

    factors: dict[str, float]
    peaks: dict[str, float] = field(default_factory=dict)
    prior: dict[str, float] = field(default_factory=dict)
    fitted: tuple[str, ...] = ()
    points_used: int = 0
    trials_used: int = 0
    mape_before: float | None = None
    mape_after: float | None = None
    fit_mape_before: float | None = None
    fit_mape_after: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["fitted"] = list(self.fitted)
        return data


@dataclass(frozen=True)
class CostInfo:
    """The chosen configuration's measured output throughput per GPU and, when the search was
    given a price, per million output tokens (built by :func:`tuner.search.cost.cost_info`;
    the arithmetic is :mod:`tuner.analytic.cost`).

    ``output_tokens_per_s``: one replica's measured SLO-meeting output tokens/s (``source``:
    ``"finalist mean"`` when the chosen candidate was re-measured, else ``"trial"``);
    ``gpus_per_replica``: tensor x pipeline parallel size (1 on cpu); ``at``: the chosen
    candidate; ``usd_per_1m_output_tokens``: ``gpus x price x 1e6 / (tokens/s x 3600)``, None
    without a ``gpu_hour_price`` (USD per GPU-hour)."""

    gpus_per_replica: int
    output_tokens_per_s: float
    output_tokens_per_s_per_gpu: float
    gpu_hour_price: float | None = None
    usd_per_1m_output_tokens: float | None = None
    at: str | None = None
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostInfo | None:
        """The block as written; None when its GPU count or throughputs are not positive
        numbers (nothing to say), optional figures that are not numbers read as None."""

        def number(key: str) -> float | None:
            value = data.get(key)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return float(value) if ok and math.isfinite(value) else None

        gpus, total, per_gpu = (
            data.get("gpus_per_replica"),
            number("output_tokens_per_s"),
            number("output_tokens_per_s_per_gpu"),
        )
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
            return None
        if total is None or per_gpu is None or total <= 0 or per_gpu <= 0:
            return None
        text = {k: None if data.get(k) is None else str(data[k]) for k in ("at", "source")}
        return cls(
            gpus,
            total,
            per_gpu,
            number("gpu_hour_price"),
            number("usd_per_1m_output_tokens"),
            **text,
        )


@dataclass(frozen=True)
class ScreenResult:
    """One candidate as the max_num_seqs screen saw it (:mod:`tuner.search.screen`): a closed
    loop of ``concurrency`` requests (its max_num_seqs, capped to what the KV cache holds) on
    the screen's one launch. ``output_throughput`` (tokens/s) is its screened capacity;
    ``slo_met`` whether the SLO held at that closed loop; ``value`` the screen's estimate of
    its objective (the capacity where the SLO held, else the best SLO-meeting capacity at a
    smaller concurrency, never above its own). ``real_capacity`` / ``real_objective``: its own
    launch's closed-loop probe (output tokens/s) and objective, when the search launched it."""

    name: str
    max_num_seqs: int | None
    concurrency: int
    output_throughput: float | None = None
    request_throughput: float | None = None
    p95_ttft_ms: float | None = None
    p95_tpot_ms: float | None = None
    slo_met: bool = False
    value: float | None = None
    real_capacity: float | None = None
    real_objective: float | None = None

    @classmethod
    def from_json(cls, data: Any) -> ScreenResult | None:
        """The entry as written; None for anything that is not an entry."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        conc, seqs = data.get("concurrency"), data.get("max_num_seqs")
        if type(conc) is not int:
            return None
        numbers = {
            k: _number(data.get(k))
            for k in (
                "output_throughput",
                "request_throughput",
                "p95_ttft_ms",
                "p95_tpot_ms",
                "value",
                "real_capacity",
                "real_objective",
            )
        }
        seqs = seqs if type(seqs) is int else None
        return cls(data["name"], seqs, conc, slo_met=data.get("slo_met") is True, **numbers)


@dataclass(frozen=True)
class ScreenInfo:
    """The max_num_seqs screen (:mod:`tuner.search.screen`): one launch of ``launch`` (its
    relaunch group's largest max_num_seqs, ``launch_max_num_seqs``), closed loops at each
    candidate's concurrency, ``order`` they ran in; ``engine_time_s``: the launch and its
    points; ``results`` per screened candidate; ``pruned``: the candidates the ``screened``
    rule ruled out; ``failure``: why the screen measured nothing usable (None: it did).

    Faithfulness, over the screened candidates the search also launched for real
    (``compared`` of them): ``spearman_capacity`` (rank correlation of screened and real
    closed-loop capacity), ``spearman_objective`` (screened value vs real objective),
    ``capacity_mape`` / ``capacity_bias`` (%: mean absolute and mean signed error of the
    screened capacity against the real one). None with fewer than 3 (1 for the errors)."""

    launch: str
    launch_max_num_seqs: int | None = None
    order: str = "largest first"
    engine_time_s: float = 0.0
    results: tuple[ScreenResult, ...] = ()
    pruned: tuple[str, ...] = ()
    failure: str | None = None
    compared: int = 0
    spearman_capacity: float | None = None
    spearman_objective: float | None = None
    capacity_mape: float | None = None
    capacity_bias: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["results"] = [asdict(r) for r in self.results]
        data["pruned"] = list(self.pruned)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScreenInfo | None:
        """The block as written; None without a launch name. Entries that are not entries
        are left out, figures that are not numbers read as None."""
        if not isinstance(data.get("launch"), str):
            return None
        raw = data.get("results") if isinstance(data.get("results"), list) else []
        results = tuple(r for r in map(ScreenResult.from_json, raw) if r is not None)
        pruned = data.get("pruned") if isinstance(data.get("pruned"), list) else []
        seqs, compared = data.get("launch_max_num_seqs"), data.get("compared")
        failure = data.get("failure")
        return cls(
            data["launch"],
            seqs if type(seqs) is int else None,
            str(data.get("order") or "largest first"),
            _number(data.get("engine_time_s")) or 0.0,
            results,
            tuple(str(n) for n in pruned),
            None if failure is None else str(failure),
            compared if type(compared) is int else 0,
            _number(data.get("spearman_capacity")),
            _number(data.get("spearman_objective")),
            _number(data.get("capacity_mape")),
            _number(data.get("capacity_bias")),
        )


def _number(value: Any) -> float | None:
    """A finite JSON number as a float; None for anything else."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None
