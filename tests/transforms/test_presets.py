"""Modality presets: build_preprocessing on real images, and the transforms/*.json bundle fragments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from PIL import Image
from pydicom.data import get_testdata_file

from monai_skipts.transforms import IMAGENET_MEAN, IMAGENET_STD, PRESETS, build_preprocessing

REPO = Path(__file__).resolve().parents[2]
SIZE = 32


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    Image.fromarray(grey).save(d / "grey.png")
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / "rgb.jpg")
    mask = np.zeros((40, 50), np.uint8)
    mask[10:20, 5:25] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return {k: str(d / f) for k, f in [("grey", "grey.png"), ("rgb", "rgb.jpg"), ("mask", "mask.png")]}


def _inputs(pictures):
    return {
        "ct_brain": get_testdata_file("CT_small.dcm"),
        "ct_lung": get_testdata_file("CT_small.dcm"),
        "mri": get_testdata_file("MR_small.dcm"),
        "xray": get_testdata_file("RG3_UNCR.dcm"),
        "ultrasound": pictures["grey"],
        "rgb": pictures["rgb"],
    }


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return x * std + mean


@pytest.mark.parametrize("modality", PRESETS)
def test_build_preprocessing_on_real_images(modality, pictures):
    out = build_preprocessing(modality, spatial_size=SIZE)({"image": _inputs(pictures)[modality]})["image"]
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32 and torch.isfinite(out).all()
    unit = _unnormalise(out.as_tensor())
    assert float(unit.min()) >= -1e-5 and float(unit.max()) <= 1 + 1e-5 and float(unit.std()) > 0.01
    if modality != "rgb":  # grey replicated
        assert torch.allclose(unit[0], unit[1], atol=1e-5) and torch.allclose(unit[0], unit[2], atol=1e-5)


def test_ct_preset_windows_hu():
    """CT_small through ct_brain, resize off (same size): equals the hand window of the HU values."""
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip((hu - 0.0) / 80.0, 0, 1)  # brain: centre 40, width 80 -> [0, 80]
    item = {"image": get_testdata_file("CT_small.dcm")}
    out = build_preprocessing("ct_brain", spatial_size=128)(item)["image"]
    np.testing.assert_allclose(_unnormalise(out.as_tensor())[0].numpy(), expected, atol=1e-5)
    sub = build_preprocessing("ct_brain", spatial_size=128, window="subdural")(item)
    expected = np.clip((hu + 20) / 200, 0, 1)  # subdural: centre 80, width 200 -> [-20, 180]
    np.testing.assert_allclose(_unnormalise(sub["image"].as_tensor())[0].numpy(), expected, atol=1e-5)


def test_masks_resized_nearest_binarised_and_collated(pictures):
    pre = build_preprocessing("ultrasound", spatial_size=SIZE, mask_key="mask")
    items = [
        {"image": pictures["grey"], "mask": pictures["mask"], "label": 1},
        {"image": pictures["grey"], "mask": None, "label": 0},  # a normal image without a mask file
    ]
    batch = next(iter(DataLoader(Dataset(items, pre), batch_size=2)))
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["mask"].shape == (2, 1, SIZE, SIZE)
    assert set(torch.unique(batch["mask"]).tolist()) == {0.0, 1.0} and batch["mask"][1].sum() == 0
    frac = float(batch["mask"][0].mean())
    assert abs(frac - 200 / 2000) < 0.03  # 10x20 of 40x50 pixels
    assert "mask" not in pre({"image": pictures["grey"]})


def test_preset_argument_errors():
    with pytest.raises(ValueError, match="unknown modality preset 'pet'"):
        build_preprocessing("pet")
    with pytest.raises(ValueError, match="window applies to the CT presets"):
        build_preprocessing("mri", window="brain")


@pytest.mark.parametrize("modality", PRESETS)
def test_json_fragment_in_including_config(modality, pictures, monkeypatch):
    fragment = REPO / "transforms" / f"{modality}.json"
    assert set(json.loads(fragment.read_text())) == {"preprocessing"}
    monkeypatch.chdir(REPO)  # %file paths resolve against the working directory
    parser = ConfigParser(
        {
            "spatial_size": 64,
            "preprocessing": f"%transforms/{modality}.json#preprocessing",
            "transform": {"_target_": "Compose", "transforms": "@preprocessing"},
        }
    )
    parser["spatial_size"] = SIZE  # an override of the including config reaches the fragment
    transform = parser.get_parsed_content("transform")
    item = {"image": _inputs(pictures)[modality], "mask": None}
    got = transform(item)
    want = build_preprocessing(modality, spatial_size=SIZE, mask_key="mask")(item)
    assert got["image"].shape == (3, SIZE, SIZE) and got["mask"].shape == (1, SIZE, SIZE)
    assert torch.equal(got["image"].as_tensor(), want["image"].as_tensor())
    assert [type(t).__name__ for t in transform.transforms] == [
        type(t).__name__ for t in build_preprocessing(modality, mask_key="mask").transforms
    ]


def test_every_public_name_is_exported():
    import monai_skipts.transforms as package
    from monai_skipts.transforms import intensity, io, presets, volume

    for module in (io, volume, intensity, presets):
        assert set(module.__all__) <= set(package.__all__)
    assert all(hasattr(package, name) for name in package.__all__)
