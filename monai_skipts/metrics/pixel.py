"""Pixel-level metrics: anomaly maps against binary ground-truth masks.

* :func:`pixel_auroc`: AUROC over all pixels pooled.
* :func:`aupro`: area under the per-region-overlap curve up to an FPR limit (MVTec AD definition).
* :func:`dice_scores`: Dice of ``map >= t`` against the masks, pooled over all pixels, at the best
  ``t`` (an oracle upper bound, like the Youden threshold) and at a given decision threshold.
* :func:`hit_rate`: the share of images with a lesion whose map maximum lies inside the lesion.
* :func:`pixel_metrics`: all of them, as a dict.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc

from monai_skipts.metrics.inputs import as_binary, as_float_array, to_numpy

__all__ = ["aupro", "dice_scores", "hit_rate", "pixel_auroc", "pixel_metrics"]


def _pixel_inputs(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(maps float (N, *spatial), masks bool (N, *spatial))`` with both classes present.

    A singleton channel axis (``(N, 1, *spatial)`` with 2 or 3 spatial dims) is dropped.
    """
    m = to_numpy(maps)
    g = to_numpy(masks)
    if m.shape != g.shape:
        raise ValueError(f"maps and masks differ in shape: {m.shape} and {g.shape}")
    if m.ndim not in (3, 4, 5):
        raise ValueError(
            "maps and masks must be (N, H, W), (N, D, H, W) or with a channel axis of size 1 "
            f"(N, 1, H, W) / (N, 1, D, H, W); got shape {m.shape}"
        )
    if m.ndim >= 4 and m.shape[1] == 1:
        m, g = m[:, 0], g[:, 0]
    m = as_float_array(m, "maps")
    g = as_binary(g, "masks")
    n_pos = int(np.count_nonzero(g))
    if n_pos == 0:
        raise ValueError(
            "masks contain no anomalous pixels (no pixel is 1): pixel-level metrics need at least "
            "one annotated anomaly; evaluate image-level metrics only"
        )
    if n_pos == g.size:
        raise ValueError("masks contain no normal pixels (every pixel is 1): pixel-level metrics need both")
    return m, g


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of each mask, numbered 1..R across the whole batch (0 = normal).

    Full connectivity within each sample (8-neighbourhood in 2D, 26 in 3D, as MVTec AD's
    evaluation code); none across the sample axis.
    """
    spatial = masks.ndim - 1
    structure = np.zeros((3,) * masks.ndim, dtype=bool)
    structure[1] = ndimage.generate_binary_structure(spatial, spatial)
    labels, n_regions = ndimage.label(masks, structure=structure)
    return labels, int(n_regions)


def _partial_auc(fprs: np.ndarray, pros: np.ndarray, fpr_limit: float) -> float:
    """Trapezoidal area under ``(fprs, pros)`` on ``[0, fpr_limit]``, divided by ``fpr_limit``.

    ``fprs`` is non-decreasing, starts at 0 and ends at 1. The value at ``fpr_limit`` is
    interpolated linearly between its neighbouring points (as MVTec AD's ``trapezoid``).
    """
    ins = int(np.searchsorted(fprs, fpr_limit, side="right"))  # points [0, ins) have fpr <= limit
    area = auc(fprs[:ins], pros[:ins]) if ins >= 2 else 0.0
    x0, y0 = fprs[ins - 1], pros[ins - 1]
    if x0 < fpr_limit:  # then ins < len(fprs) because fprs[-1] = 1 >= limit
        x1, y1 = fprs[ins], pros[ins]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_lim) * (fpr_limit - x0)
    return float(area / fpr_limit)


def _check_aupro_args(fpr_limit: float, num_thresholds: int | None) -> tuple[float, int | None]:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    if num_thresholds is not None:
        if isinstance(num_thresholds, bool) or int(num_thresholds) != num_thresholds or num_thresholds < 2:
            raise ValueError(f"num_thresholds must be None or an integer >= 2; got {num_thresholds!r}")
        num_thresholds = int(num_thresholds)
    return fpr_limit, num_thresholds


def _score_levels(m: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct scores of ``m`` in descending order and, at each, the number of pixels and of
    lesion pixels (``g``) scoring at or above it: ``(values, n_flagged, n_hit)``; the counts are
    int32 below 2**30 pixels, else int64.

    Every pooled threshold metric is a function of these counts. Memory: one sorted copy of the
    scores and one byte per pixel while the ties are found, then 12 bytes per distinct score; never
    the per-pixel index, float64 and cumulative-sum arrays a per-pixel ``argsort`` needs.
    """
    n = m.size
    count = np.int32 if n < 2**30 else np.int64
    s = np.sort(m, axis=None)  # ascending copy
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    values = s[new]
    del s
    n_flagged = np.flatnonzero(new).astype(count)  # first index of each distinct value
    del new
    np.subtract(n, n_flagged, out=n_flagged)
    pos = np.sort(m[g], axis=None)
    n_hit = np.empty(values.size, dtype=count)
    chunk = 1 << 20
    for i in range(0, values.size, chunk):
        n_hit[i : i + chunk] = pos.size - np.searchsorted(pos, values[i : i + chunk], side="left")
    return values[::-1], n_flagged[::-1], n_hit[::-1]


def _corners(x: np.ndarray) -> np.ndarray:
    """``np.diff(x, 2) != 0`` for an integer ``x``, with one integer temporary."""
    d = np.diff(x)
    return d[1:] != d[:-1]


def _pixel_auroc(m: np.ndarray, g: np.ndarray, levels: tuple | None = None) -> float:
    """``roc_auc_score(g.ravel(), m.ravel())``, bit for bit, from :func:`_score_levels`.

    The ROC points are sklearn's ``roc_curve``: true and false positives as float64 counts at each
    distinct score, the points collinear with both neighbours dropped (a zero second difference
    of both counts; false positives = flagged - hits, so those two counts decide it), ``(0, 0)``
    prepended, integrated with ``auc``.
    """
    _, n_flagged, n_hit = _score_levels(m, g) if levels is None else levels
    if n_hit.shape[0] > 2:
        keep = np.ones(n_hit.shape[0], dtype=bool)
        keep[1:-1] = _corners(n_hit)
        keep[1:-1] |= _corners(n_flagged)
        idx = np.flatnonzero(keep)
        del keep
        n_flagged, n_hit = n_flagged[idx], n_hit[idx]
        del idx
    fpr = np.zeros(n_hit.shape[0] + 1)
    tpr = np.zeros(n_hit.shape[0] + 1)
    np.subtract(n_flagged, n_hit, out=fpr[1:])  # exact integers in float64, as sklearn's counts
    tpr[1:] = n_hit
    del n_flagged, n_hit
    fpr /= fpr[-1]
    tpr /= tpr[-1]
    return float(auc(fpr, tpr))


def _aupro(
    m: np.ndarray, g: np.ndarray, fpr_limit: float, num_thresholds: int | None, levels: tuple | None = None
) -> float:
    """:func:`aupro` on checked inputs: ``m`` float and ``g`` bool, both ``(N, *spatial)``;
    ``levels``: :func:`_score_levels` of ``(m, g)`` (the exact curve computes it when not given)."""
    labels, n_regions = _label_regions(g)
    scores = m.ravel()
    labels = labels.ravel()
    n_normal = int(g.size - np.count_nonzero(g))
    # each region adds 1/size per flagged pixel, so its total is the overlap fraction
    inv_size = 1.0 / np.bincount(labels, minlength=n_regions + 1).astype(np.float64)
    inv_size[0] = 0.0

    if num_thresholds is None:
        # Points with FPR <= limit, plus the first beyond it (for the interpolation), come from
        # thresholds >= the c-th highest normal score, c = floor(limit * n_normal) + 2 (one spare
        # against rounding); pixels below it cannot change those points, so they are not sorted.
        c = int(math.floor(fpr_limit * n_normal)) + 2
        if c <= n_normal:
            values, n_flagged, n_hit = _score_levels(m, g) if levels is None else levels
            # the c-th highest normal score: the first level (descending) with >= c normals at or above it
            cut = values[int(np.searchsorted(n_flagged - n_hit, c, side="left"))]
            del values, n_flagged, n_hit, levels
            keep = np.flatnonzero(scores >= cut)
            sub_scores, sub_labels = scores[keep], labels[keep]
            del keep
        else:
            sub_scores, sub_labels = scores, labels
        del labels
        order = np.argsort(sub_scores)[::-1]
        sub_scores = sub_scores[order]
        sub_labels = sub_labels[order]
        del order
        last_of_tie = np.append(sub_scores[1:] != sub_scores[:-1], True)  # descending order
        del sub_scores
        fp = np.cumsum(sub_labels == 0)[last_of_tie]
        pro = inv_size[sub_labels]
        del sub_labels
        pro = np.cumsum(pro, out=pro)[last_of_tie]
    else:
        k = num_thresholds
        grid = np.linspace(scores.min(), scores.max(), k)
        # bin b holds the scores in [grid[b], grid[b + 1]); a pixel is flagged at grid[j] iff b >= j
        bins = np.searchsorted(grid, scores, side="right") - 1
        fp = np.bincount(bins, weights=labels == 0, minlength=k)[::-1].cumsum()
        pro = np.bincount(bins, weights=inv_size[labels], minlength=k)[::-1].cumsum()

    fprs = np.minimum(np.concatenate(([0.0], fp / n_normal, [1.0])), 1.0)
    pros = np.minimum(np.concatenate(([0.0], pro / n_regions, [1.0])), 1.0)
    return _partial_auc(fprs, pros, fpr_limit)


def pixel_auroc(maps: Any, masks: Any) -> float:
    """Pixel-level AUROC: all pixels of all maps pooled (sklearn ``roc_auc_score``).

    Args:
        maps: anomaly maps, shape ``(N, H, W)``, ``(N, D, H, W)`` or with a size-1 channel axis
            ``(N, 1, ...)``; finite; higher = more anomalous.
        masks: ground truth of the same shape; 0/1 or boolean. Normal images have all-zero masks
            and contribute normal pixels.

    Raises:
        ValueError: shapes differ, maps are not finite, masks are not binary, or the masks have
            no anomalous (or no normal) pixel at all.
    """
    m, g = _pixel_inputs(maps, masks)
    return _pixel_auroc(m, g)


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit`` (MVTec AD).

    Each connected component of each mask is a region (8-connectivity in 2D, 26 in 3D). At a
    threshold ``t`` (pixels with ``map >= t`` are flagged), PRO is the mean over all regions of
    the fraction of the region flagged, and FPR is the fraction of all normal pixels (mask 0, in
    every image) flagged. The curve runs from (0, 0) to (1, 1); its trapezoidal area on
    ``[0, fpr_limit]`` (PRO at the limit interpolated linearly) divided by ``fpr_limit`` is
    returned, so a perfect map scores 1 (up to float rounding, ~1e-16) and a random one about
    ``fpr_limit / 2``.

    With ``num_thresholds=None`` every distinct score is a threshold: the exact curve, as in the
    MVTec AD evaluation code. Only the pixels scoring at or above the point where FPR passes the
    limit are sorted: about 1.3 s for 200 maps of 256x256 on one CPU core. With an integer, the
    curve is evaluated only at that many thresholds evenly spaced between the lowest and highest
    score, like the threshold-grid implementations in other code bases: an approximation (poor
    when a few extreme scores stretch the range), no faster, meant for comparing with those.

    Args:
        maps: anomaly maps, shape ``(N, H, W)``, ``(N, D, H, W)`` or with a size-1 channel axis
            ``(N, 1, ...)``; finite; higher = more anomalous.
        masks: ground truth of the same shape; 0/1 or boolean. All-zero masks (normal images)
            add normal pixels only.
        fpr_limit: upper end of the FPR integration range, in ``(0, 1]``.
        num_thresholds: ``None`` for the exact curve, or the number of thresholds (>= 2).

    Raises:
        ValueError: see :func:`pixel_auroc`; also ``fpr_limit`` or ``num_thresholds`` out of range.
    """
    fpr_limit, num_thresholds = _check_aupro_args(fpr_limit, num_thresholds)
    m, g = _pixel_inputs(maps, masks)
    return _aupro(m, g, fpr_limit, num_thresholds)


def _best_dice(m: np.ndarray, g: np.ndarray, levels: tuple | None = None) -> tuple[float, float]:
    """Highest pooled Dice over all thresholds ``map >= t`` and the ``t`` reaching it (exact: every
    distinct score is tried; the highest such ``t`` on a tie). Dice = 2 TP / (flagged + lesion
    pixels). ``levels``: :func:`_score_levels` of ``(m, g)``, computed when not given."""
    values, n_flagged, n_hit = _score_levels(m, g) if levels is None else levels
    n_lesion = int(n_hit[-1])
    best, k, chunk = -1.0, 0, 1 << 20
    for i in range(0, values.shape[0], chunk):  # the first maximum, a chunk at a time
        dice = 2.0 * n_hit[i : i + chunk] / (n_flagged[i : i + chunk].astype(np.int64) + n_lesion)
        j = int(np.argmax(dice))
        if dice[j] > best:
            best, k = float(dice[j]), i + j
    return best, float(values[k])


def _dice_at(m: np.ndarray, g: np.ndarray, threshold: float) -> float:
    flagged = m >= threshold
    inter = int(np.count_nonzero(flagged & g))
    denom = int(np.count_nonzero(flagged)) + int(np.count_nonzero(g))
    return float(2.0 * inter / denom) if denom else 0.0


def dice_scores(maps: Any, masks: Any, threshold: float | None = None) -> dict[str, float]:
    """Dice of the thresholded maps against the masks, all pixels of all images pooled.

    ``dice_best`` is the highest Dice over every threshold (and ``dice_best_threshold`` the map value
    reaching it): chosen on the evaluated data itself, an upper bound like the Youden threshold of
    :func:`image_metrics`. ``dice`` (only when ``threshold`` is given) is the Dice at the deployed
    decision threshold, the region a reader would be shown. Normal images count: every pixel they
    flag is a false positive.

    Args:
        maps, masks: as for :func:`pixel_auroc`.
        threshold: decision threshold in map units (a pixel is flagged when ``map >= threshold``).

    >>> import numpy as np
    >>> maps = np.array([[[0.9, 0.2], [0.8, 0.1]]]); masks = np.array([[[1, 0], [0, 0]]])
    >>> dice_scores(maps, masks, threshold=0.5)  # doctest: +NORMALIZE_WHITESPACE
    {'dice_best': 1.0, 'dice_best_threshold': 0.9, 'dice': 0.6666666666666666}
    """
    m, g = _pixel_inputs(maps, masks)
    best, t_best = _best_dice(m, g)
    out = {"dice_best": best, "dice_best_threshold": t_best}
    if threshold is not None:
        out["dice"] = _dice_at(m, g, float(threshold))
    return out


def _hit_rate(m: np.ndarray, g: np.ndarray) -> tuple[float, int]:
    flat_m = m.reshape(m.shape[0], -1)
    flat_g = g.reshape(g.shape[0], -1)
    has_lesion = flat_g.any(axis=1)
    if not has_lesion.any():
        raise ValueError("hit rate needs at least one image with a lesion in its mask")
    peak = flat_m[has_lesion].argmax(axis=1)
    hits = flat_g[has_lesion][np.arange(int(has_lesion.sum())), peak]
    return float(hits.mean()), int(has_lesion.sum())


def hit_rate(maps: Any, masks: Any) -> float:
    """Share of the images with a lesion (a non-empty mask) whose anomaly-map maximum lies inside
    the lesion mask: does the hottest point, the one the image score comes from, land on the lesion.

    Images with an empty mask are ignored. Ties for the maximum take the first pixel in row-major
    order (``argmax``).

    Args:
        maps, masks: as for :func:`pixel_auroc`.

    >>> import numpy as np
    >>> maps = np.array([[[0.9, 0.2]], [[0.1, 0.3]], [[0.5, 0.0]]])
    >>> masks = np.array([[[1, 0]], [[1, 0]], [[0, 0]]])
    >>> hit_rate(maps, masks)
    0.5
    """
    m, g = _pixel_inputs(maps, masks)
    return _hit_rate(m, g)[0]


def pixel_metrics(
    maps: Any, masks: Any, fpr_limit: float = 0.3, num_thresholds: int | None = None, threshold: float | None = None
) -> dict[str, float]:
    """Pixel-level metrics as a dict: ``pixel_auroc``, ``aupro``, ``dice_best``,
    ``dice_best_threshold``, ``hit_rate``, ``n_lesion_images`` and, with ``threshold``, ``dice``
    (see :func:`pixel_auroc`, :func:`aupro`, :func:`dice_scores`, :func:`hit_rate`).

    Args:
        maps: anomaly maps, shape ``(N, H, W)``, ``(N, D, H, W)`` or ``(N, 1, ...)``.
        masks: binary ground truth of the same shape.
        fpr_limit, num_thresholds: passed to :func:`aupro`.
        threshold: the decision threshold, for ``dice``.
    """
    fpr_limit, num_thresholds = _check_aupro_args(fpr_limit, num_thresholds)
    m, g = _pixel_inputs(maps, masks)  # checked once for all
    levels = _score_levels(m, g)  # shared by the pooled threshold metrics
    best, t_best = _best_dice(m, g, levels)
    auroc = _pixel_auroc(m, g, levels)
    pro = _aupro(m, g, fpr_limit, num_thresholds, levels)
    del levels
    hits, n_lesion = _hit_rate(m, g)
    out = {
        "pixel_auroc": auroc,
        "aupro": pro,
        "dice_best": best,
        "dice_best_threshold": t_best,
        "hit_rate": hits,
        "n_lesion_images": n_lesion,
    }
    if threshold is not None:
        out["dice"] = _dice_at(m, g, float(threshold))
    return out
