"""Drawing anomaly maps: heat-map panels a clinician can read (full resolution, one fixed colour scale
per model with a colour bar, threshold and lesion outlines, a header with the score and the decision),
and the one overlay renderer the panels and the DICOM Secondary Capture share."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from matplotlib import colormaps
from PIL import Image

from monai_skipts.dicom.render import overlay_rgb
from monai_skipts.metrics import normalize_score
from monai_skipts.visualize import colorize_map, heatmap_panel, overlay_map

T, S = 0.5, 0.1  # threshold, normalize_score scale
WHITE, GREEN = (255, 255, 255), (0, 255, 0)


def _jet255(f) -> np.ndarray:
    return (255 * np.asarray(colormaps["jet"](np.asarray(f, dtype=np.float64)))[..., :3]).round()


def _roundtrip(panel: np.ndarray, tmp_path, name="p.png") -> np.ndarray:
    Image.fromarray(panel).save(tmp_path / name)
    return np.asarray(Image.open(tmp_path / name).convert("RGB"))


def _box(p: np.ndarray, box) -> np.ndarray:
    y, x, h, w = box
    return p[y : y + h, x : x + w]


def _assert_colorbar_follows_jet(p: np.ndarray, box) -> None:
    bar = _box(p, box)
    h, w = bar.shape[:2]
    col = bar[:, w // 2].astype(int)
    for frac in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        row = int(round((1 - frac) * (h - 1)))  # 0 at the bottom, 1 at the top
        np.testing.assert_allclose(col[row], _jet255((h - 1 - row) / (h - 1)), atol=3)
    assert (bar == bar[:, :1]).all()  # every column of the strip alike


def _scene(h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w)) * 100 + 80).astype(np.uint8)
    amap = rng.random((h, w)) * 0.3  # below the threshold everywhere
    return img, amap


def test_colour_bar_runs_jet_from_0_at_the_bottom_to_1_at_the_top(tmp_path):
    img, amap = _scene()
    panel, lay = heatmap_panel(img, amap, threshold=T, scale=S, item_id="a", return_layout=True)
    p = _roundtrip(panel, tmp_path)
    assert _box(p, lay["image"]).shape[:2] == _box(p, lay["overlay"]).shape[:2] == amap.shape  # full resolution
    _assert_colorbar_follows_jet(p, lay["colorbar"])
    # vmax only: the same strip, ticks 0 and vmax
    panel, lay = heatmap_panel(img, amap, vmax=2.0, return_layout=True)
    _assert_colorbar_follows_jet(_roundtrip(panel, tmp_path, "q.png"), lay["colorbar"])


def test_one_fixed_colour_scale_per_model_and_the_threshold_is_jet_half(tmp_path):
    img, a = _scene(seed=1)
    _, b = _scene(seed=2)
    b = b * 8  # a much hotter map: per-image scaling would recolour every pixel
    a[20:25, 20:25] = T  # a block exactly at the threshold
    a[50, 10] = b[10, 40] = 0.37  # one shared value, at different places
    a[60, 60] = 1.5  # the maxima (and their crosses) away from the sampled pixels
    pa, la = heatmap_panel(img, a, threshold=T, scale=S, alpha=1.0, return_layout=True)
    pb, lb = heatmap_panel(img, b, threshold=T, scale=S, alpha=1.0, return_layout=True)
    oa, ob = (
        _box(_roundtrip(pa, tmp_path, "a.png"), la["overlay"]),
        _box(_roundtrip(pb, tmp_path, "b.png"), lb["overlay"]),
    )
    assert (oa[50, 10] == ob[10, 40]).all()
    np.testing.assert_array_equal(oa[50, 10], _jet255(normalize_score(0.37, T, S)))
    np.testing.assert_array_equal(oa[22, 22], _jet255(0.5))  # inside the block: the threshold is jet(0.5)
    np.testing.assert_array_equal(colorize_map(np.array([[T]]), threshold=T, scale=S)[0, 0], _jet255(0.5))
    # vmax scale: map / vmax, also fixed
    va = heatmap_panel(img, a, vmax=2.0, alpha=1.0, return_layout=True)
    np.testing.assert_array_equal(_box(va[0], va[1]["overlay"])[50, 10], _jet255(0.37 / 2.0))
    with pytest.raises(ValueError, match="fixed colour scale"):
        heatmap_panel(img, a)  # no per-image scaling by default


def test_threshold_outline_white_and_lesion_outline_green(tmp_path):
    h = w = 64
    img = np.full((h, w), 90, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    amap = np.full((h, w), 0.1)
    hot = (yy - 20) ** 2 + (xx - 20) ** 2 <= 8**2  # above the threshold
    amap[hot] = 0.8
    amap[20, 20] = 0.9  # the maximum: its cross sits in the middle of the hot disc
    mask = np.zeros((h, w), bool)
    mask[40:55, 35:55] = True  # a lesion the map missed
    panel, lay = heatmap_panel(img, amap, threshold=T, scale=S, mask=mask, alpha=1.0, return_layout=True)
    o = _box(_roundtrip(panel, tmp_path), lay["overlay"])
    is_white, is_green = (o == WHITE).all(-1), (o == GREEN).all(-1)
    for y, x in ((12, 20), (28, 20), (20, 12), (20, 28)):  # the disc's rim, inside it
        assert is_white[y, x], (y, x)
    assert not is_white[20, 10] and not is_white[17, 16]  # outside; inside (away from the cross)
    ring = np.zeros_like(mask)
    ring[39:56, 34:56] = True
    ring[40:55, 35:55] = False
    ring[[39, 39, 55, 55], [34, 55, 34, 55]] = False  # 4-neighbour outline: no corners
    np.testing.assert_array_equal(is_green, ring)  # just outside the lesion, and nowhere else
    assert not is_white[~hot].any()


def test_header_shows_score_and_decision(tmp_path):
    img, amap = _scene()
    p1, lay = heatmap_panel(img, amap, threshold=T, scale=S, score=0.9, item_id="case_1", label=1, return_layout=True)
    p0 = heatmap_panel(img, amap, threshold=T, scale=S, score=0.2, item_id="case_1", label=1)
    hdr1 = _box(_roundtrip(p1, tmp_path), lay["header"]).astype(int)
    hdr0 = _box(p0, lay["header"]).astype(int)
    assert (hdr1.sum(-1) < 200).sum() > 100  # text, not a blank strip
    red = lambda a: ((a[..., 0] > 150) & (a[..., 1] < 80) & (a[..., 2] < 80)).sum()  # noqa: E731
    assert red(hdr1) > 20 and red(hdr0) == 0  # ANOMALOUS is printed in red, normal is not


def test_secondary_capture_look_fades_low_values_and_outlines_the_threshold_in_yellow():
    """The DICOM SC's overlay is the shared renderer with its own settings: below a quarter of vmax the
    source shows unchanged, at vmax the colour has opacity 0.6, the region at or above the threshold
    has a yellow inner outline."""
    grey = np.full((64, 64), 100, np.uint8)
    amap = np.zeros((64, 64))
    amap[20:40, 20:40] = 2.0  # vmax
    rgb = overlay_rgb(grey, amap, threshold=1.0, vmax=2.0)
    assert (rgb[5, 5] == 100).all()  # map 0: clear
    assert (rgb[20, 30] == (255, 255, 0)).all() and (rgb[19, 30] == 100).all()  # outline inside the region
    want = np.round(255 * (0.4 * 100 / 255 + 0.6 * np.asarray(colormaps["jet"](1.0)[:3])))
    np.testing.assert_array_equal(rgb[30, 30], want)  # inside: jet(1) at opacity 0.6
    assert (
        overlay_map(grey, amap, threshold=1.0, vmax=2.0, alpha=0.6, fade_below=0.25, outline_rgb=(255, 255, 0)) == rgb
    ).all()
    with pytest.raises(ValueError, match="differ in size"):
        overlay_rgb(grey, amap[:32], threshold=1.0, vmax=2.0)


def test_inference_does_not_import_the_plot_handler():
    code = "import sys, monai_skipts.inference; print('monai_skipts.handlers.plots' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"


def test_the_white_outline_follows_the_pixel_threshold_when_given(tmp_path):
    amap = np.tile(np.linspace(0.0, 1.0, 128), (96, 1))  # rises left to right
    img = np.zeros((96, 128, 3), np.uint8)

    def outline_columns(**kw):
        panel, lay = heatmap_panel(img, amap, vmax=1.0, alpha=1.0, return_layout=True, **kw)
        over = _box(_roundtrip(panel, tmp_path), lay["overlay"])
        return np.nonzero((over[48] == 255).all(-1))[0]  # white pixels of the middle row

    image_outline = outline_columns(threshold=0.9)
    pixel_outline = outline_columns(threshold=0.9, outline_threshold=0.5)
    assert image_outline.min() == int(np.argmax(amap[0] >= 0.9))  # the outline's inner edge at map >= 0.9
    assert pixel_outline.min() == int(np.argmax(amap[0] >= 0.5))  # ...and at map >= the pixel threshold
