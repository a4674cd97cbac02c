"""The search record: one typed record per finished search, and the JSON beside every profile.

This is the contract between the search (which builds it: ``tuner.search.outcome.build_record``)
and everything that reads it: the console, ``vtune report``, the Prometheus exporter, ``vtune
deploy``, and anyone analysing a study later. Readers use the typed attributes, never the
JSON; the JSON field names (:meth:`SearchRecord.to_json`) are the public contract and
``SCHEMA`` changes when a field changes meaning. Load-point summaries inside trials keep
``vllm bench serve``'s field names and stay dicts; figures aggregated over a trial's points
(peak KV usage, preemptions) are properties of :class:`TrialRecord`
(:mod:`tuner.search.trial_record`), computed there only.

* ``vtune.search/2`` (written now): every field present, None where not known; ``profile``
  only when a profile was written, ``gain.ratio_of_finalist_means`` only when the finalists
  were re-measured, ``calibration`` (the model's fitted factors and its error before/after,
  :class:`~tuner.search.record_parts.CalibrationInfo`) only from vtune versions that calibrate,
  ``cost`` (the chosen configuration's tokens/s per GPU and $/1M output tokens,
  :class:`~tuner.search.record_parts.CostInfo`) only from vtune versions that compute it,
  ``screen`` (the max_num_seqs screen's figures and its faithfulness,
  :class:`~tuner.search.record_parts.ScreenInfo`) only when the search screened. A trial
  stopped after its capacity probe is state ``pruned`` with ``failure.rule`` ``early_stop``
  (its probe kept in ``rate_search``); a finalist's ``runs`` (each sample's load and whether
  it was a step down) are absent from records of vtune versions before them.
* ``vtune.search/1`` (vtune 0.1): the same names, but any field may be missing, ``model`` and
  ``gpu`` may hold more keys (ignored), and ``plan.candidates`` may be a count, not names.

:meth:`SearchRecord.from_json` and :func:`load_record` read both and turn anything else (not
a JSON object, another schema, a list where an object belongs) into one ``ParameterError`` line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tuner.errors import ParameterError
from tuner.search.record_parts import (
    CalibrationInfo,
    CappedEntry,
    CostInfo,
    Gain,
    GpuInfo,
    ModelInfo,
    PlanInfo,
    ProfileInfo,
    PrunedEntry,
    ScreenInfo,
    StudyInfo,
    VariantInfo,
)
from tuner.search.trial_record import (
    RULE_EARLY_STOP,
    STATE_COMPLETE,
    STATE_FAILED,
    STATE_PRUNED,
    Finalist,
    FinalistSample,
    TrialRecord,
    finite,
)

__all__ = [
    "READABLE_SCHEMAS",
    "RULE_EARLY_STOP",
    "SCHEMA",
    "STATE_COMPLETE",
    "STATE_FAILED",
    "STATE_PRUNED",
    "Finalist",
    "FinalistSample",
    "SearchRecord",
    "TrialRecord",
    "finite",
    "load_record",
]

SCHEMA = "vtune.search/2"
READABLE_SCHEMAS = ("vtune.search/1", SCHEMA)


@dataclass(frozen=True)
class SearchRecord:
    """A finished search: what ran, every trial, the choice and its gain over vLLM's defaults.

    ``workload`` is the workload's description (``WorkloadSpec.describe()`` plus the endpoint),
    ``quality`` the quality guard's figures per variant, ``fixed_settings`` the vLLM settings
    every candidate ran with; ``baseline`` and ``best`` are trial names.
    """

    trials: tuple[TrialRecord, ...] = ()
    vtune_version: str | None = None
    created_at: str | None = None
    model: ModelInfo = field(default_factory=ModelInfo)
    gpu: GpuInfo = field(default_factory=GpuInfo)
    vllm_version: str | None = None
    workload: dict[str, Any] = field(default_factory=dict)
    slo: str | None = None
    objective: str | None = None
    study: StudyInfo = field(default_factory=StudyInfo)
    plan: PlanInfo = field(default_factory=PlanInfo)
    baseline: str | None = None
    best: str | None = None
    finalists: tuple[Finalist, ...] = ()
    within_noise: bool | None = None
    pareto_front: tuple[str, ...] = ()
    gain: Gain | None = None
    variants: tuple[VariantInfo, ...] = ()
    quality: tuple[dict[str, Any], ...] = ()
    fixed_settings: dict[str, Any] = field(default_factory=dict)
    profile: ProfileInfo | None = None
    calibration: CalibrationInfo | None = None
    cost: CostInfo | None = None
    screen: ScreenInfo | None = None

    def trial(self, name: str | None) -> TrialRecord | None:
        """The trial of that candidate name, or None."""
        return next((t for t in self.trials if t.name == name), None) if name else None

    def to_json(self) -> dict[str, Any]:
        """The record as JSON (schema ``SCHEMA``), field names and order as they always were."""
        data: dict[str, Any] = {
            "schema": SCHEMA,
            "vtune_version": self.vtune_version,
            "created_at": self.created_at,
            "model": asdict(self.model),
            "gpu": asdict(self.gpu),
            "vllm_version": self.vllm_version,
            "workload": dict(self.workload),
            "slo": self.slo,
            "objective": self.objective,
            "study": asdict(self.study),
            "plan": self.plan.to_json(),
            "trials": [t.to_json() for t in self.trials],
            "baseline": self.baseline,
            "best": self.best,
            "finalists": [f.to_json() for f in self.finalists],
            "within_noise": self.within_noise,
            "pareto_front": list(self.pareto_front),
            "gain": None if self.gain is None else self.gain.to_json(),
            "variants": [asdict(v) for v in self.variants],
            "quality": [dict(q) for q in self.quality],
            "fixed_settings": dict(self.fixed_settings),
        }
        if self.profile is not None:
            data["profile"] = asdict(self.profile)
        if self.calibration is not None:
            data["calibration"] = self.calibration.to_json()
        if self.cost is not None:
            data["cost"] = self.cost.to_json()
        if self.screen is not None:
            data["screen"] = self.screen.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = "the record") -> SearchRecord:
        """Read a ``vtune.search/1`` or ``/2`` record; ParameterError (one line, naming
        ``source``) for anything else. Missing optional fields read as None or empty."""
        if not isinstance(data, dict):
            raise ParameterError(
                f"{source} is not a vtune search record (a JSON {_kind(data)}, not an object; "
                "give the .json written beside the profile)"
            )
        schema = data.get("schema")
        if schema not in READABLE_SCHEMAS:
            raise ParameterError(
                f"{source} is not a vtune search record this vtune reads (schema {schema!r}; "
                f"expected {' or '.join(READABLE_SCHEMAS)}; give the .json written beside "
                "the profile)"
            )
        r = _Reader(source)
        gain = r.obj(data, "gain") if data.get("gain") is not None else None
        profile = r.obj(data, "profile") if data.get("profile") is not None else None
        within_noise = data.get("within_noise")
        return cls(
            trials=tuple(r.trial(i, t) for i, t in enumerate(r.list(data, "trials"))),
            vtune_version=_str(data.get("vtune_version")),
            created_at=_str(data.get("created_at")),
            model=r.part(ModelInfo, r.obj(data, "model")),
            gpu=r.part(GpuInfo, r.obj(data, "gpu")),
            vllm_version=_str(data.get("vllm_version")),
            workload=r.obj(data, "workload"),
            slo=_str(data.get("slo")),
            objective=_str(data.get("objective")),
            study=r.part(StudyInfo, r.obj(data, "study")),
            plan=r.plan(r.obj(data, "plan")),
            baseline=_str(data.get("baseline")),
            best=_str(data.get("best")),
            finalists=tuple(
                Finalist.from_json(r.item(f, "finalists"), _str(data.get("objective")))
                for f in r.list(data, "finalists")
            ),
            within_noise=within_noise if isinstance(within_noise, bool) else None,
            pareto_front=tuple(str(n) for n in r.list(data, "pareto_front")),
            gain=None if gain is None else r.part(Gain, gain, **dict.fromkeys(_GAIN_NEEDS)),
            variants=tuple(
                r.part(VariantInfo, r.item(v, "variants"), name="?")
                for v in r.list(data, "variants")
            ),
            quality=tuple(r.item(q, "quality") for q in r.list(data, "quality")),
            fixed_settings=r.obj(data, "fixed_settings"),
            profile=None
            if profile is None
            else ProfileInfo(_str(profile.get("path")), r.obj(profile, "config", "profile.config")),
            calibration=r.calibration(data),
            cost=None if data.get("cost") is None else CostInfo.from_json(r.obj(data, "cost")),
            screen=None
            if data.get("screen") is None
            else ScreenInfo.from_json(r.obj(data, "screen")),
        )


def load_record(path: str | Path) -> SearchRecord:
    """Read the search record at ``path`` (the .json beside a profile); ParameterError with
    one line when it cannot be read or is not a vtune search record."""
    from tuner.files import read_json

    return SearchRecord.from_json(read_json(Path(path)), source=str(path))


# --- reading JSON -------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    kinds = ((dict, "object"), (list, "list"), (str, "string"), (bool, "boolean"))
    if value is None:
        return "null"
    return next((name for t, name in kinds if isinstance(value, t)), "number")


_GAIN_NEEDS = ("objective", "baseline", "best", "ratio")


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


class _Reader:
    """Reads the record's parts leniently (missing or null: empty) but never silently accepts
    a wrong container: a list where an object belongs is one ParameterError naming the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def bad(self, where: str, want: str, value: Any) -> ParameterError:
        return ParameterError(
            f"{self.source} is not a valid vtune search record: {where} is a JSON "
            f"{_kind(value)}, not {want}"
        )

    def obj(self, data: dict[str, Any], key: str, where: str | None = None) -> dict[str, Any]:
        value = data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.bad(where or key, "an object", value)
        return value

    def list(self, data: dict[str, Any], key: str, where: str | None = None) -> list[Any]:
        value = data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.bad(where or key, "a list", value)
        return value

    def item(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(f"an entry of {where}", "an object", value)
        return value

    def items(self, data: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
        """A list of objects (each checked) under ``key``."""
        return [self.item(v, where) for v in self.list(data, key, where)]

    def part(self, kind: type, data: dict[str, Any], **defaults: Any) -> Any:
        """``kind`` from the keys of ``data`` it knows, values as they are (other keys, such
        as the extra model and GPU keys of a /1 record, are ignored)."""
        values = dict(defaults)
        values.update({f.name: data[f.name] for f in fields(kind) if f.name in data})
        return kind(**values)

    def trial(self, i: int, data: Any) -> TrialRecord:
        where = f"trials[{i}]"
        data = self.item(data, "trials")
        if not isinstance(data.get("name"), str) or not isinstance(data.get("state"), str):
            raise ParameterError(
                f"{self.source} is not a valid vtune search record: {where} has no name or state"
            )
        for key in ("knobs", "estimate", "server_info", "rate_search", "best", "failure"):
            self.obj(data, key, f"{where}.{key}")
        return TrialRecord.from_json({**data, "knobs": data.get("knobs") or {}})

    def calibration(self, data: dict[str, Any]) -> CalibrationInfo | None:
        """The calibration block, None when absent; its factors must be an object."""
        if data.get("calibration") is None:
            return None
        block = self.obj(data, "calibration")
        return self.part(
            CalibrationInfo,
            {
                **block,
                "factors": self.obj(block, "factors", "calibration.factors"),
                "prior": self.obj(block, "prior", "calibration.prior"),
                "peaks": self.obj(block, "peaks", "calibration.peaks"),
                "fitted": tuple(self.list(block, "fitted", "calibration.fitted")),
            },
        )

    def plan(self, data: dict[str, Any]) -> PlanInfo:
        cands = data.get("candidates")
        count = None
        if isinstance(cands, int) and not isinstance(cands, bool):
            cands, count = [], cands
        elif cands is not None and not isinstance(cands, list):
            raise self.bad("plan.candidates", "a list", cands)
        space = self.obj(data, "space", "plan.space")
        return PlanInfo(
            space={k: tuple(v) if isinstance(v, list) else (v,) for k, v in space.items()},
            space_size=data.get("space_size") if isinstance(data.get("space_size"), int) else None,
            candidates=tuple(str(c) for c in cands or []),
            pruned=tuple(
                PrunedEntry(
                    str(p.get("name", "?")),
                    self.obj(p, "knobs", "plan.pruned[].knobs"),
                    str(p.get("rule", "?")),
                    str(p.get("reason", "")),
                )
                for p in self.items(data, "pruned", "plan.pruned")
            ),
            capped=tuple(
                CappedEntry(
                    str(c.get("from", "?")), str(c.get("to", "?")), str(c.get("reason", ""))
                )
                for c in self.items(data, "capped", "plan.capped")
            ),
            counts_by_rule={
                str(k): int(v)
                for k, v in self.obj(data, "counts_by_rule", "plan.counts_by_rule").items()
                if isinstance(v, int)
            },
            candidate_count=count,
        )
