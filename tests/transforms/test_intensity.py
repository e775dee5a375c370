"""Intensity transforms: hand-computed numbers, constant images, channels, masks, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor

from monai_skipts.transforms import (
    EXTRA_META,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WINDOW_PRESETS,
    BinarizeMask,
    BinarizeMaskd,
    BitRangeScaleIntensity,
    BitRangeScaleIntensityd,
    ForegroundZScore,
    ImageNetNormalize,
    PercentileScaleIntensity,
    ToThreeChannels,
    WindowIntensity,
    WindowIntensityd,
)
from monai_skipts.utils import InputDataError


def meta_img(values, **meta) -> MetaTensor:
    meta = {**EXTRA_META, "filename_or_obj": "/data/x.dcm", **meta}
    return MetaTensor(torch.as_tensor(values, dtype=torch.float32), meta=meta)


@pytest.mark.parametrize(
    "name,hu,expected",
    [
        ("brain", [-100, 0, 40, 60, 80, 500], [0, 0, 0.5, 0.75, 1, 1]),  # 40/80: [0, 80]
        ("subdural", [-20, 30, 80, 180, 300], [0, 0.25, 0.5, 1, 1]),  # 80/200: [-20, 180]
        ("lung", [-1350, -975, -600, 150, 400], [0, 0.25, 0.5, 1, 1]),  # -600/1500: [-1350, 150]
        ("abdomen", [-160, -60, 40, 240], [0, 0.25, 0.5, 1]),  # 40/400: [-160, 240]
        ("bone", [-500, 400, 850, 1300], [0, 0.5, 0.75, 1]),  # 400/1800: [-500, 1300]
    ],
)
def test_window_presets(name, hu, expected):
    out = WindowIntensity(name)(meta_img([[hu]]))
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-6)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "/data/x.dcm"


def test_window_explicit_and_from_file():
    out = WindowIntensity((100, 50))(torch.tensor([[[75.0, 100, 125]]]))
    np.testing.assert_allclose(out[0, 0].numpy(), [0, 0.5, 1])
    img = meta_img([[[10.0, 20.0, 30.0]]], window_center=20.0, window_width=20.0)
    out = WindowIntensityd("image", window="dicom")({"image": img})["image"]
    np.testing.assert_allclose(out[0, 0].numpy(), [0, 0.5, 1])
    with pytest.raises(InputDataError, match="/data/x.dcm: has no WindowCenter"):
        WindowIntensity("dicom")(meta_img([[[1.0]]]))
    with pytest.raises(ValueError, match="unknown window"):
        WindowIntensity("liver")
    with pytest.raises(ValueError, match="positive"):
        WindowIntensity((40, 0))
    assert WINDOW_PRESETS["brain"] == (40.0, 80.0) and WINDOW_PRESETS["lung"] == (-600.0, 1500.0)


def test_window_scales_pictures_by_bit_range():
    png = meta_img([[[0.0, 51.0, 255.0]]], source_format="picture", value_min=0.0, value_max=255.0)
    np.testing.assert_allclose(WindowIntensity("brain")(png)[0, 0].numpy(), [0, 0.2, 1])
    np.testing.assert_allclose(WindowIntensity("brain", window_pictures=True)(png)[0, 0].numpy(), [0, 0.6375, 1])


def test_bit_range_scaling():
    img8 = meta_img([[[0.0, 51.0, 255.0]]], value_min=0.0, value_max=255.0)
    np.testing.assert_allclose(BitRangeScaleIntensity()(img8)[0, 0].numpy(), [0, 0.2, 1])
    img16 = meta_img([[[0.0, 13107.0, 65535.0]]], value_min=0.0, value_max=65535.0)
    np.testing.assert_allclose(BitRangeScaleIntensityd("image")({"image": img16})["image"][0, 0].numpy(), [0, 0.2, 1])
    unknown = torch.tensor([[[2.0, 4.0, 6.0]]])  # no meta: the image's own range
    np.testing.assert_allclose(BitRangeScaleIntensity()(unknown)[0, 0].numpy(), [0, 0.5, 1])
    np.testing.assert_allclose(BitRangeScaleIntensity("image")(img8)[0, 0].numpy(), [0, 0.2, 1])
    np.testing.assert_allclose(BitRangeScaleIntensity((0, 100))(img8)[0, 0].numpy(), [0, 0.51, 1])


def test_percentile_scaling():
    x = torch.arange(1001, dtype=torch.float32).reshape(1, 7, 143)
    out = PercentileScaleIntensity()(x)  # 0.5th percentile = 5, 99.5th = 995
    assert float(out.min()) == 0 and float(out.max()) == 1
    np.testing.assert_allclose(float(out[0].reshape(-1)[500]), (500 - 5) / 990, atol=1e-6)
    assert float(PercentileScaleIntensity(0, 100)(x)[0, 0, 1]) == pytest.approx(1 / 1000)


def test_foreground_zscore():
    x = torch.tensor([[[0.0, 0.0, 2.0, 4.0, 6.0]]])  # foreground 2, 4, 6: mean 4, std 2
    np.testing.assert_allclose(ForegroundZScore()(x)[0, 0].numpy(), [0, 0, -1, 0, 1], atol=1e-6)


@pytest.mark.parametrize(
    "transform",
    [PercentileScaleIntensity(), ForegroundZScore(), BitRangeScaleIntensity("image"), BitRangeScaleIntensity()],
    ids=["percentile", "zscore", "minmax-image", "minmax-bits-unknown"],
)
@pytest.mark.parametrize("value", [0.0, 7.5, -1000.0])
def test_constant_image_gives_zeros(transform, value):
    out = transform(torch.full((1, 8, 8), value))
    assert torch.isfinite(out).all() and torch.all(out == 0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-5000, 5000, allow_nan=False, width=32), min_size=1, max_size=64),
    st.floats(-1000, 1000, width=32),
    st.floats(1, 3000, width=32),
)
def test_window_is_monotone_in_unit_range(values, center, width):
    x = torch.tensor(sorted(values), dtype=torch.float32)[None]
    out = WindowIntensity((center, width))(x)
    assert torch.all((out >= 0) & (out <= 1)) and torch.all(out[0, 1:] >= out[0, :-1])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=64))
def test_minmax_and_percentile_never_nan(values):
    x = torch.tensor(values, dtype=torch.float32)[None]
    for t in (BitRangeScaleIntensity("image"), PercentileScaleIntensity(), ForegroundZScore()):
        assert torch.isfinite(t(x)).all()


def test_three_channels():
    grey = torch.rand(1, 4, 5)
    assert torch.equal(ToThreeChannels()(grey), grey.repeat(3, 1, 1))
    rgb = torch.rand(3, 4, 5)
    assert torch.equal(ToThreeChannels()(rgb), rgb)
    rgba = torch.rand(4, 4, 5)
    assert torch.equal(ToThreeChannels()(rgba), rgba[:3])
    la = torch.rand(2, 4, 5)
    assert torch.equal(ToThreeChannels()(la), la[:1].repeat(3, 1, 1))
    with pytest.raises(InputDataError, match="/data/x.dcm: has 5 channels"):
        ToThreeChannels()(meta_img(np.zeros((5, 2, 2))))


def test_imagenet_normalize():
    x = torch.ones(3, 2, 2) * 0.5
    out = ImageNetNormalize()(x)
    expected = [(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    np.testing.assert_allclose(out[:, 0, 0].numpy(), expected, rtol=1e-6)
    with pytest.raises(InputDataError, match="1 channels"):
        ImageNetNormalize()(torch.ones(1, 2, 2))


def test_binarize_mask():
    rgba = torch.zeros(4, 2, 3)
    rgba[3] = 255  # opaque alpha alone is not foreground
    rgba[0, 1, 2] = 128
    out = BinarizeMask()(rgba)
    assert out.shape == (1, 2, 3) and out.sum() == 1 and out[0, 1, 2] == 1
    image = meta_img(np.zeros((1, 2, 3)))
    d = BinarizeMaskd("mask", like_key="image")({"image": image, "mask": None})
    assert d["mask"].shape == (1, 2, 3) and d["mask"].sum() == 0 and d["mask"].meta["filename_or_obj"] == ""
    assert "mask" not in BinarizeMaskd("mask", like_key="image", allow_missing_keys=True)({"image": image})
    bad = meta_img(np.ones((1, 4, 4)), filename_or_obj="/data/m.png")
    with pytest.raises(InputDataError, match="/data/m.png: mask size"):
        BinarizeMaskd("mask", like_key="image")({"image": image, "mask": bad})


def test_numpy_input_is_accepted():
    out = WindowIntensity("brain")(np.array([[[40.0]]], np.float64))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and math.isclose(float(out), 0.5)


def test_extra_masks_are_joined_and_batches_mixing_them_collate(tmp_path):
    """BUSI: some images have `_mask_1.png` files beside `_mask.png` (one per lesion). The lesion is
    their union, and a batch of items with and without extra masks collates (KeyError before)."""
    from monai.data import DataLoader, Dataset
    from PIL import Image

    from monai_skipts.transforms import build_preprocessing

    def png(name, box=None, value=255):
        a = np.zeros((16, 16), np.uint8)
        if box is not None:
            a[box] = value
        Image.fromarray(a).save(tmp_path / name)
        return str(tmp_path / name)

    img = png("a.png", np.s_[2:14, 2:14], 120)
    items = [
        {
            "image": img,
            "mask": png("a_mask.png", np.s_[0:4, 0:4]),
            "extra_masks": [png("a_mask_1.png", np.s_[8:12, 8:12])],
            "label": 1,
            "id": "a",
        },
        {"image": img, "mask": png("b_mask.png", np.s_[0:4, 0:4]), "label": 1, "id": "b"},
        {"image": img, "mask": None, "label": 0, "id": "c"},
    ]
    pre = build_preprocessing("ultrasound", spatial_size=16, mask_key="mask")
    batch = next(iter(DataLoader(Dataset(items, pre), batch_size=3)))
    assert "extra_masks" not in batch
    m = batch["mask"][:, 0].numpy()
    assert m[0, 0:4, 0:4].all() and m[0, 8:12, 8:12].all() and m[0].sum() == 32  # the union
    assert m[1].sum() == 16 and m[2].sum() == 0
    with pytest.raises(Exception) as info:
        pre({**items[0], "extra_masks": [str(tmp_path / "a_mask_2.png")]})
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    assert any("a_mask_2.png" in m for m in chain), chain  # a missing extra mask is named
