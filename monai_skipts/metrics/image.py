"""Image-level metrics (one anomaly score per image, label 0 = normal, 1 = anomalous) and the
normalised score.

* :func:`image_metrics`: AUROC, AUPR (average precision) and the threshold-dependent numbers at
  the Youden threshold of the given data (the paper's reporting protocol).
* :func:`metrics_at_threshold`: the same threshold-dependent numbers at a given threshold, e.g. the
  one from :func:`~monai_skipts.calibration.calibrate_threshold`.
* :func:`report_metrics`: both, named as ``metrics.json`` and MLflow name them, so that the test-set
  Youden threshold (``youden_threshold_on_test``, ``tp_at_youden``, ...) cannot be mistaken for the
  deployed decision threshold (``decision_threshold``, ``tp_at_decision``, ...).
* :func:`normalize_score`: a monotone map of raw scores to (0, 1) with the threshold at 0.5.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve

from monai_skipts.metrics.inputs import as_binary, as_float_array, to_numpy

__all__ = ["AT_THRESHOLD_KEYS", "image_metrics", "metrics_at_threshold", "normalize_score", "report_metrics"]


def _image_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(scores as float64 (N,), labels as bool (N,))`` with both classes present."""
    s = to_numpy(scores)
    y = to_numpy(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D (one value per image); got shapes {s.shape} and {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} scores, {y.shape[0]} labels")
    s = as_float_array(s, "scores").astype(np.float64, copy=False)
    y = as_binary(y, "labels")
    n_abnormal = int(np.count_nonzero(y))
    n_normal = int(y.size - n_abnormal)
    if n_normal == 0 or n_abnormal == 0:
        if y.size == 0:
            got = "no images at all"
        elif n_abnormal == 0:
            got = f"only normal images ({n_normal} with label 0, none with label 1)"
        else:
            got = f"only anomalous images ({n_abnormal} with label 1, none with label 0)"
        raise ValueError(f"the test set needs both normal (label 0) and anomalous (label 1) images; got {got}")
    return s, y


def _threshold_metrics(s: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float | int]:
    pred = s >= threshold
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[False, True]).ravel())
    n = tn + fp + fn + tp
    return {
        "threshold": float(threshold),
        "sensitivity": tp / (tp + fn),  # recall, TPR; tp + fn > 0 is checked by the caller
        "specificity": tn / (tn + fp),  # TNR = 1 - FPR; tn + fp > 0 likewise
        "precision": tp / (tp + fp) if tp + fp else 0.0,  # nothing flagged: 0 (sklearn zero_division=0)
        "f1": 2 * tp / (2 * tp + fp + fn),  # > 0 denominator since tp + fn > 0
        "accuracy": (tp + tn) / n,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "n_normal": tn + fp,
        "n_abnormal": tp + fn,
    }


def metrics_at_threshold(scores: Any, labels: Any, threshold: float) -> dict[str, float | int]:
    """Threshold-dependent image-level metrics at a given threshold.

    Use this with the product's decision threshold (from :func:`calibrate_threshold`).

    Args:
        scores: anomaly scores, shape ``(N,)``; finite; higher = more anomalous.
        labels: ground truth, shape ``(N,)``; 0 (normal) or 1 (anomalous), or booleans.
        threshold: an image is classified anomalous when ``score >= threshold``.

    Returns:
        ``{"threshold", "sensitivity", "specificity", "precision", "f1", "accuracy",
        "tn", "fp", "fn", "tp", "n_normal", "n_abnormal"}``: floats, and ints for the counts.
        ``tn, fp, fn, tp`` is the confusion matrix with label 1 (anomalous) as the positive class.
        ``precision`` is 0.0 when no image is flagged.

    Raises:
        ValueError: shapes or lengths differ, scores are not finite, labels are not 0/1, only one
            class is present, or the threshold is NaN.
    """
    s, y = _image_inputs(scores, labels)
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    return _threshold_metrics(s, y, threshold)


def image_metrics(scores: Any, labels: Any) -> dict[str, float | int]:
    """Image-level AUROC and AUPR, and the threshold-dependent metrics at the Youden threshold.

    The Youden threshold maximises ``TPR - FPR`` (sensitivity + specificity - 1) *on the given
    data*: it is the test-set-optimal threshold the paper reports at, an optimistic number meant
    for comparison with published results only. The product's decision threshold must come from
    held-out normal data via :func:`calibrate_threshold`; evaluate it with
    :func:`metrics_at_threshold`.

    The threshold is always one of the observed scores (the lowest score still flagged, since
    ``score >= threshold`` is anomalous). When several thresholds reach the same maximum, the
    highest (fewest images flagged) is taken.

    Args:
        scores: anomaly scores, shape ``(N,)``; finite; higher = more anomalous.
        labels: ground truth, shape ``(N,)``; 0 (normal) or 1 (anomalous), or booleans.
            Both classes must be present.

    Returns:
        ``{"auroc", "aupr"}`` (sklearn ``roc_auc_score`` and ``average_precision_score`` with
        label 1 positive) merged with the dict of :func:`metrics_at_threshold` at the Youden
        threshold. All values are plain Python floats/ints.

    Raises:
        ValueError: see :func:`metrics_at_threshold`; a one-class test set is an error rather
            than an undefined (NaN) AUROC.
    """
    s, y = _image_inputs(scores, labels)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    # thresholds[0] is sklearn's "flag nothing" sentinel (inf): skip it. The last point flags
    # everything (TPR = FPR = 1, J = 0), so the maximum over the rest is always >= 0.
    # J = tp/P - fp/N, compared exactly as the integer tp*N - fp*P so that ties are real ties
    n_pos = int(np.count_nonzero(y))
    n_neg = int(y.size - n_pos)
    tp = np.rint(tpr[1:] * n_pos).astype(np.int64)
    fp = np.rint(fpr[1:] * n_neg).astype(np.int64)
    j = tp * n_neg - fp * n_pos
    youden = float(thresholds[1:][int(np.argmax(j))])  # argmax: first maximum = highest threshold
    out: dict[str, float | int] = {
        "auroc": float(roc_auc_score(y, s)),
        "aupr": float(average_precision_score(y, s)),
    }
    out.update(_threshold_metrics(s, y, youden))
    return out


#: the threshold-dependent keys of :func:`metrics_at_threshold`, suffixed ``_at_youden`` /
#: ``_at_decision`` by :func:`report_metrics`
AT_THRESHOLD_KEYS = ("sensitivity", "specificity", "precision", "f1", "accuracy", "tn", "fp", "fn", "tp")


def report_metrics(scores: Any, labels: Any, decision_threshold: float | None = None) -> dict[str, float | int]:
    """Image-level metrics of a test set as ``metrics.json`` (and, prefixed ``test_``, MLflow) names them.

    Every threshold-dependent number says which threshold it belongs to:

    - ``youden_threshold_on_test`` and ``<k>_at_youden``: at the Youden threshold *chosen on these
      (test) scores*, the paper's reporting protocol, an optimistic oracle; never deploy it.
    - ``decision_threshold`` and ``<k>_at_decision`` (when ``decision_threshold`` is given): at the
      threshold calibrated on held-out normals (:func:`calibrate_threshold`), the one the model
      applies; ``1 - specificity_at_decision`` is the test false-positive rate it gives.

    with ``k`` in :data:`AT_THRESHOLD_KEYS` (``tn, fp, fn, tp`` are the confusion-matrix counts,
    anomalous = positive). Threshold-free: ``auroc``, ``aupr``, ``n_normal``, ``n_abnormal``.

    Args:
        scores: test anomaly scores, shape ``(N,)``; finite; higher = more anomalous.
        labels: ground truth, 0 (normal) or 1 (anomalous); both classes present.
        decision_threshold: the calibrated threshold, or ``None``.

    Raises:
        ValueError: see :func:`image_metrics`.
    """
    m = image_metrics(scores, labels)
    out: dict[str, float | int] = {k: m[k] for k in ("auroc", "aupr", "n_normal", "n_abnormal")}
    out["youden_threshold_on_test"] = m["threshold"]
    out.update({f"{k}_at_youden": m[k] for k in AT_THRESHOLD_KEYS})
    if decision_threshold is not None:
        d = metrics_at_threshold(scores, labels, decision_threshold)
        out["decision_threshold"] = d["threshold"]
        out.update({f"{k}_at_decision": d[k] for k in AT_THRESHOLD_KEYS})
    return out


def normalize_score(score: Any, threshold: float, scale: float) -> float | np.ndarray:
    """Map raw scores to (0, 1) with a logistic centred on the decision threshold.

    ``normalized = 1 / (1 + exp(-(score - threshold) / scale))``: strictly increasing (up to
    float saturation at 0 and 1 far from the threshold), exactly 0.5 at the threshold, and a score
    ``scale`` above (below) the threshold reads 0.73 (0.27). It preserves the decision exactly:
    ``normalized >= 0.5`` if and only if ``score >= threshold`` (scores below the threshold that
    would round to 0.5 are nudged just below it). Use it to display scores, or anomaly maps, on a
    common scale; make decisions on either side consistently.

    ``scale`` sets how fast the normalised score saturates. Store it with the threshold; a natural
    choice is the spread of the same held-out normal scores used for calibration, e.g.
    ``np.std(normal_scores)``, or ``(threshold - np.median(normal_scores)) / np.log(9)`` so that
    the median normal reads 0.1.

    Args:
        score: a scalar or an array of any shape (e.g. ``(N,)`` scores or ``(N, H, W)`` maps).
        threshold: the decision threshold (maps to 0.5); finite.
        scale: positive, finite, in score units.

    Returns:
        A Python float for a scalar input, else a float64 array of the input's shape.

    Raises:
        ValueError: non-finite scores or threshold, or ``scale <= 0``.
    """
    threshold = float(threshold)
    scale = float(scale)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite; got {threshold}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite; got {scale}")
    s = as_float_array(score, "score").astype(np.float64, copy=False)
    out = expit((s - threshold) / scale)
    # keep the decision exact where the logistic rounds to 0.5 (|score - threshold| << scale)
    out = np.where(s < threshold, np.minimum(out, np.nextafter(0.5, 0.0)), out)
    return float(out) if out.ndim == 0 else out
