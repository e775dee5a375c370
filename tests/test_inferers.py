"""Eq 7-8: up-sampling, sum, Gaussian sigma 4 (as scipy), max."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from monai_skipts.inferers import (
    AnomalyMapHead,
    GaussianBlur2d,
    SkipTSInferer,
    anomaly_map_and_score,
    fuse_anomaly_maps,
)
from monai_skipts.networks import AnomalyDetector, SkipTS


@pytest.mark.parametrize("shape", [(40, 33), (7, 5), (256, 256)])
def test_gaussian_matches_scipy_sigma4(shape):
    x = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(0))
    ours = GaussianBlur2d(4.0)(x).numpy()
    ref = np.stack([ndimage.gaussian_filter(x[i, 0].double().numpy(), 4.0) for i in range(2)])
    assert np.abs(ours[:, 0] - ref).max() < 1e-5


def test_gaussian_sigma0_is_identity():
    x = torch.rand(1, 1, 8, 8)
    assert torch.equal(GaussianBlur2d(0)(x), x)


def test_fuse_sums_bilinear_upsampled_maps():
    m1 = torch.ones(1, 1, 4, 4)
    m2 = torch.tensor([[[[0.0, 4.0], [0.0, 4.0]]]])
    fused = fuse_anomaly_maps([m1, m2], (4, 4))
    assert torch.allclose(fused[0, 0, 0], torch.tensor([1.0, 2.0, 4.0, 5.0]))


def test_score_is_max_of_blurred_map():
    t = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    s = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    amap, score = anomaly_map_and_score(t, s, (32, 32))
    assert amap.shape == (2, 1, 32, 32)
    assert torch.allclose(score, amap.flatten(1).amax(1))
    # by hand: cosine maps -> upsample -> sum -> scipy blur
    ref = []
    for b in range(2):
        acc = np.zeros((32, 32))
        for tt, ss in zip(t, s):
            m = 1 - torch.nn.functional.cosine_similarity(tt[b : b + 1], ss[b : b + 1], dim=1)[:, None]
            acc += torch.nn.functional.interpolate(m, size=(32, 32), mode="bilinear", align_corners=False)[0, 0].numpy()
        ref.append(ndimage.gaussian_filter(acc, 4.0))
    assert np.abs(amap[:, 0].numpy() - np.stack(ref)).max() < 1e-5


def test_layer_subset():
    t = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    s = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    a12, _ = anomaly_map_and_score(t, s, (8, 8), sigma=0)
    a1, _ = anomaly_map_and_score(t, s, (8, 8), sigma=0, layers=(1,))
    a2, _ = anomaly_map_and_score(t, s, (8, 8), sigma=0, layers=(2,))
    assert torch.allclose(a12, a1 + a2, atol=1e-6)


def test_inferer_and_detector_agree():
    torch.manual_seed(0)
    detector = AnomalyDetector(SkipTS("resnet18", pretrained=False)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        amap_inf = SkipTSInferer()(x, detector)
        amap_det, score_det = detector(x)
    assert torch.equal(amap_inf, amap_det)
    assert torch.equal(SkipTSInferer.score(amap_inf), score_det)
    assert isinstance(AnomalyMapHead().blur, GaussianBlur2d)
