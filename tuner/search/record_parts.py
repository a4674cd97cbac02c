"""The parts of a search record (:class:`tuner.search.record.SearchRecord`): the model, the GPU,
the study, the plan, the gain, the variants and the profile, each a frozen dataclass whose
fields are the JSON keys (:class:`CappedEntry` aside: ``from`` / ``to``)."""

from __future__ import annotations

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
