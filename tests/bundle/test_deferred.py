"""Values known only after a step (:mod:`monai_skipts.bundle.deferred`): they follow the calibrator."""

from __future__ import annotations

import os

from conftest import run_doctests

from monai_skipts import bundle
from monai_skipts.bundle import deferred
from monai_skipts.networks import AnomalyDetector


def test_docstring_examples_run():
    run_doctests(deferred)


def test_deferred_values_and_metrics_extras_follow_the_calibrator(skipts, tmp_path):
    from monai_skipts.handlers import ThresholdCalibrator

    calibrator = ThresholdCalibrator(
        evaluator=None, score_handler=None, network=AnomalyDetector(skipts), output_dir=tmp_path
    )
    threshold = bundle.deferred_attribute(calibrator, "threshold")
    split = {"train": [], "report": {"counts": {"train": 5, "val": 2}}}
    extras = bundle.metrics_extras(split, calibrator=calibrator, teacher="efficientnet_lite0", epochs=1, seed=0)
    assert threshold() is None and extras()["calibration"] is None
    calibrator.threshold, calibrator.record = 0.8, {"value": 0.8, "method": "empirical"}
    assert threshold() == 0.8
    assert extras() == {
        "split": {"train": 5, "val": 2},
        "teacher": "efficientnet_lite0",
        "epochs": 1,
        "seed": 0,
        "calibration": {"value": 0.8, "method": "empirical"},
    }
    evaluated = bundle.metrics_extras(split, network=AnomalyDetector(skipts), checkpoint="runs/x/model.pt")()
    assert evaluated == {
        "checkpoint": os.path.abspath("runs/x/model.pt"),
        "teacher": "efficientnet_lite0",
        "split": {"train": 5, "val": 2},
    }
