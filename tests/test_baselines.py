"""Peers for the benchmarks: the RD4AD-style model and PatchCore, and the quality benchmark's wiring."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from PIL import Image

from monai_skipts.baselines import PatchCore, greedy_coreset
from monai_skipts.baselines.patchcore import nearest_distances
from monai_skipts.engines import SkipTSEvaluator, SkipTSTrainer, TeacherFeatureCache
from monai_skipts.losses import RD4ADLoss
from monai_skipts.networks import RD4AD, AnomalyDetector, SkipTS, build_teacher

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("teacher", ["efficientnet_lite0", "resnet18"])
def test_rd4ad_forward_contract_matches_skipts(teacher):
    torch.manual_seed(0)
    t = build_teacher(teacher, pretrained=False)
    x = torch.randn(2, 3, 64, 64)
    rd, st = RD4AD(t), SkipTS(t)
    (t_rd, s_rd), (t_st, _) = rd(x), st(x)
    assert [f.shape for f in t_rd] == [f.shape for f in t_st]
    assert [f.shape for f in s_rd] == [f.shape for f in t_rd]
    assert rd.config["skip"] == "none" and rd.config["teacher"] == teacher
    assert not any(p.requires_grad for p in rd.teacher.parameters())
    amap, score = AnomalyDetector(rd)(x)
    assert amap.shape == (2, 1, 64, 64) and score.shape == (2,)
    # cached teacher features give the same output as the image
    feats = rd.teacher_features(x)
    rd.eval()
    assert torch.allclose(rd(x, teacher_feats=feats)[1][0], rd(x)[1][0])


def test_rd4ad_loss():
    a = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    assert RD4ADLoss()((a, a)).item() == pytest.approx(0.0, abs=1e-6)
    assert RD4ADLoss()((a, [-f for f in a])).item() == pytest.approx(4.0, abs=1e-5)


def test_rd4ad_trains_with_the_skipts_trainer_and_evaluator():
    torch.manual_seed(0)
    model = RD4AD(build_teacher("efficientnet_lite0", pretrained=False))
    data = [{"image": torch.randn(3, 64, 64), "label": 0, "id": f"n{i}"} for i in range(8)]
    before_s = {k: v.clone() for k, v in model.student.state_dict().items()}
    before_t = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    cache = TeacherFeatureCache(model)
    trainer = SkipTSTrainer(
        "cpu", 2, DataLoader(data, batch_size=4), model, loss_function=RD4ADLoss(), prepare_batch=cache
    )
    trainer.run()
    assert np.isfinite(float(trainer.state.output["loss"].detach()))
    assert len(cache.store) == 8
    after_s, after_t = model.student.state_dict(), model.teacher.state_dict()
    assert any(not torch.equal(before_s[k], after_s[k]) for k in before_s)
    assert all(torch.equal(before_t[k], after_t[k]) for k in before_t)
    scores = []
    ev = SkipTSEvaluator("cpu", DataLoader(data[:4], batch_size=2), AnomalyDetector(model))
    ev.add_event_handler(Events.ITERATION_COMPLETED, lambda e: scores.extend(e.state.output["score"].tolist()))
    ev.run()
    assert len(scores) == 4 and all(np.isfinite(scores))


def test_greedy_coreset_covers_clusters_and_nearest_distances():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    idx = greedy_coreset(pts, 3, projection_dim=None)
    assert sorted(int(i) // 50 for i in idx) == [0, 1, 2]
    assert len(set(idx.tolist())) == 3
    assert torch.equal(greedy_coreset(pts, 500), torch.arange(150))
    q = torch.randn(7, 2, generator=g)
    ref = torch.cdist(q, pts).amin(dim=1)
    assert torch.allclose(nearest_distances(q, pts, chunk=3), ref, atol=1e-4)


def _smooth(seed: int, size: int = 64) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = (
        0.5
        + 0.3 * np.sin(2 * np.pi * (xx + rng.uniform(0, 0.1))) * np.cos(2 * np.pi * yy)
        + 0.02 * rng.standard_normal((size, size))
    )
    return torch.as_tensor(np.repeat(img[None], 3, 0), dtype=torch.float32)


def test_patchcore_scores_an_obviously_different_image_higher():
    model = PatchCore("efficientnet_lite0", coreset_ratio=0.5, seed=0)
    with pytest.raises(RuntimeError, match="fit"):
        model(torch.zeros(1, 3, 64, 64))
    normals = torch.stack([_smooth(i) for i in range(8)])
    model.fit([{"image": normals[:4]}, {"image": normals[4:]}])
    assert 0 < model.memory.shape[0] <= 8 * 8 * 8 // 2 + 1 and model.config["n_patches"] == 8 * 8 * 8
    odd = _smooth(100).clone()
    odd[:, 20:44, 20:44] = torch.rand(3, 24, 24)  # a noisy square
    amap, score = model(torch.stack([_smooth(50), odd]))
    assert amap.shape == (2, 1, 64, 64) and score.shape == (2,)
    assert score[1] > 1.5 * score[0]
    # the map is highest inside the square
    peak = np.unravel_index(int(amap[1, 0].argmax()), (64, 64))
    assert 14 <= peak[0] <= 50 and 14 <= peak[1] <= 50
    # cached teacher features give the same result as images
    feats = model.teacher(normals[:2])
    assert torch.allclose(model(normals[:2], teacher_feats=feats)[1], model(normals[:2])[1])
    # ... and PatchCore fills a teacher-feature cache by itself (benchmarks/quality.py runs it alone)
    cache = TeacherFeatureCache(model)
    alone = PatchCore("efficientnet_lite0", coreset_ratio=0.5, seed=0)
    alone.fit(
        [{"image": normals[:4], "id": list("abcd")}, {"image": normals[4:], "id": list("efgh")}],
        feature_fn=lambda b: cache(b, "cpu")[3]["teacher_feats"],
    )
    assert len(cache.store) == 8 and torch.allclose(alone(odd[None])[1], model(odd[None])[1])


@pytest.fixture
def quality_on_tiny_brainmri(tmp_path):
    """``benchmarks/quality.py`` (the module) and a BrainMRI-layout folder of 20 phantom images in
    ``tmp_path / "data"``."""
    from monai_skipts.apps.phantom import make_phantom_image

    rng = np.random.default_rng(0)
    for folder, anomalous, n in (("no", False, 12), ("yes", True, 8)):
        (tmp_path / "data" / "brainmri" / folder).mkdir(parents=True)
        for i in range(n):
            img, _ = make_phantom_image(48, anomalous, rng)
            Image.fromarray(img).save(tmp_path / "data" / "brainmri" / folder / f"{i}.png")
    sys.path.insert(0, str(BENCH))
    try:
        import quality
    finally:
        sys.path.remove(str(BENCH))
    return quality


def test_quality_benchmark_runs_end_to_end_on_a_tiny_dataset(quality_on_tiny_brainmri, tmp_path, capsys, monkeypatch):
    """benchmarks/quality.py on a BrainMRI-layout folder of 20 phantom images: every kind of method."""
    quality = quality_on_tiny_brainmri
    rc = quality.main(
        [
            "--data-root",
            str(tmp_path / "data"),
            "--methods",
            "skipts",
            "kd_encoder",
            "rd4ad",
            "patchcore",
            "--steps",
            "1",
            "--size",
            "32",
            "--seeds",
            "0",
            "--work-dir",
            str(tmp_path / "out"),
            "--no-tune-malloc",
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert {r["method"] for r in doc["runs"]} == {"skipts", "kd_encoder", "rd4ad", "patchcore"}
    assert all(0.0 <= r["auroc"] <= 1.0 for r in doc["runs"])
    assert set(doc["summary"]["average"]) == {"skipts", "kd_encoder", "rd4ad", "patchcore"}
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "| brainmri |" in md and "**average**" in md and "88.2" in md
    # --resume keeps finished runs and trains nothing new
    assert (
        quality.main(
            [
                "--data-root",
                str(tmp_path / "data"),
                "--methods",
                "skipts",
                "--steps",
                "1",
                "--size",
                "32",
                "--seeds",
                "0",
                "--work-dir",
                str(tmp_path / "out"),
                "--resume",
                "--no-tune-malloc",
            ]
        )
        == 0
    )
    assert "Skip-TS      AUROC" not in capsys.readouterr().out.split("quality:")[-1]
    # features too large to cache: fp16 train features, test images through the teacher
    monkeypatch.setattr(quality, "_feature_bytes", lambda *a, **k: 2**40)
    assert (
        quality.main(
            [
                "--data-root",
                str(tmp_path / "data"),
                "--methods",
                "skipts",
                "patchcore",
                "--steps",
                "1",
                "--size",
                "32",
                "--seeds",
                "0",
                "--work-dir",
                str(tmp_path / "big"),
                "--no-tune-malloc",
            ]
        )
        == 0
    )
    big = json.loads((tmp_path / "big" / "quality.json").read_text())
    assert {r["method"] for r in big["runs"]} == {"skipts", "patchcore"}


def test_rd4ad_checkpoint_round_trip(tmp_path):
    from monai_skipts.checkpoint import load_checkpoint, load_detector, save_checkpoint

    torch.manual_seed(0)
    detector = AnomalyDetector(RD4AD("efficientnet_lite0"), preprocessing={"modality": "xray"}).eval()
    detector.set_calibration({"value": 1.0})
    path = save_checkpoint(tmp_path / "rd4ad.pt", detector)
    loaded, ckpt = load_detector(path), load_checkpoint(path)
    assert isinstance(loaded.model, RD4AD) and ckpt["config"]["model"]["model"] == "rd4ad"
    assert float(loaded.threshold) == 1.0 and loaded.config["preprocessing"]["modality"] == "xray"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(loaded(x), detector(x)):
            torch.testing.assert_close(got, want)


def test_quality_benchmark_scores_inside_the_anatomy_with_anatomy_mask(quality_on_tiny_brainmri, tmp_path):
    """``--anatomy-mask``: every method scores inside the anatomy mask; recorded in quality.json, and
    ``--resume`` without the flag does not take those runs."""
    quality = quality_on_tiny_brainmri
    args = ["--data-root", str(tmp_path / "data"), "--steps", "1", "--size", "32", "--seeds", "0"]
    args += ["--work-dir", str(tmp_path / "out"), "--no-tune-malloc"]
    assert quality.main(args + ["--methods", "skipts+std", "patchcore", "--anatomy-mask"]) == 0
    doc = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert doc["meta"]["anatomy_mask"] is True and {r["method"] for r in doc["runs"]} == {"skipts+std", "patchcore"}
    assert all(r["anatomy_mask"] is True and 0.0 <= r["auroc"] <= 1.0 for r in doc["runs"])
    assert "scored inside the anatomy mask" in (tmp_path / "out" / "quality.md").read_text()
    assert quality.main(args + ["--methods", "patchcore", "--resume"]) == 0
    doc = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert doc["meta"]["anatomy_mask"] is False and [r["anatomy_mask"] for r in doc["runs"]] == [False]


def test_patchcore_inside_the_anatomy_has_a_map_zero_outside_it_and_a_patch_score_inside_it():
    sys.path.insert(0, str(BENCH))
    try:
        import quality
    finally:
        sys.path.remove(str(BENCH))
    from monai_skipts.networks import AnatomyMaskLayer

    torch.manual_seed(0)
    model = PatchCore("efficientnet_lite0", coreset_ratio=0.5, seed=0)
    img = torch.zeros(2, 3, 64, 64)
    img[:, :, 16:48, 16:48] = torch.rand(2, 3, 32, 32)
    model.fit([{"image": img}])
    anatomy = AnatomyMaskLayer("nonzero")
    amap, score = quality.patchcore_masked(model, img, None, anatomy)
    inside = anatomy(img) > 0
    assert bool((amap[~inside] == 0).all()) and score.shape == (2,)
    ps = model.patch_scores(img)
    assert bool((score <= ps.flatten(1).amax(dim=1)).all())
