"""The detector: one image -> (map, score) path, one decision, its serving state persistent."""

from __future__ import annotations

import math

import pytest
import torch

from monai_skipts.inferers import AnomalyMapHead, SkipTSInferer
from monai_skipts.networks import AnomalyDetector, SkipTS


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return AnomalyDetector(SkipTS("resnet18", pretrained=False), preprocessing={"spatial_size": 32}).eval()


def test_forward_is_the_head_over_the_features(detector):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        amap, score = detector(x)
        t, s = detector.features(x)
        ref_map, ref_score = AnomalyMapHead(4.0)(t, s, (32, 32))
    assert amap.shape == (2, 1, 32, 32) and score.shape == (2,)
    assert torch.equal(amap, ref_map) and torch.equal(score, ref_score)
    assert torch.equal(SkipTSInferer()(x, detector), amap)


def test_level_stats_standardise_the_levels_and_none_restores_the_plain_map(detector):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain, _ = detector(x)
        detector.set_level_stats([[0.5, 2.0], [0.5, 2.0], [0.5, 2.0]])
        std, _ = detector(x)
        assert "level_stats" in detector.state_dict() and not torch.equal(std, plain)
        detector.set_level_stats(None)
        again, _ = detector(x)
    assert torch.equal(again, plain)
    with pytest.raises(ValueError, match="std > 0"):
        detector.set_level_stats([[0.0, 0.0]])


def test_state_dict_holds_the_serving_state_and_loads_into_a_fresh_detector(detector):
    detector.set_level_stats([[0.1, 1.0], [0.2, 1.0], [0.3, 1.0]])
    detector.set_calibration({"value": 2.0, "scale": 0.5})
    state = detector.state_dict()
    for name in ("level_stats", "threshold", "scale", "volume_threshold", "pixel_threshold"):
        assert name in state
    assert state["threshold"].dtype == torch.float64 and math.isnan(float(state["pixel_threshold"]))
    fresh = AnomalyDetector(SkipTS("resnet18", pretrained=False))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.level_stats, detector.level_stats) and float(fresh.threshold) == 2.0
    detector.set_level_stats(None)
    detector.set_calibration(None)


def test_decide_casts_and_needs_a_positive_scale(detector):
    detector.set_calibration({"value": 3, "scale": 0.0})
    d = detector.decide(torch.tensor(4.0))
    assert d == {"score": 4.0, "threshold": 3.0, "anomalous": True, "normalized_score": None}
    assert isinstance(d["threshold"], float)
    detector.set_calibration(None)
    assert detector.decide(4.0)["anomalous"] is None


def test_volumes_use_the_volume_threshold_and_outlines_the_pixel_threshold_else_the_image_one(detector):
    detector.set_calibration({"value": 3.0, "scale": 0.5})
    assert detector.decide_volume(3.5) == {**detector.decide(3.5), "threshold_kind": "image"}
    assert detector.outline_threshold() == (3.0, "image")
    detector.set_calibration({"value": 3.0, "scale": 0.5, "volume": {"value": 4.0}, "pixel": {"value": 0.25}})
    d = detector.decide_volume(3.5)
    assert (d["threshold"], d["anomalous"], d["threshold_kind"]) == (4.0, False, "volume")
    assert d["normalized_score"] < 0.5 and detector.decide(3.5)["anomalous"] is True
    assert detector.outline_threshold() == (0.25, "pixel")
    detector.set_calibration(None)
    assert detector.decide_volume(3.5)["threshold_kind"] is None and detector.outline_threshold() == (None, None)


def test_another_input_size_than_the_trained_one_is_refused(detector):
    with pytest.raises(ValueError, match="trained at 32x32"):
        detector(torch.zeros(1, 3, 64, 64))


def test_spatial_size_has_one_normalised_form():
    det = AnomalyDetector(SkipTS("resnet18", pretrained=False), preprocessing={"spatial_size": (48,)})
    assert det.config["preprocessing"]["spatial_size"] == [48, 48] and det.trained_size == (48, 48)
    with pytest.raises(ValueError, match="spatial_size"):
        AnomalyDetector(SkipTS("resnet18", pretrained=False), preprocessing={"spatial_size": [1, 2, 3]})
