"""Paper eq 1-5 pinned with hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from monai_skipts.losses import DRKDLoss, anomaly_maps, mac_loss, similarity_loss


def _feat(vectors, h=1, w=None):
    """(1, C, h, w) from a list of per-pixel channel vectors, row-major."""
    w = w or len(vectors) // h
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, -1, h, w)


def test_cosine_map_per_pixel():
    # pixels: identical, orthogonal, opposite, 60 degrees
    t = _feat([[1, 0], [1, 0], [1, 0], [1, 0]], h=2)
    s = _feat([[3, 0], [0, 2], [-1, 0], [0.5, math.sqrt(3) / 2]], h=2)
    (m,) = anomaly_maps([t], [s])
    assert m.shape == (1, 1, 2, 2)
    assert torch.allclose(m[0, 0], torch.tensor([[0.0, 1.0], [2.0, 0.5]]), atol=1e-6)


def test_mse_map_is_channel_mean_of_squared_difference():
    t = _feat([[1, 2], [0, 0]])
    s = _feat([[0, 0], [3, 4]])
    (m,) = anomaly_maps([t], [s], similarity="mse")
    assert torch.allclose(m[0, 0, 0], torch.tensor([(1 + 4) / 2, (9 + 16) / 2]))


def test_similarity_loss_is_sum_of_per_scale_means():
    maps = [torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]]), torch.tensor([[[[4.0]]]])]
    assert similarity_loss(maps).item() == pytest.approx(1.5 + 4.0)


def test_mac_over_all_pairs_upsampled_to_largest():
    m1 = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # 2x2, the largest
    m2 = torch.tensor([[[[1.0]]]])  # 1x1 -> bilinear up to 2x2 is all 1
    m3 = torch.tensor([[[[3.0]]]])
    # pairs (1,2): mean(1,0,1,4)=1.5; (1,3): mean(9,4,1,0)=3.5; (2,3): 4
    assert mac_loss([m1, m2, m3]).item() == pytest.approx(1.5 + 3.5 + 4.0)
    assert mac_loss([m1]).item() == 0.0


def test_mac_uses_bilinear_upsampling():
    m1 = torch.zeros(1, 1, 4, 4)
    m2 = torch.tensor([[[[0.0, 4.0], [0.0, 4.0]]]])  # bilinear (align_corners=False) -> rows 0,1,3,4
    expect = torch.tensor([0.0, 1.0, 3.0, 4.0]).pow(2).mean()
    assert mac_loss([m1, m2]).item() == pytest.approx(expect.item())


def test_drkd_total_and_components():
    t = [_feat([[1, 0], [1, 0], [1, 0], [1, 0]], h=2), _feat([[1, 0]])]
    s = [_feat([[1, 0], [0, 1], [-1, 0], [1, 0]], h=2), _feat([[0, 1]])]
    # M1 = [[0,1],[2,0]] (mean .75), M2 = [[1]] -> L_sim = 1.75; MAC = mean((0-1)^2,(1-1)^2,(2-1)^2,(0-1)^2) = .75
    loss = DRKDLoss(beta=0.05)
    total = loss((t, s))
    assert total.item() == pytest.approx(1.75 + 0.05 * 0.75)
    assert loss.last == pytest.approx({"sim": 1.75, "mac": 0.75, "total": 1.75 + 0.0375})
    assert DRKDLoss(mac=False)((t, s)).item() == pytest.approx(1.75)
    assert DRKDLoss(layers=(2,))((t, s)).item() == pytest.approx(1.0)  # a map subset
    assert DRKDLoss(layers=(1,))((t, s)).item() == pytest.approx(0.75)


def test_drkd_target_is_ignored_and_errors_are_clear():
    t = [torch.randn(2, 4, 4, 4)]
    s = [torch.randn(2, 4, 4, 4)]
    loss = DRKDLoss()
    assert loss((t, s), torch.zeros(2)).item() == pytest.approx(loss((t, s)).item())
    with pytest.raises(ValueError, match="level 1"):
        loss((t, [torch.randn(2, 4, 2, 2)]))
    with pytest.raises(ValueError, match="similarity"):
        DRKDLoss(similarity="l1")
