"""The sample MONAI Label app, loaded as ``monailabel start_server`` loads it, answering infer requests
on a PNG and a NIfTI study. Runs in the monailabel environment (``.ci/label_env.sh``); skipped elsewhere."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

monailabel = pytest.importorskip("monailabel")
itk = pytest.importorskip("itk")

from conftest import save_test_checkpoint  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.utils.app import app_instance, clear_cache  # noqa: E402

import monai_skipts.label as skipts_label  # noqa: E402
from monai_skipts.inference import AnomalyPredictor  # noqa: E402
from monai_skipts.networks import SkipTS  # noqa: E402
from monai_skipts.transforms import LoadMedicalImage  # noqa: E402

THRESHOLD = {"value": 1.0, "scale": 0.1, "target_fpr": 0.05, "n_normals": 20}


@pytest.fixture(scope="module")
def app(tmp_path_factory, phantom_root):
    tmp = tmp_path_factory.mktemp("label")
    torch.manual_seed(0)
    ckpt = save_test_checkpoint(
        tmp / "model.pt",
        SkipTS("efficientnet_lite0"),
        threshold=THRESHOLD,
        extra={"spatial_size": 32, "modality": "mri"},
    )
    studies = tmp / "studies"
    studies.mkdir()
    shutil.copy(sorted(phantom_root.glob("test/lesion/*.png"))[0], studies / "phantom.png")
    vol = np.random.default_rng(0).normal(100, 20, (20, 24, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([-0.8, 0.9, 2.5, 1.0])), studies / "volume.nii.gz")
    mp = pytest.MonkeyPatch()
    for key in ("MONAI_LABEL_SESSIONS", "MONAI_LABEL_DATASTORE_AUTO_RELOAD", "MONAI_LABEL_TASKS_TRAIN"):
        mp.setattr(settings, key, False)
    clear_cache()
    conf = {"checkpoint": str(ckpt), "batch_size": "4"}
    instance = app_instance(str(skipts_label.APP_DIR), str(studies), conf)  # main.py, as start_server loads it
    yield instance, ckpt, studies
    clear_cache()
    mp.undo()


def test_app_info_lists_the_model(app):
    instance, _, _ = app
    info = instance.info()
    assert "skipts_anomaly" in info["models"] and info["models"]["skipts_anomaly"]["labels"] == {"anomaly": 1}
    assert sorted(instance.datastore().list_images()) == ["phantom", "volume"]


def test_infer_png_returns_map_and_decision(app):
    instance, ckpt, studies = app
    res = instance.infer({"model": "skipts_anomaly", "image": "phantom", "device": "cpu"})
    params = res["params"]
    assert set(params) >= {"score", "threshold", "anomalous", "normalized_score"}
    assert params["kind"] == "image" and params["threshold"] == THRESHOLD["value"]
    assert params["anomalous"] == (params["score"] >= THRESHOLD["value"])
    assert (params["normalized_score"] >= 0.5) == params["anomalous"]
    assert res["file"].endswith(".nrrd")
    written = itk.array_from_image(itk.imread(res["file"]))  # (rows, columns)
    want = AnomalyPredictor(ckpt).score_file(studies / "phantom.png")
    assert written.shape == tuple(want["map"].shape) == (64, 64)
    np.testing.assert_allclose(written, want["map"].numpy(), atol=1e-5)  # same orientation, same values
    assert params["score"] == pytest.approx(want["score"], abs=1e-6)

    mask = instance.infer({"model": "skipts_anomaly", "image": "phantom", "device": "cpu", "output": "mask"})
    m = itk.array_from_image(itk.imread(mask["file"]))
    assert mask["file"].endswith(".png") and m.shape == (64, 64) and m.dtype == np.uint8
    np.testing.assert_array_equal(m, (want["map"].numpy() >= THRESHOLD["value"]).astype(np.uint8))


def test_infer_nifti_volume_returns_map_volume_and_volume_score(app):
    instance, ckpt, studies = app
    res = instance.infer({"model": "skipts_anomaly", "image": "volume", "device": "cpu"})
    params = res["params"]
    assert params["kind"] == "volume" and len(params["slice_scores"]) == 5
    assert params["score"] == pytest.approx(max(params["slice_scores"]))  # volume_aggregation "max"
    assert params["anomalous"] == (params["score"] >= THRESHOLD["value"])
    assert res["file"].endswith(".nii.gz")
    out, src = nib.load(res["file"]), nib.load(studies / "volume.nii.gz")
    assert out.shape == src.shape == (20, 24, 5)
    # same world geometry: compare in the canonical (RAS) orientation
    out_c, src_c = nib.as_closest_canonical(out), nib.as_closest_canonical(src)
    np.testing.assert_allclose(out_c.affine, src_c.affine, atol=1e-4)
    written = LoadMedicalImage()(str(res["file"]))  # RAS, as the input volume is scored
    want = AnomalyPredictor(ckpt).score_file(studies / "volume.nii.gz")
    np.testing.assert_allclose(written[0].numpy(), want["map"].numpy(), atol=1e-5)
    assert params["score"] == pytest.approx(want["score"], abs=1e-6)


def test_relative_checkpoint_is_taken_against_the_start_folder(app, tmp_path, monkeypatch):
    """``monailabel start_server --app <APP_DIR> --conf checkpoint runs/.../model.pt``
    started from the folder holding ``runs/`` finds the checkpoint (it used to be looked up under the
    app folder); a missing one is named with the folder relative paths are taken against."""
    _, ckpt, studies = app
    (tmp_path / "runs" / "x").mkdir(parents=True)
    shutil.copy(ckpt, tmp_path / "runs" / "x" / "model.pt")
    monkeypatch.chdir(tmp_path)
    clear_cache()
    try:
        instance = app_instance(str(skipts_label.APP_DIR), str(studies), {"checkpoint": "runs/x/model.pt"})
        assert instance.checkpoint == tmp_path / "runs" / "x" / "model.pt"
        res = instance.infer({"model": "skipts_anomaly", "image": "phantom", "device": "cpu"})
        assert res["params"]["threshold"] == THRESHOLD["value"]
        clear_cache()
        with pytest.raises(
            FileNotFoundError, match=f"{tmp_path / 'runs' / 'y' / 'model.pt'}.*started from, {tmp_path}"
        ):
            app_instance(str(skipts_label.APP_DIR), str(studies), {"checkpoint": "runs/y/model.pt"})
    finally:
        clear_cache()


def test_mask_and_volume_follow_the_pixel_and_volume_thresholds(app, tmp_path):
    """A checkpoint calibrated with volume and pixel thresholds: the PNG mask is drawn at the pixel
    threshold and the NIfTI volume is decided with the volume threshold, each named in the result."""
    _, ckpt, studies = app
    png = AnomalyPredictor(ckpt).score_file(studies / "phantom.png")
    vol = AnomalyPredictor(ckpt).score_file(studies / "volume.nii.gz")
    pixel = float(np.median(png["map"].numpy()))  # about half the pixels above it
    record = dict(
        THRESHOLD,
        value=vol["score"] + 1.0,  # the image threshold would call the volume normal ...
        volume={"value": vol["score"] - 1e-3, "method": "sidak"},  # ... its volume threshold anomalous
        pixel={"value": pixel, "target_fpr": 0.005},
    )
    torch.manual_seed(0)  # the same weights as the app fixture's checkpoint
    calibrated = save_test_checkpoint(
        tmp_path / "model.pt",
        SkipTS("efficientnet_lite0"),
        threshold=record,
        extra={"spatial_size": 32, "modality": "mri"},
    )
    clear_cache()
    try:
        instance = app_instance(str(skipts_label.APP_DIR), str(studies), {"checkpoint": str(calibrated)})
        res = instance.infer({"model": "skipts_anomaly", "image": "volume", "device": "cpu"})["params"]
        assert res["threshold_kind"] == "volume" and res["threshold"] == pytest.approx(vol["score"] - 1e-3)
        assert res["anomalous"] is True and res["score"] == pytest.approx(vol["score"], abs=1e-6)
        mask = instance.infer({"model": "skipts_anomaly", "image": "phantom", "device": "cpu", "output": "mask"})
        assert mask["params"]["mask_threshold_kind"] == "pixel"
        assert mask["params"]["mask_threshold"] == pytest.approx(pixel)
        m = itk.array_from_image(itk.imread(mask["file"]))
        np.testing.assert_array_equal(m, (png["map"].numpy() >= pixel).astype(np.uint8))
        assert 0.3 < m.mean() < 0.7  # not the image threshold's (empty) mask
    finally:
        clear_cache()


def test_site_normals_recalibrate_the_served_model(app, tmp_path, phantom_root):
    """``--conf site_normals <folder>``: the app scores the site's normals when it starts, writes
    ``<app>/model/site_model.pt`` with their threshold and serves it."""
    _, ckpt, studies = app
    app_dir = tmp_path / "app"
    shutil.copytree(skipts_label.APP_DIR, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    normals = sorted(phantom_root.glob("train/good/*.png"))
    site = tmp_path / "site_normals"
    site.mkdir()
    for f in normals:
        shutil.copy(f, site / f.name)
    clear_cache()
    try:
        conf = {"checkpoint": str(ckpt), "site_normals": str(site)}
        instance = app_instance(str(app_dir), str(studies), conf)
        assert instance.checkpoint == (app_dir / "model" / "site_model.pt").resolve()
        record = torch.load(instance.checkpoint, weights_only=True)["config"]["calibration"]
        assert record["source"] == "site" and record["n_normals"] == len(normals)
        assert record["value"] != THRESHOLD["value"] and record["previous"]["value"] == THRESHOLD["value"]
        res = instance.infer({"model": "skipts_anomaly", "image": "phantom", "device": "cpu"})["params"]
        assert res["threshold"] == pytest.approx(record["value"])
        assert res["anomalous"] == (res["score"] >= record["value"])
    finally:
        clear_cache()
