"""The volume threshold (:mod:`monai_skipts.calibration.volume`): from slices (Šidák) or from validation
volumes it holds the volume FPR where the slice threshold does not, and the calibrator records it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_doctests, threshold_calibrator

from monai_skipts.calibration import calibrate_threshold, sidak_slice_fpr, volume, volume_threshold
from monai_skipts.checkpoint import load_detector
from monai_skipts.networks import AnomalyDetector
from monai_skipts.transforms import aggregate_volume_scores


def test_docstring_examples_run():
    run_doctests(volume)


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


def test_calibrator_records_a_volume_threshold_from_the_validation_volumes(skipts, tmp_path):
    rng = np.random.default_rng(3)
    ids, x = _volumes(rng, 30, 8, shared=0.5)
    records = [{"id": f"v{v}/{k}", "score": float(s)} for k, (v, s) in enumerate(zip(ids, x))]
    val = [{"id": r["id"], "image": r["id"], "label": 0, "volume_id": f"v{v}"} for r, v in zip(records, ids)]
    detector = AnomalyDetector(skipts)
    rec = threshold_calibrator(detector, tmp_path, records, target_fpr=0.05, method="lognormal", val_data=val)()
    want = volume_threshold(x, 0.05, "lognormal", volume_ids=[f"v{v}" for v in ids])
    assert rec["volume"] == want and rec["volume"]["source"] == "volumes" and rec["volume"]["n_normals"] == 30
    assert rec["volume"]["value"] > rec["value"]  # a volume's max over 8 slices: a higher threshold
    assert torch.load(tmp_path / "model.pt", weights_only=True)["config"]["calibration"]["volume"] == want
    served = load_detector(tmp_path / "model.pt")
    assert float(served.volume_threshold) == want["value"] and float(served.threshold) == rec["value"]
    # only slices (no volume ids): the Šidák correction for the stated slice count
    rec = threshold_calibrator(detector, tmp_path, records, method="lognormal", volume_slices=8)()
    assert rec["volume"]["source"] == "sidak" and rec["volume"]["n_slices"] == 8
