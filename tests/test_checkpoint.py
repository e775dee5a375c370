"""Checkpoints are the detector's state: version 2 round trips, version 1 files upgrade on load and
score bit-identically to the code that wrote them."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from monai_skipts.checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointError,
    load_checkpoint,
    load_detector,
    save_checkpoint,
    upgrade_checkpoint,
)
from monai_skipts.inference import AnomalyPredictor
from monai_skipts.networks import AnomalyDetector, SkipTS

DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(DATA))
from make_v1_scores import cpu_name, payload_sha  # noqa: E402
from v1_checkpoint import fixed_files, v1_payload  # noqa: E402


def _map_sha(amap) -> str:
    a = amap.as_tensor() if hasattr(amap, "as_tensor") else torch.as_tensor(amap)
    return hashlib.sha256(a.float().contiguous().numpy().tobytes()).hexdigest()


def test_version1_checkpoint_scores_bit_identically_after_upgrade(tmp_path):
    """A version-1 checkpoint saved before the detector existed gives the same scores (float.hex), maps
    (sha256) and decisions through today's serving path as the code that wrote it did on a CPU of the
    same kind (``v1_scores*.json``: one record per kind of CPU, whose float kernels differ in the last
    bits; a record's ``cpu`` begins the model name). On a CPU of no recorded kind the scores must agree
    with every record to 1e-5 and decide alike."""
    refs = [json.loads(p.read_text()) for p in sorted(DATA.glob("v1_scores*.json"))]
    assert len(refs) >= 2
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        payload = v1_payload()
        assert all(payload_sha(payload) == ref["student_sha256"] for ref in refs)
        path = tmp_path / "model.pt"
        torch.save(payload, path)
        predictor = AnomalyPredictor(path, device="cpu")
        got = {"scores": {}, "map_sha256": {}, "decisions": {}}
        for name, file in fixed_files(tmp_path).items():
            r = predictor.score_file(file, maps=True)
            got["scores"][name] = float(r["score"]).hex()
            got["map_sha256"][name] = _map_sha(r["map"])
            got["decisions"][name] = {k: r[k] for k in ("anomalous", "normalized_score", "threshold")}
    finally:
        torch.set_num_threads(n)
    same_kind = [ref for ref in refs if cpu_name().startswith(ref["cpu"])]
    if same_kind:
        ref = same_kind[0]
        assert got == {k: ref[k] for k in got}, (ref["recorded_on"], got["scores"], ref["scores"])
        return
    for name, score in got["scores"].items():  # a CPU of a kind not recorded
        for ref in refs:
            assert float.fromhex(score) == pytest.approx(float.fromhex(ref["scores"][name]), rel=1e-5), name
            assert got["decisions"][name]["anomalous"] == ref["decisions"][name]["anomalous"], name
    warnings.warn(f"no v1_scores*.json recorded on this kind of CPU; scores agree to 1e-5: {got['scores']}")


def test_version1_upgrade_moves_every_piece_into_the_detector_state():
    payload = v1_payload()
    ckpt = upgrade_checkpoint(payload)
    assert ckpt["version"] == CHECKPOINT_VERSION == 2
    cfg = ckpt["config"]
    assert cfg["preprocessing"] == {"modality": "mri", "spatial_size": [64, 64], "window": None, "mri_norm": None}
    assert cfg["sigma"] == 4.0 and cfg["model"] == payload["model_config"]
    assert cfg["calibration"]["method"] == "lognormal" and cfg["anatomy_mask"] is None
    assert ckpt["extra"] == {"dataset": "compat"}
    state = ckpt["state_dict"]
    assert torch.equal(state["level_stats"], payload["map_level_stats"])
    assert float(state["threshold"]) == 31.5 and float(state["scale"]) == 1.25
    assert math.isnan(float(state["volume_threshold"])) and math.isnan(float(state["pixel_threshold"]))
    for k, v in payload["student"].items():
        assert torch.equal(state[f"model.student.{k}"], v)
    assert upgrade_checkpoint(ckpt) is ckpt  # version 2 as it is


def test_unknown_version_is_refused_naming_it():
    with pytest.raises(CheckpointError, match="version 7"):
        upgrade_checkpoint({"kind": "monai-skipts/checkpoint", "version": 7})


def test_version2_round_trip_keeps_state_and_config_but_not_the_teacher(tmp_path):
    torch.manual_seed(0)
    det = AnomalyDetector(
        SkipTS("resnet18", pretrained=False), sigma=2.0, preprocessing={"modality": "xray", "spatial_size": 32}
    )
    det.set_level_stats([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    det.set_calibration({"value": 1.5, "scale": 0.25, "target_fpr": 0.05, "n_normals": 10, "method": "empirical"})
    det.volume_threshold.fill_(2.5)
    path = save_checkpoint(tmp_path / "m.pt", det, epoch=2, iteration=5, extra={"dataset": "x"}, with_rng=False)
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == 2 and not any(k.startswith("model.teacher.") for k in raw["state_dict"])
    json.dumps(raw["config"])  # one JSON-able config
    torch.manual_seed(0)  # the same random teacher (not stored: a real one is rebuilt from its weights file)
    back = load_detector(path)
    assert back.config == det.config
    x = torch.randn(2, 3, 32, 32)
    det.eval()
    with torch.no_grad():
        for a, b in zip(det(x), back(x)):
            assert torch.equal(a, b)
    assert float(back.volume_threshold) == 2.5 and math.isnan(float(back.pixel_threshold))
    assert back.decide(1.5) == {"score": 1.5, "threshold": 1.5, "anomalous": True, "normalized_score": 0.5}
    assert load_checkpoint(path)["epoch"] == 2


def test_a_checkpoint_without_statistics_loads_without_them(tmp_path):
    det = AnomalyDetector(SkipTS("resnet18", pretrained=False))
    back = load_detector(save_checkpoint(tmp_path / "m.pt", det, with_rng=False))
    assert back.get_level_stats() is None and back.decide(3.0)["anomalous"] is None


def test_segmentation_head_travels_in_the_checkpoint_and_rebuilds_on_load(tmp_path):
    """The head's config (mode, channels) and weights (and its fused normalisation) are checkpoint state:
    load_detector rebuilds it, and a detector built without one (a bundle's ``predictor_def``) takes it
    from a whole checkpoint; the maps are bit-identical."""
    torch.manual_seed(0)
    det = AnomalyDetector(SkipTS("resnet18", pretrained=False), preprocessing={"spatial_size": 32})
    det.set_seg_head({"mode": "fused", "hidden": 16})
    det.seg_head.set_map_norm(0.25, 3.0)
    path = save_checkpoint(tmp_path / "m.pt", det, with_rng=False)
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["seg_head"]["mode"] == "fused" and "seg_head.map_norm" in raw["state_dict"]
    torch.manual_seed(0)
    back = load_detector(path)
    assert back.config == det.config and back.seg_head.mode == "fused"
    torch.manual_seed(0)
    bare = AnomalyDetector(SkipTS("resnet18", pretrained=False), preprocessing={"spatial_size": 32})
    assert bare.seg_head is None
    bare.load_state_dict(load_checkpoint(path))
    x = torch.randn(2, 3, 32, 32)
    det.eval(), bare.eval()
    with torch.no_grad():
        want = det(x)
        for got in (back(x), bare(x)):
            assert all(torch.equal(a, b) for a, b in zip(want, got))
