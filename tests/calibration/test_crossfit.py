"""Cross-fitted calibration (:mod:`monai_skipts.calibration.crossfit`): the folds partition the training
normals, and the demo bundle calibrates on their out-of-fold scores."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, run_doctests
from monai.bundle import run as bundle_run

from monai_skipts.calibration import CrossFitScorer, calibrate_threshold, crossfit, fpr_uncertainty


def test_docstring_examples_run():
    run_doctests(crossfit)


def test_cross_fit_folds_partition_the_training_normals():
    scorer = CrossFitScorer(3, torch.nn.Linear(1, 1), [{"id": str(i)} for i in range(10)], None, None, seed=4)
    fold = scorer.fold_of()
    assert sorted(np.bincount(fold).tolist()) == [3, 3, 4] and fold == scorer.fold_of()
    with pytest.raises(ValueError, match="needs at least 3 training normals"):
        CrossFitScorer(3, torch.nn.Linear(1, 1), [{"id": "a"}], None, None)


def test_demo_bundle_calibrates_on_cross_fitted_out_of_fold_scores(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    bundle_run(
        config_file="bundles/demo/train.json",
        output_dir=str(out),
        epochs=1,
        spatial_size=64,
        mlflow=False,
        calibration_folds=2,
    )
    split = json.loads((out / "split.json").read_text())
    record = json.loads((out / "threshold.json").read_text())
    assert record["method"] == "cross_fit" and record["estimator"] == "lognormal" and record["n_folds"] == 2
    assert record["n_normals"] == len(split["train"]) and record["n_validation_normals"] == len(split["val"])
    with open(out / "cross_fit_scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [d["id"] for d in split["train"]]
    assert {r["fold"] for r in rows} == {"0", "1"}
    pooled = np.array([float(r["score"]) for r in rows])
    assert record["value"] == pytest.approx(calibrate_threshold(pooled, 0.05, method="lognormal"))
    assert record["fpr_bound"] == pytest.approx(fpr_uncertainty(len(rows), 0.05, "lognormal")["fpr_bound"])
    ckpt = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["calibration"] == record
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibration"] == record and metrics["calibration_fpr_bound"] == record["fpr_bound"]
    # the outline threshold from the validation normals' pixels, used for dice (dice_best stays the oracle)
    assert record["pixel"]["target_fpr"] == 0.005 and record["pixel"]["n_images"] == len(split["val"])
    assert metrics["dice_threshold"] == record["pixel"]["value"] and metrics["dice_threshold_kind"] == "pixel"
    assert "dice_best" in metrics
    logged = "".join(capfd.readouterr())  # the bundle's logging.conf logs to the console
    assert f"from {len(rows)} out-of-fold training normals (2 folds)" in logged
    assert "with 90 % confidence" in logged
    # benchmarks/calibration.py prints the cross-fitted rows beside the validation-normal methods
    done = subprocess.run(
        [sys.executable, "benchmarks/calibration.py", str(out), "--out", str(tmp_path / "calibration.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"lognormal", "cross_fit/lognormal", "cross_fit/empirical"} <= rows
    bench = json.loads((tmp_path / "calibration.json").read_text())["0.05"]
    assert bench["cross_fit/lognormal"]["datasets"]["mvtec"]["n"] == [len(split["train"])]
