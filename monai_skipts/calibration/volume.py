"""The volume threshold: a volume is anomalous when its aggregated slice score is at or above it
(:func:`volume_threshold`), calibrated on validation volumes or from slices with the Šidák correction
(:func:`sidak_slice_fpr`)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from monai_skipts.calibration.uncertainty import CONFIDENCE, threshold_record
from monai_skipts.transforms.volume import aggregate_volume_scores

__all__ = ["sidak_slice_fpr", "volume_threshold"]


def sidak_slice_fpr(volume_fpr: float, n_slices: int) -> float:
    """The slice-level FPR whose threshold gives a volume FPR of ``volume_fpr`` when a volume of
    ``n_slices`` slices is flagged on its highest slice: ``1 − (1 − volume_fpr)^(1 / n_slices)``
    (Šidák). Exact for independent slice scores; with positively dependent slices (neighbouring
    slices look alike) the volume FPR is at most ``volume_fpr``, so the correction is conservative.
    Also conservative for the ``"mean"`` and ``"topk"`` aggregations (both at most the max).

    Example:
        >>> round(sidak_slice_fpr(0.05, 16), 5)
        0.0032
    """
    if not 0.0 < volume_fpr < 1.0 or int(n_slices) < 1:
        raise ValueError(f"need volume_fpr in (0, 1) and n_slices >= 1; got {volume_fpr}, {n_slices}")
    return float(-math.expm1(math.log1p(-volume_fpr) / int(n_slices)))


def volume_threshold(
    slice_scores: Any,
    target_fpr: float = 0.05,
    method: str = "lognormal",
    *,
    volume_ids: Sequence[Hashable] | None = None,
    n_slices: int | None = None,
    aggregation: str = "max",
    topk: int = 3,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """The volume-level threshold: a volume is anomalous when its aggregated score (the serving
    aggregation, :func:`~monai_skipts.transforms.aggregate_volume_scores`) is at or above it.

    Two sources, recorded under ``"source"``:

    - ``"volumes"`` (``volume_ids`` given): the validation slices are aggregated into volume scores
      exactly as served, and the threshold is calibrated on those (``n_normals`` = volumes);
    - ``"sidak"`` (only slices; ``n_slices``: the slice count of the volumes it will judge): the
      slice threshold at the Šidák-corrected FPR (:func:`sidak_slice_fpr`), so that the max over
      ``n_slices`` independent slices exceeds it with probability ``target_fpr``. The order statistic
      cannot resolve that small a rate from few slices; a parametric ``method`` extrapolates the tail.

    Args:
        slice_scores: normal slices' scores, ``(N,)``.
        target_fpr: the share of normal volumes allowed above the threshold.
        method: the calibration method (:func:`calibrate_threshold`).
        volume_ids: the volume of every slice (source ``"volumes"``).
        n_slices: slices per judged volume (source ``"sidak"``).
        aggregation, topk: the serving aggregation (source ``"volumes"``).
        confidence: of the FPR bound.

    Returns:
        a threshold record (:func:`threshold_record`) plus ``"source"``, ``"aggregation"`` and
        ``"n_slices"`` (the volumes' slice count; median for ``"volumes"``) and, for ``"sidak"``,
        ``"slice_fpr"``.

    Raises:
        ValueError: neither ``volume_ids`` nor ``n_slices``.
    """
    s = np.asarray(slice_scores, dtype=np.float64).reshape(-1)
    if volume_ids is not None:
        vols = aggregate_volume_scores(volume_ids, s, aggregation, topk)
        counts: dict = {}
        for v in volume_ids:
            counts[v] = counts.get(v, 0) + 1
        rec = threshold_record(list(vols.values()), target_fpr, method, confidence)
        rec.update(source="volumes", aggregation=aggregation, n_slices=int(np.median(list(counts.values()))))
        return rec
    if n_slices is None:
        raise ValueError("volume_threshold needs volume_ids (validation volumes) or n_slices (the slice correction)")
    slice_fpr = sidak_slice_fpr(target_fpr, n_slices)
    rec = threshold_record(s, slice_fpr, method, confidence)
    # the uncertainty of the slice rate maps to the volume rate through the same correction (independent slices)
    for key in ("fpr_expected", "fpr_bound"):
        rec[key] = float(-math.expm1(int(n_slices) * math.log1p(-rec[key])))
    rec.update(target_fpr=float(target_fpr), slice_fpr=slice_fpr, source="sidak", aggregation=aggregation)
    rec["n_slices"] = int(n_slices)
    return rec
