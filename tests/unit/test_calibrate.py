"""The calibration fit (pure): recovery of known factors, what one or two points may move,
errors on unseen trials, bounds, and the JSON form."""

from __future__ import annotations

import random

import pytest

from tuner.analytic.calibrate import (
    EFFICIENCY_BOUNDS,
    Calibration,
    FitPoint,
    efficiency_from_json,
    fit,
    fit_point,
    mape,
    predict_point,
    prequential,
)
from tuner.analytic.estimate import Efficiency

TRUE = Efficiency(memory_bandwidth=0.42, compute=0.31, step_overhead_s=0.0035)
BW, FLOPS = 3.35e12, 989e12
WEIGHTS, KV_PER_SEQ, PARAMS = 15e9, 96 * 131072, 8e9  # 8B model, short context: a real knee


def synthetic(
    eff: Efficiency, batches: list[float], noise: float = 0.0, group: str = "", seed: int = 0
) -> list[FitPoint]:
    """Points measured on a card whose constants are ``eff`` (relative noise ``noise``)."""
    rng = random.Random(seed)
    points = []
    for b in batches:
        bare = fit_point(
            batch=b,
            bytes_per_step=WEIGHTS + b * KV_PER_SEQ,
            flops_per_step=2 * PARAMS * b,
            bandwidth_bytes_per_s=BW,
            flops_per_s=FLOPS,
            tokens_per_s=1.0,
            group=group,
        )
        measured = predict_point(eff, bare) * (1 + noise * rng.uniform(-1, 1))
        points.append(FitPoint(bare.batch, bare.memory_s, bare.compute_s, measured, group))
    return points


LADDER = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def test_exact_points_give_back_the_factors_they_were_made_with() -> None:
    cal = fit(synthetic(TRUE, LADDER))
    assert cal.efficiency.memory_bandwidth == pytest.approx(TRUE.memory_bandwidth, rel=0.01)
    assert cal.efficiency.compute == pytest.approx(TRUE.compute, rel=0.01)
    assert cal.overhead_s == pytest.approx(TRUE.step_overhead_s, rel=0.02)
    assert cal.points_used == len(LADDER)
    assert cal.fitted == ("memory_bandwidth", "compute", "step_overhead_s")
    assert cal.mape_after is not None and cal.mape_after < 0.5
    assert cal.mape_before is not None and cal.mape_before > 20  # the defaults were far off
    assert max(abs(r) for r in cal.residuals) < 0.01


def test_noisy_points_still_land_near_the_factors() -> None:
    cal = fit(synthetic(TRUE, LADDER * 3, noise=0.05, seed=3))
    assert cal.efficiency.memory_bandwidth == pytest.approx(TRUE.memory_bandwidth, rel=0.1)
    assert cal.efficiency.compute == pytest.approx(TRUE.compute, rel=0.1)
    assert cal.overhead_s == pytest.approx(TRUE.step_overhead_s, rel=0.25)
    assert cal.mape_after is not None and cal.mape_after < 5


def test_a_factor_no_point_depends_on_stays_at_the_prior() -> None:
    # Batches far below the knee: every step is memory-bound, compute never shows (and the
    # weights' read time and the overhead only show as their sum: either will do).
    cal = fit(synthetic(TRUE, [1, 2, 3, 4, 6, 8]))
    assert cal.efficiency.compute == pytest.approx(Efficiency().compute, rel=0.05)
    assert cal.mape_after is not None and cal.mape_after < 0.5


@pytest.mark.parametrize("count", [1, 2])
def test_one_or_two_points_move_only_the_overhead(count: int) -> None:
    prior = Efficiency()
    points = synthetic(TRUE, [8, 64][:count])
    cal = fit(points, prior)
    assert cal.fitted == ("step_overhead_s",)
    assert cal.efficiency.memory_bandwidth == prior.memory_bandwidth
    assert cal.efficiency.compute == prior.compute
    assert cal.overhead_s != prior.step_overhead_s
    if count == 1:  # one equation, one unknown: the point is met exactly
        assert predict_point(cal.efficiency, points[0]) == pytest.approx(
            points[0].tokens_per_s, rel=1e-3
        )


def test_no_point_is_the_prior_and_says_nothing() -> None:
    prior = Efficiency(0.5, 0.5, 0.001)
    cal = fit([FitPoint(0, 1e-3, 1e-3, 10.0), FitPoint(4, 1e-3, 1e-3, 0.0)], prior)
    assert cal.efficiency == prior and cal.points_used == 0
    assert cal.mape_before is None and cal.mape_after is None and cal.fitted == ()


def test_factors_stay_inside_their_bounds() -> None:
    # A card 100x faster than its datasheet allows: the fit stops at the upper bound.
    fast = [
        FitPoint(p.batch, p.memory_s, p.compute_s, p.tokens_per_s * 100)
        for p in synthetic(Efficiency(1.0, 1.0, 0.0), LADDER)
    ]
    cal = fit(fast)
    low, high = EFFICIENCY_BOUNDS
    for value in (cal.efficiency.memory_bandwidth, cal.efficiency.compute):
        assert low <= value <= high
    assert cal.overhead_s >= 0


def test_prequential_error_is_taken_on_trials_the_fit_had_not_seen() -> None:
    first = synthetic(TRUE, [1, 16, 256], group="a")
    second = synthetic(TRUE, [4, 64], group="b")
    # The third trial measured twice what the model says: only it is off.
    odd = [
        FitPoint(p.batch, p.memory_s, p.compute_s, 2 * p.tokens_per_s, "c")
        for p in synthetic(TRUE, [32], group="c")
    ]
    before, after, per_trial = prequential([first, second, odd])
    assert len(per_trial) == 2  # the first trial is never scored: nothing came before it
    assert per_trial[0] < 2.0  # trial b, predicted from a's fit
    assert per_trial[1] == pytest.approx(50.0, abs=2.0)  # trial c: |1 - 2| / 2
    assert after == pytest.approx((2 * per_trial[0] + per_trial[1]) / 3, rel=1e-6)
    prior_errors = [
        abs(predict_point(Efficiency(), p) - p.tokens_per_s) / p.tokens_per_s
        for p in (*second, *odd)
    ]
    assert before == pytest.approx(100 * sum(prior_errors) / 3, rel=1e-6)
    # In-sample, the fit that saw the odd trial looks better on it than prequentially.
    seen_all = fit([*first, *second, *odd])
    assert abs(seen_all.residuals[-1]) < 0.5


def test_prequential_needs_two_trials() -> None:
    assert prequential([synthetic(TRUE, [1, 8])]) == (None, None, [])
    assert prequential([]) == (None, None, [])


def test_mape_is_a_percentage_and_ignores_missing_truth() -> None:
    assert mape([110.0, 90.0], [100.0, 100.0]) == pytest.approx(10.0)
    assert mape([1.0], [0.0]) is None


def test_calibration_json_round_trips() -> None:
    cal = fit(synthetic(TRUE, LADDER))
    again = Calibration.from_json(cal.to_json())
    assert again.efficiency == cal.efficiency and again.fitted == cal.fitted
    assert again.points_used == cal.points_used and again.residuals == cal.residuals
    assert again.mape_after == cal.mape_after


@pytest.mark.parametrize(
    "factors",
    [
        None,
        {},
        {"memory_bandwidth": 0.5, "compute": 0.5},
        {"memory_bandwidth": 0, "compute": 1, "step_overhead_s": 0},
        {"memory_bandwidth": "x", "compute": 1, "step_overhead_s": 0},
    ],
)
def test_bad_factors_are_refused(factors: object) -> None:
    with pytest.raises(ValueError):
        efficiency_from_json(factors)
