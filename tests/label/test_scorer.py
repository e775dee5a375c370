"""The serving core shared by MONAI Label and the MLflow model (needs no monailabel: runs everywhere)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import save_test_checkpoint
from PIL import Image

from monai_skipts.inference import AnomalyPredictor
from monai_skipts.networks import SkipTS
from monai_skipts.transforms import LoadMedicalImage, array_to_image, build_preprocessing, slice_to_plane, take_slice
from monai_skipts.utils import InputDataError


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_to_plane_inverts_take_slice(axis):
    vol = torch.rand(1, 5, 6, 7)
    for k in range(vol.shape[axis + 1]):
        assert torch.equal(slice_to_plane(take_slice(vol, axis, k)[0].as_tensor()), vol[0].select(axis, k))


def test_array_to_image_conventions():
    pic = array_to_image(np.full((4, 5), 51, np.uint8))
    assert pic.shape == (1, 4, 5) and pic.meta["source_format"] == "picture" and pic.meta["value_max"] == 255
    assert array_to_image(np.zeros((3, 4, 5)), bit_depth=16).meta["value_max"] == 65535
    assert array_to_image(np.zeros((4, 5), np.int16)).meta["source_format"] == "array"  # raw values (HU)
    with pytest.raises(InputDataError, match=r"img\[3\]: has shape \(2, 3, 4, 5\)"):
        array_to_image(np.zeros((2, 3, 4, 5)), name="img[3]")
    with pytest.raises(InputDataError, match="NaN"):
        array_to_image(np.full((4, 5), np.nan))


def test_scorer_png_and_volume(tmp_path, phantom_root):
    torch.manual_seed(0)
    ckpt = save_test_checkpoint(
        tmp_path / "model.pt",
        SkipTS("efficientnet_lite0"),
        threshold={"value": 1.0, "scale": 0.1},
        extra={"spatial_size": 32, "modality": "mri"},
    )
    scorer = AnomalyPredictor(ckpt, batch_size=4)
    assert scorer.config()["modality"] == "mri" and scorer.config()["spatial_size"] == [32, 32]

    png = sorted(phantom_root.glob("test/lesion/*.png"))[0]
    res = scorer.score_file(png)
    h, w = np.asarray(Image.open(png)).shape
    assert res["kind"] == "image" and res["map"].shape == (h, w)
    x = build_preprocessing("mri", 32)({"image": str(png)})["image"][None]
    with torch.no_grad():
        want = scorer.detector(x)[1].item()
    assert res["score"] == pytest.approx(want, abs=1e-6)
    assert res["anomalous"] == (res["score"] >= 1.0) and res["threshold"] == 1.0

    vol = np.random.default_rng(0).normal(100, 20, (20, 24, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([-0.8, 0.9, 2.5, 1.0])), tmp_path / "vol.nii.gz")
    res = scorer.score_file(tmp_path / "vol.nii.gz")
    loaded = LoadMedicalImage()(str(tmp_path / "vol.nii.gz"))
    assert res["kind"] == "volume" and tuple(res["map"].shape) == tuple(loaded.shape[1:]) == (20, 24, 5)
    assert len(res["slice_scores"]) == 5 and res["score"] == max(res["slice_scores"])
    torch.testing.assert_close(res["map"].affine, loaded.affine)
    k = int(np.argmax(res["slice_scores"]))  # the map of a slice is that slice's 2-D map, put back in place
    plane = scorer.score_images([take_slice(loaded, 2, k)])[1][0]
    torch.testing.assert_close(res["map"].as_tensor()[:, :, k], slice_to_plane(plane))
