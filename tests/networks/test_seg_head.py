"""The segmentation head and the detector's map selection (discrepancy, the head's map, fused)."""

from __future__ import annotations

import pytest
import torch

from monai_skipts.inferers import AnomalyMapHead
from monai_skipts.networks import SEG_HEAD_MODES, AnomalyDetector, SegHead, SkipTS

SIZE = 32
CALIBRATION = {"value": 0.5, "scale": 0.1, "target_fpr": 0.05, "n_normals": 10, "method": "empirical"}


@pytest.fixture
def detector():
    torch.manual_seed(0)
    det = AnomalyDetector(SkipTS("resnet18", pretrained=False), preprocessing={"spatial_size": SIZE}).eval()
    det.set_level_stats([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    return det


def test_head_reads_the_teacher_channels_and_its_modes_give_their_maps(detector):
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        plain, plain_score = detector(x)
        head = detector.set_seg_head({"mode": "map"})
        head.set_map_norm(0.5, 2.0)
        assert detector.config["seg_head"] is head.config
        assert head.config["in_channels"] == list(detector.model.teacher.out_channels[:3])
        t, s = detector.features(x)
        disc, _ = AnomalyMapHead(4.0)(t, s, (SIZE, SIZE), detector.get_level_stats())
        prob = torch.sigmoid(head.logits(t, s, (SIZE, SIZE)))
        amap, score = detector(x)
        assert torch.equal(amap, prob) and torch.equal(score, prob.flatten(1).amax(1))
        assert bool(((amap >= 0) & (amap <= 1)).all())
        detector.set_seg_head_mode("fused")
        amap, score = detector(x)
        assert torch.allclose(amap, 0.5 * ((disc - 0.5) / 2.0 + prob)) and torch.equal(score, amap.flatten(1).amax(1))
        detector.set_seg_head_mode("discrepancy")  # the head is kept but the map is the discrepancy, bit for bit
        amap, score = detector(x)
        assert torch.equal(amap, plain) and torch.equal(score, plain_score)
        assert detector.set_seg_head(None) is None and detector.config["seg_head"] is None
        assert not any(k.startswith("seg_head.") for k in detector.state_dict())
        amap, score = detector(x)
        assert torch.equal(amap, plain) and torch.equal(score, plain_score)


def test_head_weights_and_norm_are_detector_state(detector):
    detector.set_seg_head({"mode": "fused", "hidden": 16, "reduce": 8})
    keys = [k for k in detector.state_dict() if k.startswith("seg_head.")]
    assert "seg_head.map_norm" in keys and any(k.startswith("seg_head.body.") for k in keys)
    assert detector.config["seg_head"]["hidden"] == 16 and detector.config["seg_head"]["reduce"] == 8


def test_changing_the_mode_clears_the_thresholds_calibrated_on_the_other_map(detector):
    detector.set_seg_head({"mode": "map"})
    detector.set_calibration(CALIBRATION)
    detector.set_seg_head_mode("map")  # the same map: kept
    assert detector.decide(0.7)["anomalous"] is True
    detector.set_seg_head_mode("fused")
    assert detector.config["calibration"] is None and detector.decide(0.7)["anomalous"] is None


def test_bad_modes_and_a_missing_head_are_refused(detector):
    with pytest.raises(ValueError, match="no segmentation head"):
        detector.set_seg_head_mode("map")
    with pytest.raises(ValueError, match="mode must be one of"):
        detector.set_seg_head({"mode": "mean"})
    detector.set_seg_head({"mode": "map"})
    with pytest.raises(ValueError, match="mode must be one of"):
        detector.set_seg_head_mode("both")
    with pytest.raises(ValueError, match="scale must be > 0"):
        detector.seg_head.set_map_norm(0.0, 0.0)
    with pytest.raises(ValueError, match="at least one feature level"):
        SegHead([])
    assert SEG_HEAD_MODES == ("discrepancy", "map", "fused")
