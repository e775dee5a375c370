"""The pixel threshold (:mod:`monai_skipts.calibration.pixel`): a subsampled sketch of the normal maps'
pixels inside the anatomy holds the pixel FPR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_doctests

from monai_skipts.calibration import PixelScoreSketch, pixel, pixel_threshold


def test_docstring_examples_run():
    run_doctests(pixel)


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
