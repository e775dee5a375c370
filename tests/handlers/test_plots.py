"""Heat-map panels a clinician can read: full resolution, one fixed colour scale per model with a
colour bar, threshold and lesion outlines, a header with the score and the decision; and the plots
handler's choice of panels (the first, the highest-scoring normals, the lowest-scoring anomalous)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from matplotlib import colormaps
from PIL import Image

from monai_skipts.handlers import AnomalyPlotsHandler, AnomalyScoreHandler, colorize_map, heatmap_panel
from monai_skipts.metrics import normalize_score
from monai_skipts.transforms import IMAGENET_MEAN, IMAGENET_STD

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


def _batch(ids, scores, labels, h=32, seed=0):
    """A fake evaluator batch: ImageNet-normalised images, masks, and maps whose maximum is the score."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    rgb = torch.from_numpy(rng.random((n, 3, h, h), dtype=np.float32))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pred = torch.from_numpy(rng.random((n, 1, h, h), dtype=np.float32)) * 0.1
    for k, s in enumerate(scores):
        pred[k, 0, h // 2, h // 2] = s
    mask = torch.zeros(n, 1, h, h)
    mask[:, :, 4:10, 4:10] = torch.tensor(labels, dtype=torch.float32).view(n, 1, 1, 1)
    return {
        "image": (rgb - mean) / std,
        "mask": mask,
        "label": torch.tensor(labels),
        "id": list(ids),
        "_pred": pred,
        "_score": torch.tensor(scores, dtype=torch.float32),
    }


def _run(tmp_path, batches, n_samples, threshold, check=None):
    def step(engine, b):
        return {"pred": b["_pred"], "score": b["_score"], "label": b["label"], "id": b["id"]}

    engine = Engine(step)
    scores = AnomalyScoreHandler(output_dir=None, threshold=threshold)
    scores.attach(engine)
    plots = AnomalyPlotsHandler(tmp_path, scores, threshold=threshold, n_samples=n_samples)
    plots.attach(engine)
    if check is not None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: check(plots))
    engine.run(batches, max_epochs=1)
    return plots


def test_handler_writes_the_errors_a_reader_needs_with_bounded_memory(tmp_path):
    rng = np.random.default_rng(3)
    n_items, n = 24, 2
    labels = [k % 2 for k in range(n_items)]
    scores = rng.uniform(0.1, 0.9, n_items).round(4).tolist()
    ids = [f"case/{k:03d}.png" for k in range(n_items)]
    batches = [_batch(ids[i : i + 4], scores[i : i + 4], labels[i : i + 4], seed=i) for i in range(0, n_items, 4)]
    kept = []

    def check(plots):
        c = plots.candidates
        assert all(len(v) <= n for v in c.values())
        kept.append(len({i for v in c.values() for i, _ in v}))

    plots = _run(tmp_path, batches, n, T, check)
    assert max(kept) <= 4 * n
    normals = sorted((s, i) for s, i, y in zip(scores, ids, labels) if y == 0)
    anomalous = sorted((s, i) for s, i, y in zip(scores, ids, labels) if y == 1)
    hm = tmp_path / "heatmaps"
    expected = {
        "normal_highest": [i for _, i in normals[::-1][:n]],
        "anomalous_lowest": [i for _, i in anomalous[:n]],
        "normal_first": [i for i, y in zip(ids, labels) if y == 0][:n],
        "anomalous_first": [i for i, y in zip(ids, labels) if y == 1][:n],
    }
    for group, want in expected.items():
        for rank, i in enumerate(want, start=1):
            assert (hm / f"{group}_{rank:02d}_case_{i[5:8]}.png").is_file(), (group, rank, i)
    assert len(list(hm.glob("*.png"))) == 4 * n
    # one colour scale for the epoch, derived from the normal scores (no score_scale given)
    scale = json.loads((hm / "scale.json").read_text())
    assert scale["threshold"] == T and scale["scale"] == pytest.approx(np.std([s for s, _ in normals]), rel=1e-5)
    # a written panel read back: colour bar, full resolution, the lesion's green outline
    png = Image.open(hm / f"anomalous_lowest_01_case_{expected['anomalous_lowest'][0][5:8]}.png")
    lay = json.loads(png.text["skipts_layout"])
    p = np.asarray(png.convert("RGB"))
    _assert_colorbar_follows_jet(p, lay["colorbar"])
    o = _box(p, lay["overlay"])
    assert o.shape[:2] == (32, 32) and (o == GREEN).all(-1)[3, 4:10].all()
    # every map in maps/, and the curves
    assert len(list((tmp_path / "maps").rglob("*.map.png"))) == n_items
    assert json.loads((tmp_path / "maps" / "scale.json").read_text())["vmax"] == pytest.approx(2 * T)
    assert (tmp_path / "roc.png").is_file() and (tmp_path / "score_distribution.png").is_file()
    assert plots.candidates == {}  # the kept images are freed after writing


def test_handler_without_threshold_uses_the_largest_score_as_vmax(tmp_path):
    batches = [_batch(["a", "b", "c", "d"], [0.2, 0.7, 0.4, 1.3], [0, 1, 0, 1])]
    _run(tmp_path, batches, 1, None)
    scale = json.loads((tmp_path / "heatmaps" / "scale.json").read_text())
    assert scale["threshold"] is None and scale["vmax"] == pytest.approx(1.3)
    names = sorted(p.name for p in (tmp_path / "heatmaps").glob("*.png"))
    assert names == [
        "anomalous_first_01_b.png",
        "anomalous_lowest_01_b.png",
        "normal_first_01_a.png",
        "normal_highest_01_c.png",
    ]


def test_training_maps_never_overwrite_each_other(tmp_path):
    """For the training/evaluation handler: ids that the old name-squashing mapped to one
    file (``a/b.png`` and ``a_b.png``; ``img.png`` and ``img.jpg``) get one map each, named as inference
    names them (relative folders and whole file name kept)."""
    ids = ["a/b.png", "a_b.png", "img.png", "img.jpg"]
    _run(tmp_path, [_batch(ids, [0.2, 0.7, 0.4, 1.3], [0, 1, 0, 1])], 1, T)
    maps = sorted(p.relative_to(tmp_path / "maps").as_posix() for p in (tmp_path / "maps").rglob("*.map.png"))
    assert maps == ["a/b.png.map.png", "a_b.png.map.png", "img.jpg.map.png", "img.png.map.png"]
