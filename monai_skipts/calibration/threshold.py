"""The decision threshold from held-out normal scores: :func:`calibrate_threshold` (the order statistic, or a
fitted lognormal / gaussian tail), the methods (:data:`CALIBRATION_METHODS`) and the fewest normals each needs
(:func:`min_calibration_normals`, :func:`check_calibration_data`, checked before any training)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from monai_skipts.metrics import as_float_array, to_numpy

__all__ = [
    "CALIBRATION_METHODS",
    "MIN_PARAMETRIC_NORMALS",
    "CalibrationWarning",
    "calibrate_threshold",
    "check_calibration_data",
    "min_calibration_normals",
]


class CalibrationWarning(UserWarning):
    """Too few normal scores to resolve the requested false positive rate."""


CALIBRATION_METHODS = ("empirical", "lognormal", "gaussian")
#: fewest held-out normals a parametric calibration fits its two parameters to
MIN_PARAMETRIC_NORMALS = 10


def min_calibration_normals(target_fpr: float, method: str = "empirical") -> int:
    """Fewest held-out normals that let ``method`` resolve ``target_fpr``: ``ceil(1 / target_fpr)``
    for the empirical quantile (fewer cannot flag even one normal), ``MIN_PARAMETRIC_NORMALS`` for a
    fitted tail."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if method == "empirical":
        return math.ceil(1.0 / float(target_fpr) - 1e-9)
    return MIN_PARAMETRIC_NORMALS


def check_calibration_data(n_normals: int, target_fpr: float, method: str = "empirical", source: Any = None) -> int:
    """Refuse, before any training, a validation split too small to calibrate ``target_fpr`` with
    ``method``; returns ``n_normals``.

    Raises:
        ValueError: naming ``source`` (e.g. the split file), the counts and what to change.
    """
    need = min_calibration_normals(target_fpr, method)
    if n_normals < need:
        where = f"{source}: " if source else ""
        lognormal = (
            "" if method != "empirical" else f", or use --calibration lognormal (needs {MIN_PARAMETRIC_NORMALS})"
        )
        raise ValueError(
            f"{where}{n_normals} validation normals cannot calibrate target_fpr={target_fpr:g} with the "
            f"{method!r} calibration (needs at least {need}); give the validation split more normals "
            f"(--val_fraction, or more normal images), raise --target_fpr{lognormal}"
        )
    return int(n_normals)


def _parametric_threshold(s: np.ndarray, target_fpr: float, method: str) -> float:
    """``method`` ``"gaussian"``: mean + z·sd of the scores; ``"lognormal"``: the same on
    ``log(score)`` (scores must be positive), mapped back; ``z`` the standard normal's
    ``1 - target_fpr`` quantile, ``sd`` the sample standard deviation (ddof 1)."""
    from scipy.stats import norm

    z = float(norm.ppf(1.0 - target_fpr))
    if method == "lognormal":
        if s.min() <= 0:
            raise ValueError("the lognormal calibration needs positive scores; use 'gaussian' or 'empirical'")
        x = np.log(s.astype(np.float64))
        return float(np.exp(x.mean() + z * x.std(ddof=1)))
    x = s.astype(np.float64)
    return float(x.mean() + z * x.std(ddof=1))


def calibrate_threshold(
    normal_scores: Any, target_fpr: float = 0.05, *, strict: bool = False, method: str = "empirical"
) -> float:
    """Decision threshold from held-out normal scores with false positive rate <= ``target_fpr``.

    Returns the *smallest* threshold ``t`` for which the fraction of the given normal scores with
    ``score >= t`` is at most ``target_fpr``, i.e. the empirical quantile with no interpolation:
    with the scores sorted ascending ``s[0] <= ... <= s[n-1]`` and ``k = floor(target_fpr * n)``
    normals allowed above threshold, ``t`` is the smallest score strictly greater than
    ``s[n-k-1]``. So ``t`` is always an observed score, at most ``k`` normals are flagged (fewer
    when ties at the boundary force ``t`` higher), and any lower threshold would flag more than
    ``k``. (numpy's default linear interpolation would instead place ``t`` between two scores and
    can exceed the target.)

    When no observed score qualifies (``k = 0``, i.e. fewer than ``1 / target_fpr`` normals, or all
    top scores tied) the threshold is the next representable number above the highest normal
    score, in the scores' own float precision, so that no given normal is flagged.

    With ``method="lognormal"`` (or ``"gaussian"``) a distribution is fitted to the normal scores
    (to their logarithms) and the threshold is its ``1 - target_fpr`` quantile: it extrapolates the
    tail from every score instead of reading it off the one or two highest, which is what a small
    validation split can afford (see ``benchmarks/calibration.py`` for the measured test FPR of
    each). It needs at least ``MIN_PARAMETRIC_NORMALS`` scores; with fewer, or when every score is
    the same, it falls back to the empirical rule.

    Args:
        normal_scores: scores of held-out normal images (not the training set), shape ``(n,)``;
            finite; at least one.
        target_fpr: the false positive rate to stay at or below, in ``(0, 1)``.
        strict: raise instead of warning when there are too few normals (see Warns).
        method: ``"empirical"``, ``"lognormal"`` or ``"gaussian"`` (see ``CALIBRATION_METHODS``).

    Returns:
        The threshold, a Python float; classify ``score >= threshold`` as anomalous.

    Warns:
        CalibrationWarning: ``n < 1 / target_fpr``: the target cannot be resolved; the threshold
            sits just above the highest normal score and the true FPR is unknown. As a rule of
            thumb ``n >= 10 / target_fpr`` normals give a stable estimate.

    Raises:
        ValueError: no scores, non-finite scores, not 1-D, ``target_fpr`` outside ``(0, 1)``,
            or too few normals with ``strict=True``.
    """
    target_fpr = float(target_fpr)
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1); got {target_fpr}")
    s = to_numpy(normal_scores)
    if s.ndim != 1:
        raise ValueError(f"normal_scores must be 1-D (one score per image); got shape {s.shape}")
    if s.size == 0:
        raise ValueError("calibrate_threshold needs at least one normal score; got none")
    s = np.sort(as_float_array(s, "normal_scores"))
    n = s.size
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if method != "empirical" and n >= MIN_PARAMETRIC_NORMALS and s[-1] > s[0]:
        return _parametric_threshold(s, target_fpr, method)
    k = int(math.floor(target_fpr * n + 1e-9))  # normals allowed at or above the threshold
    if k == 0:
        needed = math.ceil(1.0 / target_fpr - 1e-9)
        msg = (
            f"only {n} normal score(s): cannot resolve target_fpr={target_fpr:g} "
            f"(needs at least {needed}); the threshold is set just above the highest normal score"
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, CalibrationWarning, stacklevel=2)
    boundary = s[n - k - 1]  # the highest score that must stay below the threshold
    i = int(np.searchsorted(s, boundary, side="right"))  # first score strictly above it
    if i < n:
        return float(s[i])
    return float(np.nextafter(s[-1], np.array(np.inf, dtype=s.dtype)))
