"""The decision threshold (:mod:`monai_skipts.calibration.threshold`): the order statistic flags at most
``floor(target · n)`` normals and is the smallest threshold that does, ties included; it holds the target on
fresh normals; too few normals warn (or raise), bad input is refused."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from monai_skipts.calibration import (
    CalibrationWarning,
    calibrate_threshold,
    check_calibration_data,
    min_calibration_normals,
)


def brute_force_calibration(scores, target_fpr):
    """Smallest candidate (observed score, or just above the max) with flagged fraction <= target."""
    scores = np.asarray(scores, float)
    candidates = sorted(set(scores.tolist()) | {float(np.nextafter(scores.max(), np.inf))})
    return next(t for t in candidates if np.sum(scores >= t) <= target_fpr * len(scores) + 1e-9)


def test_threshold_is_the_smallest_score_flagging_at_most_floor_target_times_n_normals():
    s = np.arange(1.0, 21.0)  # 20 normals
    assert calibrate_threshold(s, 0.05) == 20.0  # 1 of 20 flagged
    assert calibrate_threshold(s, 0.10) == 19.0  # 2 of 20
    assert calibrate_threshold(s, 0.12) == 19.0  # floor(2.4) = 2
    assert calibrate_threshold(s[::-1].copy(), 0.10) == 19.0  # order does not matter
    s100 = np.arange(100.0)
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 allowed
    t = calibrate_threshold(s100, 0.29)
    assert t == 71.0 and np.sum(s100 >= t) == 29


def test_tied_top_scores_are_flagged_together_or_not_at_all():
    s = [1.0, 2.0, 3.0, 3.0, 3.0]
    # 1 allowed, but the top three tie: none can be flagged alone -> just above 3
    t = calibrate_threshold(s, 0.2)
    assert 3.0 < t < 3.0 + 1e-12
    assert calibrate_threshold(s, 0.6) == 3.0  # 3 allowed: exactly the tie at 3


def test_threshold_is_the_one_a_brute_force_search_over_candidates_finds():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(20, 80))
        s = rng.integers(0, 15, n).astype(float)
        f = float(rng.choice([0.05, 0.1, 0.2, 0.25, 0.5]))
        t = calibrate_threshold(s, f)
        assert t == brute_force_calibration(s, f)
        assert np.mean(s >= t) <= f


def test_threshold_from_many_normals_holds_the_target_fpr_on_fresh_normals():
    rng = np.random.default_rng(2)
    for target in (0.01, 0.05, 0.1):
        t = calibrate_threshold(rng.normal(size=20_000), target)
        fresh = rng.normal(size=200_000)
        assert abs(np.mean(fresh >= t) - target) < 0.01


def test_too_few_normals_warn_or_raise_and_flag_no_normal():
    s = np.arange(10.0)
    with pytest.warns(CalibrationWarning, match=r"only 10 normal score\(s\).*needs at least 20"):
        t = calibrate_threshold(s, 0.05)
    assert t > 9.0 and np.sum(s >= t) == 0
    with pytest.raises(ValueError, match="cannot resolve"):
        calibrate_threshold(s, 0.05, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate_threshold(np.arange(20.0), 0.05)  # exactly enough: no warning
    # float32 scores: the threshold stays above the max after a round trip through float32
    s32 = np.array([0.1, 0.7], dtype=np.float32)
    with pytest.warns(CalibrationWarning):
        t32 = calibrate_threshold(s32, 0.05)
    assert np.float32(t32) > s32.max()


def test_no_scores_non_finite_scores_and_a_target_outside_0_1_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        calibrate_threshold([], 0.05)
    with pytest.raises(ValueError, match=r"1 non-finite"):
        calibrate_threshold([0.1, np.nan], 0.5)
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="target_fpr"):
            calibrate_threshold([0.1, 0.2], bad)


@pytest.mark.parametrize("method, suggests_lognormal", [("empirical", True), ("lognormal", False), ("gaussian", False)])
def test_too_small_a_validation_split_is_refused_with_what_to_change(method, suggests_lognormal):
    with pytest.raises(ValueError, match="split.json: 5 validation normals cannot calibrate target_fpr=0.05") as err:
        check_calibration_data(5, 0.05, method, source="split.json")
    message = str(err.value)
    assert f"{method!r} calibration (needs at least {min_calibration_normals(0.05, method)})" in message
    assert ("--calibration lognormal" in message) is suggests_lognormal and "--val_fraction" in message
    assert check_calibration_data(20, 0.05, method) == 20
