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
