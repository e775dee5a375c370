"""AnatomyMask on real images: the body is covered, background and captions outside it are not;
RandBurnedInAnnotation draws seeded captions and markers and reports their pixels."""

from __future__ import annotations

import doctest
import glob
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from monai_skipts.transforms import (
    AnatomyMask,
    AnatomyMaskd,
    RandBurnedInAnnotation,
    RandBurnedInAnnotationd,
    build_preprocessing,
)
from monai_skipts.transforms import anatomy as anatomy_module

DATA = Path(os.environ.get("SKIPTS_DATA_ROOT") or Path(__file__).resolve().parents[2].parent / "shared" / "data")


def _hu(name: str) -> torch.Tensor:
    ds = pydicom.dcmread(get_testdata_file(name))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return torch.as_tensor(hu)[None]


def test_docstring_examples_run():
    result = doctest.testmod(anatomy_module)
    assert result.failed == 0 and result.attempted > 0


def test_ct_body_from_hu_excludes_air_and_a_caption_in_it():
    img = _hu("CT_small.dcm")
    air = img[0] < -500
    assert air.float().mean() > 0.1  # the file has air in its top right corner
    assert bool(air[2:10, 118:126].all())
    img[0, 4:8, 120:124] = 1000.0  # a bright caption in the air, not touching the body
    mask = AnatomyMask("ct_brain")(img)[0] > 0
    body = ~air
    body[4:8, 120:124] = False
    assert mask[body].float().mean() > 0.95  # the body is covered
    assert not mask[4:8, 120:124].any()  # the caption is a separate component
    assert mask[air].float().mean() < 0.1


def test_ct_mask_after_the_preset_chain_keeps_the_body():
    """At the point the networks see the image (brain window, 3 channels, ImageNet-normalised), the
    body is still found (fat clipped to the window floor lies outside when it is not enclosed)."""
    x = build_preprocessing("ct_brain", spatial_size=64)({"image": get_testdata_file("CT_small.dcm")})["image"]
    mask = AnatomyMask("ct_brain")(x)[0] > 0
    hu = torch.nn.functional.interpolate(_hu("CT_small.dcm")[None], size=(64, 64), mode="nearest")[0, 0]
    assert mask.shape == (64, 64)
    assert mask[hu > 0].float().mean() > 0.9  # soft tissue and bone
    assert mask[hu < -500].float().mean() < 0.1  # air


def test_xray_collimation_frame_is_background():
    x = build_preprocessing("xray", spatial_size=128)({"image": get_testdata_file("RG3_UNCR.dcm")})["image"]
    grey = x.mean(0)
    frame = grey >= grey.max() - 1e-4
    assert frame.float().mean() > 0.2  # the file's white collimation border
    mask = AnatomyMask("xray")(x)[0] > 0
    assert 0.05 < mask.float().mean() < 0.5  # the leg
    assert not mask[frame].any()


def test_ultrasound_excludes_the_captions_around_the_image():
    x = build_preprocessing("ultrasound", spatial_size=128)({"image": get_testdata_file("US1_UNCR.dcm")})["image"]
    mask = AnatomyMask("ultrasound")(x)[0] > 0
    assert 0.15 < mask.float().mean() < 0.6
    # the file's header text and the scale bar at the bottom are outside the tissue
    assert not mask[:20].any() and not mask[-12:].any()


@pytest.mark.parametrize("folder", ["brainmri/no", "lgg_mri/kaggle_3m"])
def test_brain_mri_covers_the_head_and_not_the_corners(folder):
    files = sorted(f for f in glob.glob(str(DATA / folder / "**" / "*.*"), recursive=True) if "_mask" not in f)
    files = [f for f in files if f.lower().endswith((".png", ".jpg", ".jpeg", ".tif"))][:3]
    if not files:
        pytest.skip(f"no images under {DATA / folder}")
    for f in files:
        x = build_preprocessing("mri", spatial_size=64)({"image": f})["image"]
        mask = AnatomyMask("mri")(x)[0] > 0
        assert mask[28:36, 28:36].all(), f  # the centre of the head
        assert not mask[:3, :3].any() and not mask[-3:, -3:].any(), f
        assert 0.2 < mask.float().mean() < 0.95, f


def test_mask_is_invariant_to_the_intensity_convention():
    x = build_preprocessing("mri", spatial_size=64)({"image": get_testdata_file("MR_small.dcm")})["image"]
    unit = x * 0.229 + 0.485  # back to [0, 1] (grey: one channel's statistics)
    a, b = AnatomyMask("mri")(x[:1]), AnatomyMask("mri")(unit[:1])
    assert torch.equal(a, b)


def test_dictionary_version_and_constant_image():
    d = AnatomyMaskd("image", mask_key="anatomy", modality="ultrasound")({"image": torch.ones(3, 16, 16)})
    assert d["anatomy"].shape == (1, 16, 16) and float(d["anatomy"].sum()) == 0
    with pytest.raises(ValueError, match="modality"):
        AnatomyMask("pet")


def test_burned_in_annotation_is_seeded_and_reports_its_pixels():
    img = torch.linspace(-1, 1, 3 * 64 * 64).reshape(3, 64, 64)
    outs = []
    for _ in range(2):
        t = RandBurnedInAnnotationd("image", prob=1.0, mask_key="annotation")
        t.set_random_state(3)
        outs.append(t({"image": img.clone()}))
    assert torch.equal(outs[0]["image"], outs[1]["image"])
    changed = (outs[0]["image"] != img).any(0)
    drawn = outs[0]["annotation"][0] > 0
    assert changed.any() and bool((changed <= drawn).all())
    # drawn in the image's own extreme values, per channel
    vals = outs[0]["image"][:, drawn]
    flat = img.reshape(3, -1)
    assert bool(((vals == flat.amax(1)[:, None]) | (vals == flat.amin(1)[:, None])).all())
    never = RandBurnedInAnnotation(prob=0.0)
    assert torch.equal(never(img), img) and float(never.last_mask.sum()) == 0
