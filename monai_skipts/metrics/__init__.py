"""Evaluation metrics for anomaly detection.

- :mod:`~monai_skipts.metrics.image`: image level (AUROC, AUPR, the numbers at the test set's Youden
  threshold and at the decision threshold, named apart) and the normalised score.
- :mod:`~monai_skipts.metrics.pixel`: pixel level (pixel AUROC, AUPRO, Dice, hit rate).
- :mod:`~monai_skipts.metrics.inputs`: the input checks they share.

Conventions everywhere: a higher score means more anomalous, and ``score >= threshold`` is
classified anomalous. Dicts hold plain Python ``float``/``int`` so they JSON-serialise and can be
logged as metrics directly. Inputs may be anything :func:`numpy.asarray` accepts, or torch tensors
(on any device). Bad inputs raise ``ValueError``; no metric is ever returned as NaN. The decision
threshold itself is calibrated in :mod:`monai_skipts.calibration`.
"""

from monai_skipts.metrics.image import (
    AT_THRESHOLD_KEYS,
    image_metrics,
    metrics_at_threshold,
    normalize_score,
    report_metrics,
)
from monai_skipts.metrics.inputs import as_binary, as_float_array, check_finite, to_numpy
from monai_skipts.metrics.pixel import aupro, dice_scores, hit_rate, pixel_auroc, pixel_metrics

__all__ = [
    "to_numpy",
    "as_float_array",
    "as_binary",
    "check_finite",
    "image_metrics",
    "metrics_at_threshold",
    "report_metrics",
    "AT_THRESHOLD_KEYS",
    "normalize_score",
    "pixel_auroc",
    "aupro",
    "dice_scores",
    "hit_rate",
    "pixel_metrics",
]
