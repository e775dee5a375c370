"""The plots handler's choice of panels (the first, the highest-scoring normals, the lowest-scoring
anomalous), its colour scale and its maps (the panels themselves: tests/test_visualize.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from PIL import Image
from test_visualize import GREEN, T, _assert_colorbar_follows_jet, _box

from monai_skipts.handlers import AnomalyPlotsHandler, AnomalyScoreHandler
from monai_skipts.transforms import IMAGENET_MEAN, IMAGENET_STD


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
