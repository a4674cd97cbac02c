"""Fit the decode model's free constants to measured load points (pure; numpy, no I/O).

The model (``tuner.analytic.estimate``'s ladder) predicts output tokens/s at a batch B as

    tokens/s = B / (max(mem_s / e_bw, comp_s / e_c) + overhead)

where ``mem_s`` and ``comp_s`` are one decode step's memory and compute times at 100 % of the
datasheet peaks (bytes per step / bandwidth, FLOPs per step / FLOP/s: :func:`fit_point` turns
the step's work and the peaks into them) and ``e_bw``, ``e_c``, ``overhead`` are
:class:`~tuner.analytic.estimate.Efficiency`'s fields. :func:`predict` is that line, element-wise
on numpy arrays; a unit test holds it equal to the estimator's ladder.

:func:`fit` chooses the constants that minimise the squared *relative* error of the predicted
tokens/s over the points (every point weighs the same whatever its scale, and MAPE is what is
reported), plus a small pull of log(e_bw) and log(e_c) toward the prior, which only decides
what the points leave open (an efficiency whose resource never bounds a measured step stays at
the prior). How many constants move depends on the points: none with no point; the overhead
alone with one or two (they cannot separate three constants); all three from three on.

The method, without scipy (not a dependency): a bounded grid over (log e_bw, log e_c, u) with
overhead = ``max_overhead`` x u^2 (dense near zero); from each of the :data:`STARTS` best
cells that lie apart (the loss has several basins: a line of step times is met both by a slow
memory and by slow compute) a zoom (:data:`REFINE_ROUNDS` rounds, the box halved each time),
then Levenberg-Marquardt steps (the basins are long narrow valleys, which a zoom alone crawls
along) clipped to the box; the lowest loss wins. The loss is piecewise smooth (the max()) and
at most three-dimensional, so the grid finds the basins a kink would hide from a Gauss-Newton
start, and the box keeps every constant within :data:`EFFICIENCY_BOUNDS`.

"Datasheet peaks" above means the peaks of the GPU entry in use: a search's entry carries the
figures ``vtune probe`` measured, where it has, and the factors are fractions of those.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuner.analytic.estimate import Efficiency

GRID = 21  # grid points per free constant in the first, whole-box grid
REFINE_GRID = 5  # grid points per free constant in each zoom round
ZOOM = 2.0  # each zoom round shrinks the search box by this factor
REFINE_ROUNDS = 8
POLISH_STEPS = 40  # Levenberg-Marquardt steps after the zoom
STARTS = 4  # grid cells, each 3+ cells from the others, refined on their own
PRIOR_WEIGHT = 1e-6  # pull of log(efficiency) toward the prior: breaks ties, moves no fit
OVERHEAD_ONLY_BELOW = 3  # with fewer points only the overhead is fitted
EFFICIENCY_BOUNDS = (1e-3, 10.0)  # relative to the datasheet: wide, CPU datasheets are nominal
FREE_ALL = ("memory_bandwidth", "compute", "step_overhead_s")


@dataclass(frozen=True)
class FitPoint:
    """One measured load point: mean batch, the step's memory and compute seconds at 100 % of
    the peaks, the measured output tokens/s, and the trial (``group``) it belongs to."""

    batch: float
    memory_s: float
    compute_s: float
    tokens_per_s: float
    group: str = ""


def fit_point(
    *,
    batch: float,
    bytes_per_step: float,
    flops_per_step: float,
    bandwidth_bytes_per_s: float,
    flops_per_s: float,
    tokens_per_s: float,
    group: str = "",
) -> FitPoint:
    """A :class:`FitPoint` from the step's work (whole model, all devices) and the peaks of
    all devices together."""
    return FitPoint(
        batch,
        bytes_per_step / bandwidth_bytes_per_s,
        flops_per_step / flops_per_s,
        tokens_per_s,
        group,
    )


def predict(eff: Efficiency, batch: Any, memory_s: Any, compute_s: Any) -> Any:
    """Predicted output tokens/s (the estimator's ladder); scalars or numpy arrays."""
    step = (
        np.maximum(memory_s / eff.memory_bandwidth, compute_s / eff.compute) + eff.step_overhead_s
    )
    return batch / step


def predict_point(eff: Efficiency, point: FitPoint) -> float:
    return float(predict(eff, point.batch, point.memory_s, point.compute_s))


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    """Mean absolute percentage error, in percent; None with no pair."""
    pairs = [(p, m) for p, m in zip(predicted, measured, strict=True) if m > 0]
    if not pairs:
        return None
    return float(100.0 * sum(abs(p - m) / m for p, m in pairs) / len(pairs))


@dataclass(frozen=True)
class Calibration:
    """A fit: the constants (``efficiency``, its ``step_overhead_s`` is ``overhead_s``), the
    points it used, the MAPE (%) of the model before (``prior``) and after the fit on those
    points, the relative residual (predicted / measured - 1) of each point after the fit, and
    which constants moved (``fitted``)."""

    efficiency: Efficiency
    points_used: int
    mape_before: float | None
    mape_after: float | None
    residuals: tuple[float, ...] = ()
    fitted: tuple[str, ...] = ()
    prior: Efficiency = field(default_factory=Efficiency)

    @property
    def overhead_s(self) -> float:
        return self.efficiency.step_overhead_s

    @property
    def spread(self) -> float:
        """Root-mean-square relative residual of the fit (0 with no point)."""
        if not self.residuals:
            return 0.0
        return math.sqrt(sum(r * r for r in self.residuals) / len(self.residuals))

    def to_json(self) -> dict[str, Any]:
        return {
            "factors": _eff_json(self.efficiency),
            "prior": _eff_json(self.prior),
            "fitted": list(self.fitted),
            "points_used": self.points_used,
            "mape_before": self.mape_before,
            "mape_after": self.mape_after,
            "residuals": list(self.residuals),
        }

    @classmethod
    def from_json(cls, data: Any) -> Calibration:
        """Rebuild from :meth:`to_json`; ValueError naming what is missing or wrong."""
        if not isinstance(data, dict):
            raise ValueError("the calibration is not a JSON object")
        eff = efficiency_from_json(data.get("factors"))
        prior = data.get("prior")
        residuals = data.get("residuals") or []
        return cls(
            efficiency=eff,
            points_used=int(data.get("points_used") or 0),
            mape_before=_number(data.get("mape_before")),
            mape_after=_number(data.get("mape_after")),
            residuals=tuple(float(r) for r in residuals if _number(r) is not None),
            fitted=tuple(str(f) for f in data.get("fitted") or ()),
            prior=efficiency_from_json(prior) if isinstance(prior, dict) else Efficiency(),
        )


def efficiency_from_json(data: Any) -> Efficiency:
    """An :class:`Efficiency` from ``{memory_bandwidth, compute, step_overhead_s}``; ValueError
    when a factor is missing, not a number, or not positive (the overhead may be zero)."""
    if not isinstance(data, dict):
        raise ValueError("no fitted factors (factors is not a JSON object)")
    values = {k: _number(data.get(k)) for k in FREE_ALL}
    bad = [k for k, v in values.items() if v is None or v < 0]
    bad += [k for k in ("memory_bandwidth", "compute") if values[k] == 0]
    if bad:
        raise ValueError(f"fitted factor {', '.join(sorted(set(bad)))} missing or out of range")
    return Efficiency(**values)  # type: ignore[arg-type]


def fit(
    points: Iterable[FitPoint],
    prior: Efficiency | None = None,
    *,
    before: Efficiency | None = None,
    bounds: tuple[float, float] = EFFICIENCY_BOUNDS,
) -> Calibration:
    """Least-squares fit of the constants to ``points`` (see the module docstring), starting
    from ``prior``; ``before`` (default: the prior) is the model ``mape_before`` measures.
    Points with a non-positive batch or tokens/s are left out."""
    prior = prior or Efficiency()
    before = before or prior
    pts = [p for p in points if p.batch > 0 and p.tokens_per_s > 0 and math.isfinite(p.batch)]
    if not pts:
        return Calibration(prior, 0, None, None, (), (), prior)
    b = np.array([p.batch for p in pts])
    m = np.array([p.memory_s for p in pts])
    c = np.array([p.compute_s for p in pts])
    y = np.array([p.tokens_per_s for p in pts])
    # The overhead cannot exceed the slowest measured step by much (noise aside).
    max_overhead = 2.0 * float(np.max(b / y))
    free = ("step_overhead_s",) if len(pts) < OVERHEAD_ONLY_BELOW else FREE_ALL
    eff = _search(b, m, c, y, prior, free, bounds, max_overhead)
    after = predict(eff, b, m, c)
    return Calibration(
        efficiency=eff,
        points_used=len(pts),
        mape_before=mape(list(predict(before, b, m, c)), list(y)),
        mape_after=mape(list(after), list(y)),
        residuals=tuple(float(r) for r in after / y - 1.0),
        fitted=free,
        prior=prior,
    )


def prequential(
    groups: Sequence[Sequence[FitPoint]],
    prior: Efficiency | None = None,
    *,
    before: Efficiency | None = None,
) -> tuple[float | None, float | None, list[float]]:
    """Error on points not yet seen: each group (a trial, in the order they ran) from the 2nd
    on is predicted by the fit to every group before it. Returns (MAPE before: ``before``'s,
    default the prior; MAPE after: the running fit's; the per-group MAPE after), all over the
    same points; (None, None, []) when fewer than two groups have points."""
    prior = prior or Efficiency()
    before = before or prior
    seen: list[FitPoint] = []
    pred_before: list[float] = []
    pred_after: list[float] = []
    measured: list[float] = []
    per_group: list[float] = []
    for group in groups:
        group = [p for p in group if p.batch > 0 and p.tokens_per_s > 0]
        if not group:
            continue
        if seen:
            eff = prefix_fit(tuple(seen), prior)
            after = [predict_point(eff, p) for p in group]
            truth = [p.tokens_per_s for p in group]
            pred_after += after
            pred_before += [predict_point(before, p) for p in group]
            measured += truth
            per_group.append(mape(after, truth) or 0.0)
        seen += group
    return mape(pred_before, measured), mape(pred_after, measured), per_group


@functools.lru_cache(maxsize=256)
def prefix_fit(points: tuple[FitPoint, ...], prior: Efficiency) -> Efficiency:
    """``fit(points, prior).efficiency``, kept: :func:`prequential` fits every prefix of the
    trials again at each call, and a fleet's parent computes the prefixes of the finished
    trials while its workers measure, so that its final record costs the last few only."""
    return fit(points, prior).efficiency


# --- the search -----------------------------------------------------------------------------


def _search(
    b: np.ndarray,
    m: np.ndarray,
    c: np.ndarray,
    y: np.ndarray,
    prior: Efficiency,
    free: tuple[str, ...],
    bounds: tuple[float, float],
    max_overhead: float,
) -> Efficiency:
    """Grid over the free constants in (log e_bw, log e_c, u) coordinates, then from each of
    the :data:`STARTS` best cells (the loss can have several basins: a line of step times is
    met both by a memory-bound and by a compute-bound pair) a zoom and a damped Gauss-Newton
    polish (the basins are long narrow valleys a zoom alone crawls along); the lowest wins."""
    lo_e, hi_e = math.log(bounds[0]), math.log(bounds[1])
    prior_x = np.array(
        [
            math.log(min(max(prior.memory_bandwidth, bounds[0]), bounds[1])),
            math.log(min(max(prior.compute, bounds[0]), bounds[1])),
            math.sqrt(min(prior.step_overhead_s, max_overhead) / max_overhead),
        ]
    )
    axes = [FREE_ALL.index(k) for k in free]
    low = np.array([lo_e, lo_e, 0.0])[axes]
    high = np.array([hi_e, hi_e, 1.0])[axes]
    pull = math.sqrt(PRIOR_WEIGHT)

    def residuals(xs: np.ndarray) -> np.ndarray:
        """Residuals (relative errors, then the pull to the prior) of each row of ``xs``."""
        full = np.tile(prior_x, (len(xs), 1))
        full[:, axes] = xs
        e_bw, e_c = np.exp(full[:, :1]), np.exp(full[:, 1:2])
        step = np.maximum(m / e_bw, c / e_c) + max_overhead * np.square(full[:, 2:3])
        return np.hstack([b / step / y - 1.0, pull * (full[:, :2] - prior_x[:2])])

    def loss(xs: np.ndarray) -> np.ndarray:
        return np.sum(np.square(residuals(xs)), axis=1)

    def grid(centre: np.ndarray, width: np.ndarray, n: int) -> np.ndarray:
        lines = [np.linspace(c - w / 2, c + w / 2, n) for c, w in zip(centre, width, strict=True)]
        mesh = np.meshgrid(*lines, indexing="ij")
        return np.clip(np.stack([g.reshape(-1) for g in mesh], axis=1), low, high)

    coarse = grid((low + high) / 2, high - low, GRID)
    values = loss(coarse)
    spacing = (high - low) / (GRID - 1)
    starts: list[int] = []
    for i in np.argsort(values):  # the best cells, each a few cells away from the others
        if all(np.max(np.abs(coarse[i] - coarse[j]) / spacing) >= 3 for j in starts):
            starts.append(int(i))
            if len(starts) == STARTS:
                break
    results = []
    for i in starts:
        x, value, width = coarse[i], float(values[i]), spacing * 2
        for _ in range(REFINE_ROUNDS):
            cells = grid(x, width, REFINE_GRID)
            cell_losses = loss(cells)
            j = int(np.argmin(cell_losses))
            if cell_losses[j] <= value:
                x, value = cells[j], float(cell_losses[j])
            width = width / ZOOM
        results.append(_polish(x, value, residuals, low, high))
    best = prior_x.copy()
    best[axes] = min(results, key=lambda r: r[1])[0]

    def within(log_value: float) -> float:  # exp(log(x)) may land a hair outside
        return min(max(math.exp(log_value), bounds[0]), bounds[1])

    return Efficiency(
        memory_bandwidth=within(best[0]),
        compute=within(best[1]),
        step_overhead_s=float(max_overhead * best[2] ** 2),
    )


def _polish(
    x: np.ndarray, value: float, residuals: Any, low: np.ndarray, high: np.ndarray
) -> tuple[np.ndarray, float]:
    """Levenberg-Marquardt steps from ``x`` (finite-difference Jacobian, steps clipped to the
    box, a step kept only when it lowers the loss); returns the point and its loss."""
    damping = 1e-3
    r = residuals(x[None, :])[0]
    for _ in range(POLISH_STEPS):
        h = 1e-7 * np.maximum(1.0, np.abs(x))
        probes = x[None, :] + np.diag(h)
        jac = ((residuals(probes) - r[None, :]) / h[:, None]).T
        a, g = jac.T @ jac, jac.T @ r
        try:
            step = np.linalg.solve(a + damping * np.diag(np.diag(a) + 1e-12), -g)
        except np.linalg.LinAlgError:
            break
        trial = np.clip(x + step, low, high)
        r_trial = residuals(trial[None, :])[0]
        new = float(r_trial @ r_trial)
        if new < value:
            done = value - new < 1e-15 * max(value, 1e-30)
            x, r, value, damping = trial, r_trial, new, damping / 3
            if done:
                break
        else:
            damping *= 4
            if damping > 1e8:
                break
    return x, value


def _eff_json(eff: Efficiency) -> dict[str, float]:
    return {
        "memory_bandwidth": eff.memory_bandwidth,
        "compute": eff.compute,
        "step_overhead_s": eff.step_overhead_s,
    }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
