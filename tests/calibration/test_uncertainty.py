"""The threshold's uncertainty (:mod:`monai_skipts.calibration.uncertainty`): the FPR bound and expectation
against simulation, the normals needed, and the warning, in the training log too."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import run_doctests, threshold_calibrator
from scipy.stats import norm

from monai_skipts.calibration import (
    calibrate_threshold,
    fpr_uncertainty,
    normals_needed,
    threshold_record,
    uncertainty,
    uncertainty_warning,
)
from monai_skipts.networks import AnomalyDetector


def test_docstring_examples_run():
    run_doctests(uncertainty)


def _simulated_fprs(n: int, target: float, method: str, sets: int, seed: int) -> np.ndarray:
    """The true FPR of the threshold calibrate_threshold sets on each of ``sets`` calibration sets of
    ``n`` lognormal scores (log-scores standard normal, so the true FPR is known in closed form)."""
    rng = np.random.default_rng(seed)
    out = np.empty(sets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(sets):
            t = calibrate_threshold(np.exp(rng.standard_normal(n)), target, method=method)
            out[i] = norm.sf(np.log(t))
    return out


@pytest.mark.parametrize(
    "n, target, method",
    [
        (10, 0.05, "empirical"),
        (40, 0.05, "empirical"),
        (100, 0.1, "empirical"),
        (12, 0.05, "lognormal"),
        (60, 0.05, "lognormal"),
    ],
)
def test_fpr_bound_and_expectation_match_a_monte_carlo_simulation(n, target, method):
    fprs = _simulated_fprs(n, target, method, sets=4000, seed=n)
    u = fpr_uncertainty(n, target, method)
    # the bound holds with its confidence: 90 % of calibration sets at or below it (MC sd 0.005)
    assert np.mean(fprs <= u["fpr_bound"]) == pytest.approx(0.9, abs=0.02)
    assert fprs.mean() == pytest.approx(u["fpr_expected"], rel=0.06)
    assert u["fpr_uncertainty"] == ("beta_order_statistic" if method == "empirical" else "normal_tolerance")


def test_parametric_methods_below_their_minimum_use_the_order_statistic():
    assert fpr_uncertainty(5, 0.05, "lognormal") == fpr_uncertainty(5, 0.05, "empirical")


def test_normals_needed_is_the_first_n_whose_bound_is_twice_the_target():
    for method in ("empirical", "lognormal"):
        n = normals_needed(0.05, method)
        assert fpr_uncertainty(n, 0.05, method)["fpr_bound"] <= 0.1 < fpr_uncertainty(n - 1, 0.05, method)["fpr_bound"]


def test_the_warning_names_the_bound_and_the_normals_needed():
    few = threshold_record(np.linspace(1.0, 2.0, 10), 0.05, "lognormal")
    msg = uncertainty_warning(few)
    assert msg == (
        "the decision threshold was calibrated on 10 normals (lognormal): with 90 % confidence its false-positive "
        f"rate is at most {100 * few['fpr_bound']:.1f} % (expected {100 * few['fpr_expected']:.1f} %), more than 2 x "
        "the target 5 %; 32 calibration normals (22 more) would bring that bound to 10 % (--val_fraction, more "
        "normal images, or --calibration_folds K)"
    )
    assert few["n_normals_needed"] == 32 and few["fpr_bound"] > 0.1
    assert uncertainty_warning(threshold_record(np.linspace(1.0, 2.0, 40), 0.05, "lognormal")) is None


def test_calibrator_warns_in_the_training_log_when_the_bound_is_above_twice_the_target(skipts, tmp_path, caplog):
    records = [{"id": str(i), "score": float(s)} for i, s in enumerate(np.linspace(1.0, 2.0, 10))]
    with caplog.at_level("WARNING", logger="monai_skipts.handlers.training"):
        rec = threshold_calibrator(AnomalyDetector(skipts), tmp_path, records, target_fpr=0.05, method="lognormal")()
    assert [r.getMessage() for r in caplog.records] == [uncertainty_warning(rec)]
    assert "32 calibration normals (22 more)" in caplog.text
