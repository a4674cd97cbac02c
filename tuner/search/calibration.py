"""The search's model learns from its trials: fit inputs from trial records, re-prediction of
the untried candidates, their order, the ``calibrated`` pruning rule, and the record's block.

After each finished trial :class:`OnlineCalibration` refits the decode model's constants
(:func:`tuner.analytic.calibrate.fit`) to every load point measured so far: each rate-search
point gives its measured output tokens/s at its mean batch, the requests in flight by Little's
law (request throughput x mean end-to-end latency: exact over the window, whereas the
server's running count is sampled every half second), capped at the candidate's
max_num_seqs (beyond it requests wait and add nothing to the batch). The step's work at that
batch comes from the analytic model's own blocks (:func:`tuner.analytic.roofline.step_inputs`)
and the peaks from the estimator, so that with the plan's constants the re-prediction of a
candidate is exactly its ``predicted_tokens_per_s`` (a unit test holds them equal).

The prefill's share of each step is not modelled apart: the workload of a search is fixed,
so the constants absorb it (mostly the overhead) and carry it wherever they are applied.

Pruning (:data:`RULE_CALIBRATED`) is deliberately conservative: only for the ``throughput``
objective (output tokens/s), only once :data:`PRUNE_MIN_POINTS` points of
:data:`PRUNE_MIN_TRIALS` trials are fitted, and only when the candidate's calibrated capacity
(closed loop at its max_num_seqs, an upper bound of what it sustains under an SLO) stays
below the incumbent's measured objective even raised by a margin: the largest of
:data:`PRUNE_MARGIN`, three times the fit's r.m.s. relative residual, and twice the fit's
mean error on trials it had not yet seen (its track record in this search). One candidate's
points can be met as well by a slow memory as by slow compute; the second trial and the
margin are there so that such a guess never prunes on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuner.analytic.calibrate import (
    FREE_ALL,
    Calibration,
    FitPoint,
    efficiency_from_json,
    fit,
    fit_point,
    predict_point,
    prequential,
)
from tuner.analytic.estimate import Efficiency, ServingConfig, estimate
from tuner.analytic.roofline import step_inputs
from tuner.errors import ParameterError, VtuneError
from tuner.plan.prune import Planned, Pruned, Target, feasible_concurrency
from tuner.search.record import STATE_COMPLETE, SearchRecord, TrialRecord, finite, load_record
from tuner.search.record_parts import CalibrationInfo
from tuner.specs.gpu import GpuSpec
from tuner.specs.vllm_defaults import vllm_defaults

RULE_CALIBRATED = "calibrated"
PRUNE_MIN_POINTS = 3
PRUNE_MIN_TRIALS = 2
PRUNE_MARGIN = 0.5
PRUNE_SPREAD_FACTOR = 3.0
PRUNE_OBJECTIVES = ("throughput",)  # objectives measured in output tokens/s


@dataclass(frozen=True)
class StepModel:
    """One candidate as the decode model sees it: the step's inputs and the peaks of all its
    devices together (datasheet), its context and its effective max_num_seqs."""

    spec: Any  # ModelSpec
    quantization: str | None
    kv_cache_dtype: str
    context: int
    bandwidth: float
    flops: float
    max_num_seqs: int

    def capacity(self, eff: Efficiency, max_concurrency: float) -> float:
        """Output tokens/s at max_num_seqs capped to the KV-feasible concurrency (the batch
        the plan predicts a candidate at)."""
        batch = feasible_concurrency(self.max_num_seqs, max_concurrency)
        return predict_point(eff, self.point(batch))

    def point(self, batch: float, tokens_per_s: float = 0.0, group: str = "") -> FitPoint:
        """The fit point of a step of ``batch`` sequences (measured ``tokens_per_s``)."""
        inputs = step_inputs(
            self.spec, batch, quantization=self.quantization, kv_cache_dtype=self.kv_cache_dtype
        )
        return fit_point(
            batch=batch,
            bytes_per_step=inputs.weight_read_bytes
            + batch * self.context * inputs.kv_bytes_per_token,
            flops_per_step=2.0 * inputs.active_params * batch,
            bandwidth_bytes_per_s=self.bandwidth,
            flops_per_s=self.flops,
            tokens_per_s=tokens_per_s,
            group=group,
        )


def step_model(knobs: Mapping[str, Any], variant_name: str, target: Target) -> StepModel | None:
    """The :class:`StepModel` of a candidate's knobs served as ``variant_name``; None when the
    variant is unknown or the estimator refuses the combination."""
    variant = target.variants.get(variant_name)
    if variant is None:
        return None
    spec, gpu, defaults = variant.spec, target.gpu, vllm_defaults()
    tp = int(knobs.get("tensor_parallel_size") or defaults.tensor_parallel_size)
    max_model_len = min(
        knobs.get("max_model_len") or target.max_model_len or spec.max_position_embeddings,
        spec.max_position_embeddings,
    )
    kv_dtype = str(knobs.get("kv_cache_dtype") or defaults.kv_cache_dtype)
    cfg = ServingConfig(
        max_model_len=max_model_len,
        context_len=min(target.context_len, max_model_len),
        quantization=variant.flag,
        kv_cache_dtype=kv_dtype,
        tensor_parallel_size=tp,
        kv_cache_memory_bytes=target.kv_cache_memory_bytes,
    )
    try:
        est = estimate(spec, gpu, cfg, ladder=())
    except VtuneError:  # an impossible combination is the plan's business, not the fit's
        return None
    seqs = int(knobs.get("max_num_seqs") or defaults.batch_limits(gpu, tp)[1])
    bandwidth, flops = est.memory_bandwidth * tp, est.peak_flops * tp
    return StepModel(spec, variant.flag, kv_dtype, est.context_len, bandwidth, flops, seqs)


def point_batch(point: Mapping[str, Any], max_num_seqs: int) -> float | None:
    """A load point's mean batch: Little's law on the client's figures, capped at
    ``max_num_seqs``; the closed loop's concurrency when the latencies are missing."""
    summary = point.get("summary") if isinstance(point.get("summary"), dict) else {}
    rate = finite(summary.get("request_throughput"))
    e2el = finite(summary.get("mean_e2el_ms"))
    if rate is not None and e2el is not None and rate > 0 and e2el > 0:
        return min(rate * e2el / 1000.0, float(max_num_seqs))
    load = point.get("load") if isinstance(point.get("load"), dict) else {}
    conc = finite(load.get("concurrency"))
    return min(conc, float(max_num_seqs)) if conc else None


def trial_points(record: TrialRecord, target: Target) -> list[FitPoint]:
    """The fit points of a complete trial (empty for any other): one per measured load point
    with output tokens and a batch."""
    if record.state != STATE_COMPLETE:
        return []
    model = step_model(record.knobs, record.variant, target)
    if model is None:
        return []
    points = []
    for raw in record.points:
        summary = raw.get("summary") if isinstance(raw.get("summary"), dict) else {}
        tokens = finite(summary.get("output_throughput"))
        batch = point_batch(raw, model.max_num_seqs)
        if tokens and tokens > 0 and batch and batch > 0:
            points.append(model.point(batch, tokens, record.name))
    return points


class OnlineCalibration:
    """The fit the search keeps up to date, and what it says about untried candidates.

    The factors are fractions of ``target.gpu``'s peaks (a search's GPU entry carries the
    probed figures where ``vtune probe`` measured this device: the probe is the prior).
    ``prior`` (default: the estimator's constants) is where each fit starts; the plan's own
    model (the estimator's defaults) is the "before" every error is compared with.
    ``summary=False``: no record block (:meth:`info` is None): a fleet's worker, whose
    parent writes the record (the block refits once per trial: seconds on a busy node)."""

    def __init__(
        self,
        target: Target,
        objective: str = "throughput",
        prior: Efficiency | None = None,
        *,
        summary: bool = True,
    ) -> None:
        self.target, self.objective, self.summary = target, objective, summary
        self.prior = prior or Efficiency()
        self.current = Calibration(self.prior, 0, None, None, (), (), self.prior)
        self.trials_used = 0
        self.unseen_errors: list[float] = []  # |predicted / measured - 1| before each refit
        self._seen: frozenset[tuple[str, str]] = frozenset()
        self._models: dict[str, StepModel | None] = {}
        self._predicted: dict[str, float | None] = {}  # by candidate, for the current fit
        # What orders the untried instead of the prediction (a screen's measured figures).
        self.ranking: Callable[[list[Planned]], list[Planned]] | None = None

    def refit(self, records: Iterable[TrialRecord]) -> Calibration:
        """Fit to every point of ``records`` (cached while the finished set is the same),
        first scoring the fit so far on the trials it had not seen (``unseen_errors``)."""
        records = list(records)
        key = frozenset((r.name, r.state) for r in records)
        if key != self._seen:
            if self.current.points_used:
                fresh = [r for r in records if (r.name, r.state) not in self._seen]
                self.unseen_errors += [
                    abs(predict_point(self.current.efficiency, p) / p.tokens_per_s - 1)
                    for r in fresh
                    for p in trial_points(r, self.target)
                ]
            self._seen, self._predicted = key, {}
            groups = [g for g in (trial_points(r, self.target) for r in records) if g]
            self.current = fit([p for g in groups for p in g], self.prior, before=Efficiency())
            self.trials_used = len(groups)
        return self.current

    def predict(self, planned: Planned) -> float | None:
        """Calibrated output tokens/s of ``planned`` at the batch the plan predicted it at."""
        if planned.name not in self._predicted:
            model = self._model(planned)
            eff, fits = self.current.efficiency, planned.max_concurrency
            self._predicted[planned.name] = None if model is None else model.capacity(eff, fits)
        return self._predicted[planned.name]

    def annotate(self, record: TrialRecord, planned: Planned) -> TrialRecord:
        """``record`` with ``estimate.calibrated_tokens_per_s`` (the prediction just before it
        ran: call before refitting with it) and ``estimate.measured_tokens_per_s`` (its best
        output tokens/s at any load point, the closed-loop capacity as a rule)."""
        extra = {
            "calibrated_tokens_per_s": self.predict(planned),
            "measured_tokens_per_s": record.max_output_throughput,
        }
        return replace(record, estimate={**record.estimate, **extra})

    def order(self, untried: Iterable[Planned]) -> list[Planned]:
        """Best calibrated prediction first (the plan's order breaks ties); ``ranking``'s
        order instead when one is set (:meth:`tuner.search.screen.Screen.order`)."""
        ranked = list(untried)
        if self.ranking is not None:
            return self.ranking(ranked)
        keys = {p.name: self.predict(p) for p in ranked}
        return sorted(ranked, key=lambda p: -(keys[p.name] or p.predicted_tokens_per_s))

    def prune(self, planned: Planned, incumbent: TrialRecord | None) -> Pruned | None:
        """The ``calibrated`` verdict on ``planned`` against the best measured trial."""
        if (
            self.objective not in PRUNE_OBJECTIVES
            or planned.candidate.is_baseline
            or incumbent is None
            or not incumbent.objective
            or self.current.points_used < PRUNE_MIN_POINTS
            or self.trials_used < PRUNE_MIN_TRIALS
        ):
            return None
        predicted = self.predict(planned)
        if predicted is None:
            return None
        track = sum(self.unseen_errors) / len(self.unseen_errors) if self.unseen_errors else 0
        margin = max(PRUNE_MARGIN, PRUNE_SPREAD_FACTOR * self.current.spread, 2 * track)
        reach = predicted * (1.0 + margin)
        if reach >= incumbent.objective:
            return None
        reason = (
            f"calibrated capacity {predicted:.4g} tok/s (+{margin:.0%}: {reach:.4g}) < "
            f"{incumbent.name}'s measured {incumbent.objective:.4g} tok/s"
        )
        return Pruned(planned.candidate, RULE_CALIBRATED, reason)

    def info(self, records: Iterable[TrialRecord]) -> CalibrationInfo | None:
        """The record's block: the final fit and the errors on unseen trials (the trials in
        the order they ran); None when no trial measured a point, or without ``summary``."""
        if not self.summary:
            return None
        ordered = _in_order(records)
        final = self.refit(ordered)
        if final.points_used == 0:
            return None
        before, after = self.unseen_mape(ordered)
        return CalibrationInfo(
            factors=_factors(final.efficiency),
            peaks=peak_figures(self.target.gpu),
            prior=_factors(self.prior),
            fitted=final.fitted,
            points_used=final.points_used,
            trials_used=self.trials_used,
            mape_before=_round(before),
            mape_after=_round(after),
            fit_mape_before=_round(final.mape_before),
            fit_mape_after=_round(final.mape_after),
        )

    def unseen_mape(self, records: Iterable[TrialRecord]) -> tuple[float | None, float | None]:
        """MAPE on unseen trials (:func:`prequential`, the trials in the order they ran):
        the plan's model's, the running fit's. Each prefix's fit is kept
        (:func:`tuner.analytic.calibrate.prefix_fit`): called on the trials finished so
        far, it prepares a later call on more of them."""
        groups = [trial_points(r, self.target) for r in _in_order(records)]
        before, after, _ = prequential(groups, self.prior, before=Efficiency())
        return before, after

    def _model(self, planned: Planned) -> StepModel | None:
        if planned.name not in self._models:
            cand = planned.candidate
            self._models[planned.name] = step_model(
                cand.knobs(), cand.quantization or "none", self.target
            )
        return self._models[planned.name]


def _in_order(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    return sorted(records, key=lambda r: (r.number is None, r.number or 0, r.name))


def load_calibration(path: str | Path, gpu: GpuSpec) -> tuple[SearchRecord, Efficiency]:
    """A finished search's record and its fitted factors as fractions of ``gpu``'s peaks, for
    ``vtune estimate --calibration``. ParameterError (one line) when the record has no
    calibration block or was measured on another card (the factors hold for that card only)."""
    record = load_record(path)
    block = record.calibration
    if block is None:
        raise ParameterError(
            f"{path} has no calibration block (written by a vtune that did not calibrate, or "
            "no trial measured a load point); give the record of a finished search"
        )
    if record.gpu.name and record.gpu.name not in (gpu.name, *gpu.aliases):
        raise ParameterError(
            f"{path} was calibrated on {record.gpu.name}, not {gpu.name}; its factors hold "
            f"for that card only (use --gpu {record.gpu.name})"
        )
    try:
        eff = efficiency_from_json(block.factors)
    except ValueError as exc:
        raise ParameterError(f"{path}: the calibration block is not valid: {exc}") from None
    return record, rescaled(eff, block.peaks, gpu)


def peak_figures(gpu: GpuSpec) -> dict[str, float]:
    """The peaks factors are fractions of: bandwidth and bf16 (else fp16) FLOP/s per device."""
    flops = gpu.peak_flops.get("bf16") or gpu.peak_flops.get("fp16") or 0.0
    return {"memory_bandwidth": gpu.memory_bandwidth, "bf16": flops}


def rescaled(eff: Efficiency, peaks: Mapping[str, float], gpu: GpuSpec) -> Efficiency:
    """``eff`` (fractions of ``peaks``) as fractions of ``gpu``'s peaks, so that the absolute
    bandwidth and FLOP/s it stands for are the same (a search on probed peaks, an estimate on
    the datasheet's); unchanged where either figure is missing."""
    mine = peak_figures(gpu)
    bw, flops = (peaks[k] / mine[k] if peaks.get(k) and mine.get(k) else 1.0 for k in mine)
    return replace(eff, memory_bandwidth=eff.memory_bandwidth * bw, compute=eff.compute * flops)


def _factors(eff: Efficiency) -> dict[str, float]:
    """The constants to 4 significant figures (the fit is not more precise than that)."""
    return {k: float(f"{getattr(eff, k):.4g}") for k in FREE_ALL}


def _round(value: float | None) -> float | None:
    """A percentage to 2 decimals; None stays None."""
    return None if value is None or not math.isfinite(value) else round(value, 2)
