"""Pixel-level metrics: hand-computed cases and slow reference implementations."""

from __future__ import annotations

import bisect

import numpy as np
import pytest
from conftest import assert_plain_json
from scipy import ndimage

from monai_skipts.metrics import aupro, dice_scores, hit_rate, pixel_auroc, pixel_metrics

# slow references


def mvtec_trapezoid(x, y, x_max):
    """The MVTec AD evaluation script's trapezoid(), restated: integrate up to x_max."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    correction = 0.0
    if x_max not in x:
        ins = bisect.bisect(x.tolist(), x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def reference_aupro(maps, masks, fpr_limit=0.3, thresholds=None):
    """One threshold at a time, one region at a time: PRO and FPR straight from the definition."""
    maps, masks = np.asarray(maps, float), np.asarray(masks).astype(bool)
    structure = np.ones((3,) * (maps.ndim - 1), dtype=int)  # 8- (2D) / 26- (3D) connectivity
    regions = []  # (image index, region mask)
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=structure)
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    if thresholds is None:
        thresholds = np.unique(maps)
    fprs, pros = [0.0], [0.0]
    for t in sorted(thresholds, reverse=True):
        flagged = maps >= t
        fprs.append(np.sum(flagged & normal) / np.sum(normal))
        pros.append(np.mean([np.sum(flagged[i] & r) / np.sum(r) for i, r in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    return mvtec_trapezoid(fprs, pros, fpr_limit) / fpr_limit


def random_case(rng, n=6, size=12, n_normal_images=2, decimals=2):
    """Blob-shaped masks (some images all normal), noisy maps with ties, higher inside blobs."""
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 1.2, 1.2))
    masks = noise > np.quantile(noise, 0.85)
    masks[:n_normal_images] = False
    maps = np.round(rng.random((n, size, size)) + 0.6 * masks * rng.random((n, size, size)), decimals)
    return maps, masks


def test_pixel_auroc_hand_example():
    maps = np.array([[[0.1, 0.7], [0.4, 0.9]]])
    masks = np.array([[[0, 1], [0, 0]]])
    # anomalous 0.7 beats normals 0.1 and 0.4, loses to 0.9 -> 2/3
    assert pixel_auroc(maps, masks) == pytest.approx(2 / 3)
    assert pixel_auroc(maps[:, None], masks[:, None]) == pytest.approx(2 / 3)  # (N, 1, H, W)


def test_aupro_perfect_map():
    rng = np.random.default_rng(4)
    _, masks = random_case(rng)
    # exact up to the rounding of summing 1/region-size per pixel
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks.astype(float), masks, num_thresholds=10) == pytest.approx(1.0, abs=1e-12)


def two_region_case():
    """4x4 image: region A = (0,0),(0,1); region B = (3,2),(3,3); 12 normal pixels."""
    masks = np.zeros((1, 4, 4), dtype=np.uint8)
    masks[0, 0, :2] = 1
    masks[0, 3, 2:] = 1
    maps = np.zeros((1, 4, 4))
    maps[0, 0, :2] = 1.0
    return maps, masks


def test_aupro_two_regions_by_hand():
    maps, masks = two_region_case()
    maps[0, 2, 0] = 0.8  # one normal pixel
    maps[0, 3, 2:] = 0.5
    # curve: (0,0) -> t=1: A done (0, 1/2) -> t=.8: (1/12, 1/2) -> t=.5: B done (1/12, 1) -> (1, 1)
    expected = ((1 / 12) * 0.5 + (0.3 - 1 / 12) * 1.0) / 0.3
    assert expected == pytest.approx(31 / 36)
    assert aupro(maps, masks) == pytest.approx(expected)
    assert reference_aupro(maps, masks) == pytest.approx(expected)


def test_aupro_two_regions_interpolated_at_limit():
    maps, masks = two_region_case()
    maps[0, 3, 2] = 0.7  # half of B
    maps[0, 1, :] = 0.6  # four normal pixels (FPR 1/3) ...
    maps[0, 3, 3] = 0.6  # ... tied with the rest of B
    # curve: (0,0), (0,1/2), (0,3/4), (1/3, 1), (1,1); PRO at FPR .3 = 3/4 + 1/4 * .3 / (1/3)
    pro_at_limit = 0.75 + 0.25 * 0.9
    expected = 0.5 * (0.75 + pro_at_limit) * 0.3 / 0.3
    assert aupro(maps, masks) == pytest.approx(expected)
    assert reference_aupro(maps, masks) == pytest.approx(expected)


def test_aupro_regions_use_8_connectivity():
    maps, masks = two_region_case()
    masks[0, 0, 1] = 0
    masks[0, 1, 1] = 1  # A is now (0,0) and (1,1): diagonal neighbours, still one region
    maps[:] = 0.0
    maps[0, 0, 0] = 1.0  # half of A first
    maps[0, 2, :] = 0.8  # four normals: FPR 1/3 > limit
    maps[0, 1, 1] = maps[0, 3, 2] = maps[0, 3, 3] = 0.5
    # 2 regions: PRO = (1/2 + 0) / 2 = 1/4 flat over [0, 1/3] (4-connectivity would give 1/3)
    assert aupro(maps, masks) == pytest.approx(0.25)
    # 3-D: voxels touching at a corner are one region too (26-connectivity)
    vol_masks = np.zeros((1, 3, 4, 4), dtype=bool)
    vol_masks[0, 0, 0, 0] = vol_masks[0, 1, 1, 1] = True
    vol_masks[0, 2, 3, 2:] = True
    vol_maps = np.zeros((1, 3, 4, 4))
    vol_maps[0, 0, 0, 0] = 1.0
    vol_maps[0, 2, 0, :] = 0.8
    vol_maps[vol_masks & (vol_maps == 0)] = 0.5
    fpr = 4 / (vol_masks.size - 4)  # the 0.8 plateau: (0, 1/4) -> (fpr, 1/4) -> (fpr, 1)
    expected = (0.25 * fpr + (0.3 - fpr)) / 0.3
    assert aupro(vol_maps, vol_masks) == pytest.approx(expected)
    assert reference_aupro(vol_maps, vol_masks) == pytest.approx(expected)
    assert aupro(vol_maps[:, None], vol_masks[:, None]) == pytest.approx(expected)  # (N, 1, D, H, W)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(fpr_limit):
    rng = np.random.default_rng(5)
    for _ in range(3):
        maps, masks = random_case(rng)
        assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(
            reference_aupro(maps, masks, fpr_limit), abs=1e-9
        )
        grid = np.linspace(maps.min(), maps.max(), 17)
        assert aupro(maps, masks, fpr_limit=fpr_limit, num_thresholds=17) == pytest.approx(
            reference_aupro(maps, masks, fpr_limit, thresholds=grid), abs=1e-9
        )


def test_aupro_binned_approaches_exact():
    rng = np.random.default_rng(6)
    maps, masks = random_case(rng, n=8, size=32, decimals=6)
    exact = aupro(maps, masks)
    assert aupro(maps, masks, num_thresholds=5000) == pytest.approx(exact, abs=2e-3)
    assert 0.0 < exact < 1.0


def test_aupro_constant_map_is_chance():
    _, masks = two_region_case()
    assert aupro(np.ones((1, 4, 4)), masks, fpr_limit=0.3) == pytest.approx(0.15)


def test_pixel_metrics_dict_and_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    maps, masks = random_case(rng)
    d = pixel_metrics(maps, masks)
    assert set(d) == {"pixel_auroc", "aupro", "dice_best", "dice_best_threshold", "hit_rate", "n_lesion_images"}
    assert d["pixel_auroc"] == pixel_auroc(maps, masks) and d["aupro"] == aupro(maps, masks)
    assert d["hit_rate"] == hit_rate(maps, masks)
    assert d["dice_best"] == dice_scores(maps, masks)["dice_best"]
    assert pixel_metrics(maps, masks, threshold=0.5)["dice"] == dice_scores(maps, masks, 0.5)["dice"]
    assert_plain_json(d)
    assert pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks)) == d


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_auroc_and_best_dice_equal_the_per_pixel_computations_bit_for_bit(dtype):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(11)
    for q in (0, 3, 40):  # distinct scores, few levels, many ties
        maps = rng.random((4, 12, 12)).astype(dtype)
        if q:
            maps = (np.round(maps * q) / q).astype(dtype)
        masks = rng.random((4, 12, 12)) < 0.3
        assert pixel_auroc(maps, masks) == float(roc_auc_score(masks.ravel(), maps.ravel()))
        # the best Dice by sorting every pixel (descending, ties resolved at their last pixel)
        s = maps.ravel()
        order = np.argsort(s, kind="stable")[::-1]
        tp, ss = np.cumsum(masks.ravel()[order]), s[order]
        last = np.append(ss[1:] != ss[:-1], True)
        dice = 2.0 * tp[last] / (np.arange(1, s.size + 1)[last] + int(tp[-1]))
        k = int(np.argmax(dice))
        assert dice_scores(maps, masks) == {"dice_best": float(dice[k]), "dice_best_threshold": float(ss[last][k])}


def test_best_dice_and_pixel_auroc_over_more_distinct_scores_than_one_chunk():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(13)
    maps = rng.random((18, 256, 256))  # 1.18 M distinct scores: the best Dice is searched in 2 chunks
    masks = np.zeros(maps.shape, bool)
    masks[:, 100:140, 60:90] = True
    maps[masks] += 0.2
    maps[5, 120, 70] = 2.0  # a lone top pixel inside a lesion
    s = maps.ravel()
    order = np.argsort(s, kind="stable")[::-1]
    tp = np.cumsum(masks.ravel()[order])
    dice = 2.0 * tp / (np.arange(1, s.size + 1) + int(tp[-1]))
    k = int(np.argmax(dice))
    assert dice_scores(maps, masks) == {"dice_best": float(dice[k]), "dice_best_threshold": float(s[order][k])}
    assert pixel_auroc(maps, masks) == float(roc_auc_score(masks.ravel(), maps.ravel()))


def test_pooled_pixel_metrics_keep_one_entry_per_distinct_score_not_per_pixel():
    from monai_skipts.metrics.pixel import _score_levels

    rng = np.random.default_rng(12)
    maps = rng.integers(0, 3, (40, 64, 64)).astype(np.float32)  # 163 840 pixels, 3 distinct scores
    masks = maps == 2
    masks[0] = False
    values, n_flagged, n_hit = _score_levels(maps, masks)
    assert values.tolist() == [2.0, 1.0, 0.0]
    assert n_flagged.tolist() == np.cumsum([np.sum(maps == v) for v in (2, 1, 0)]).tolist()
    assert n_hit.tolist() == [int(masks.sum())] * 3


def test_bad_pixel_inputs():
    maps, masks = two_region_case()
    with pytest.raises(ValueError, match="no anomalous pixels"):
        aupro(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="no anomalous pixels"):
        pixel_auroc(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="no normal pixels"):
        pixel_metrics(maps, np.ones_like(masks))
    with pytest.raises(ValueError, match=r"also found 255.*mask > 0"):
        aupro(maps, masks * 255)
    with pytest.raises(ValueError, match="differ in shape"):
        aupro(maps, masks[:, :2])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        aupro(maps[0], masks[0])
    bad = maps.copy()
    bad[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match=r"maps contain 1 non-finite"):
        pixel_metrics(bad, masks)
    for kw in ({"fpr_limit": 0.0}, {"fpr_limit": 1.5}, {"num_thresholds": 1}, {"num_thresholds": 2.5}):
        with pytest.raises(ValueError):
            aupro(maps, masks, **kw)


def test_dice_by_hand():
    # image 1: lesion at (0,0),(0,1); image 2: normal (all zero mask)
    maps = np.array([[[0.9, 0.6], [0.7, 0.1]], [[0.8, 0.2], [0.3, 0.0]]])
    masks = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    # t = 0.5: flagged (0.9, 0.6, 0.7, 0.8) -> TP 2, flagged 4, lesion 2 -> 2*2/(4+2)
    assert dice_scores(maps, masks, 0.5)["dice"] == pytest.approx(4 / 6)
    # best: t = 0.9 -> 2*1/(1+2) = 2/3; t = 0.8 -> 2*1/(2+2); t = 0.7 -> 2/5; t = 0.6 -> 2*2/(4+2) = 2/3
    # the first of equal maxima in descending threshold order is 0.9
    d = dice_scores(maps, masks)
    assert d["dice_best"] == pytest.approx(2 / 3) and d["dice_best_threshold"] == 0.9
    assert "dice" not in d
    # a perfect map reaches 1 at the lesion's lowest value
    perfect = masks.astype(float) * 0.5 + 0.1
    assert dice_scores(perfect, masks) == {"dice_best": 1.0, "dice_best_threshold": 0.6}
    # nothing flagged at all: Dice 0, not NaN
    assert dice_scores(maps, masks, 5.0)["dice"] == 0.0


def test_hit_rate_by_hand():
    maps = np.zeros((4, 3, 3))
    masks = np.zeros((4, 3, 3), dtype=bool)
    masks[0, 1, 1] = masks[1, 0, 0] = masks[2, 2, 2] = True  # three lesion images, one normal
    maps[0, 1, 1] = 1.0  # hit
    maps[1, 2, 2] = 1.0  # miss
    maps[2, 2, 2] = 1.0  # hit
    maps[3, 0, 0] = 9.0  # normal image: ignored
    assert hit_rate(maps, masks) == pytest.approx(2 / 3)
    assert pixel_metrics(maps, masks)["n_lesion_images"] == 3
    with pytest.raises(ValueError, match="no anomalous pixels"):
        hit_rate(maps, np.zeros_like(masks))
