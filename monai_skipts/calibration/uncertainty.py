"""How far a calibrated image threshold can be trusted (:func:`fpr_uncertainty`, :func:`normals_needed`,
:func:`uncertainty_warning`), and the threshold record that states it (:func:`threshold_record`: the
checkpoint's ``"threshold"``, ``threshold.json``).

**The uncertainty of the image threshold.** A threshold set from ``n`` held-out normal scores is a
random variable; so is its false-positive rate on the population the normals came from. For a
continuous score distribution ``F`` it has a distribution that depends only on ``n``, the target and the
method, not on ``F``:

- ``"empirical"`` (the order statistic of :func:`calibrate_threshold`): with
  ``k = floor(target · n)`` normals allowed above it, the threshold is the ``(n − k + 1)``-th smallest
  score (``k = 0``: just above the largest, which gives the same rate as ``k = 1``); with
  ``a = max(k, 1)``, ``FPR = 1 − F(threshold) ~ Beta(a, n − a + 1)`` **exactly** (the uniform order
  statistic). Expected ``a / (n + 1)``; the bound is the Beta quantile.
- ``"gaussian"`` / ``"lognormal"`` (``mean + z · sd`` of the scores / of their logarithms): **exact
  when the scores (their logarithms) are normal**, because the FPR is then a pivot:
  ``P(FPR ≤ p) = P(T ≤ √n · z)`` with ``T`` noncentral t (``n − 1`` degrees of freedom, noncentrality
  ``√n · Φ⁻¹(1 − p)``), the one-sided normal tolerance bound; the expected FPR is the predictive
  ``1 − t_{n−1}(z / √(1 + 1/n))``. A parametric bootstrap from the fitted distribution estimates this
  same distribution by simulation; this module computes it in closed form instead. It does **not**
  cover a wrong family (a true tail heavier than the fit): the measured test FPRs in
  ``benchmarks/calibration.py`` show that part.

With fewer than :data:`MIN_PARAMETRIC_NORMALS` normals the parametric methods
fall back to the order statistic, and so does their uncertainty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from monai_skipts.calibration.threshold import CALIBRATION_METHODS, MIN_PARAMETRIC_NORMALS, calibrate_threshold

__all__ = ["CONFIDENCE", "fpr_uncertainty", "normals_needed", "threshold_record", "uncertainty_warning"]

#: the confidence of the FPR bound stored with every threshold
CONFIDENCE = 0.9
#: the bound is acceptable when at most this many times the target (else the training log warns)
BOUND_FACTOR = 2.0


def _effective_method(n: int, method: str) -> str:
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    return method if method != "empirical" and n >= MIN_PARAMETRIC_NORMALS else "empirical"


def _beta_params(n: int, target_fpr: float) -> tuple[int, int]:
    a = max(int(math.floor(target_fpr * n + 1e-9)), 1)
    return a, n - a + 1


def _parametric_cdf(p: float, n: int, z: float) -> float:
    """``P(FPR <= p)`` for the threshold ``mean + z · sd`` of ``n`` normal scores."""
    from scipy.stats import nct, norm

    x, nc = math.sqrt(n) * z, math.sqrt(n) * float(norm.ppf(1.0 - p))
    value = float(nct.cdf(x, n - 1, nc))
    if not math.isfinite(value):  # scipy's series can fail far in a tail: the other side, else the limit
        value = 1.0 - float(nct.sf(x, n - 1, nc))
    if not math.isfinite(value):
        value = 1.0 if nc < x else 0.0
    return value


def fpr_uncertainty(
    n_normals: int, target_fpr: float, method: str = "empirical", confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """The false-positive rate a threshold calibrated on ``n_normals`` held-out normals can promise.

    Args:
        n_normals: the number of calibration normals (at least 1; 2 for the parametric methods).
        target_fpr: the target the threshold was set for, in ``(0, 1)``.
        method: the calibration method (``"empirical"``, ``"lognormal"``, ``"gaussian"``).
        confidence: the probability with which the true FPR stays at or below ``fpr_bound``.

    Returns:
        ``{"fpr_expected", "fpr_bound", "fpr_bound_confidence", "fpr_uncertainty"}``: the expected
        FPR over calibration sets, its ``confidence`` upper bound, the confidence, and how they were
        computed (``"beta_order_statistic"``: exact for continuous scores; ``"normal_tolerance"``:
        exact when the (log) scores are normal; see the module docstring).

    Raises:
        ValueError: ``n_normals < 1``, ``target_fpr`` or ``confidence`` outside ``(0, 1)``, unknown method.

    Example:
        >>> u = fpr_uncertainty(10, 0.05)  # 10 normals, order statistic: the max, Beta(1, 10)
        >>> round(u["fpr_expected"], 4), round(u["fpr_bound"], 3)
        (0.0909, 0.206)
    """
    from scipy.stats import beta, norm, t

    n = int(n_normals)
    target_fpr, confidence = float(target_fpr), float(confidence)
    if n < 1:
        raise ValueError(f"n_normals must be at least 1; got {n}")
    if not 0.0 < target_fpr < 1.0 or not 0.0 < confidence < 1.0:
        raise ValueError(f"target_fpr and confidence must be in (0, 1); got {target_fpr}, {confidence}")
    method = _effective_method(n, method)
    if method == "empirical":
        a, b = _beta_params(n, target_fpr)
        expected, bound, how = a / (n + 1), float(beta.ppf(confidence, a, b)), "beta_order_statistic"
    else:
        from scipy.optimize import brentq

        z = float(norm.ppf(1.0 - target_fpr))
        expected = float(t.sf(z / math.sqrt(1.0 + 1.0 / n), n - 1))
        lo, hi = 1e-12, 1.0 - 1e-12
        bound = float(brentq(lambda p: _parametric_cdf(p, n, z) - confidence, lo, hi, xtol=1e-10))
        how = "normal_tolerance"
    return {
        "fpr_expected": float(expected),
        "fpr_bound": bound,
        "fpr_bound_confidence": confidence,
        "fpr_uncertainty": how,
    }


def normals_needed(
    target_fpr: float,
    method: str = "empirical",
    max_fpr: float | None = None,
    confidence: float = CONFIDENCE,
    limit: int = 1_000_000,
) -> int:
    """The fewest calibration normals whose ``confidence`` bound on the FPR is at most ``max_fpr``
    (default ``BOUND_FACTOR × target_fpr``).

    Raises:
        ValueError: no ``n`` up to ``limit`` reaches ``max_fpr``.

    Example:
        >>> normals_needed(0.05), normals_needed(0.05, "lognormal")
        (22, 32)
    """
    from scipy.stats import beta

    max_fpr = BOUND_FACTOR * float(target_fpr) if max_fpr is None else float(max_fpr)

    def ok(n: int) -> bool:
        return fpr_uncertainty(n, target_fpr, method, confidence)["fpr_bound"] <= max_fpr

    if method != "empirical":
        if ok(MIN_PARAMETRIC_NORMALS):
            # below the parametric minimum the order statistic applies: look there too
            lo = normals_needed(target_fpr, "empirical", max_fpr, confidence, MIN_PARAMETRIC_NORMALS)
            return min(lo, MIN_PARAMETRIC_NORMALS)
        lo, hi = MIN_PARAMETRIC_NORMALS, MIN_PARAMETRIC_NORMALS * 2
        while not ok(hi):  # the bound falls with n: double, then bisect
            lo, hi = hi, hi * 2
            if hi > limit:
                raise ValueError(f"no n up to {limit} brings the bound to {max_fpr:g}")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        return hi
    # the order statistic's bound saw-tooths with floor(target · n): the first n that reaches it, in blocks
    start = 1
    while start <= limit:
        n = np.arange(start, min(start * 4, limit) + 1)
        a = np.maximum(np.floor(float(target_fpr) * n + 1e-9), 1)
        hit = np.nonzero(beta.ppf(confidence, a, n - a + 1) <= max_fpr)[0]
        if hit.size:
            return int(n[hit[0]])
        start = int(n[-1]) + 1
    raise ValueError(f"no n up to {limit} brings the bound to {max_fpr:g}")


def uncertainty_warning(record: Mapping[str, Any]) -> str | None:
    """The training log's warning for a threshold record whose FPR bound is above ``BOUND_FACTOR ×
    target``, saying how many calibration normals would be needed; ``None`` when the bound is within.

    Args:
        record: a threshold record (:func:`threshold_record`) with ``fpr_bound``, ``fpr_expected``,
            ``fpr_bound_confidence``, ``target_fpr``, ``n_normals``, ``method`` and ``n_normals_needed``.
    """
    target, bound = float(record["target_fpr"]), float(record["fpr_bound"])
    if bound <= BOUND_FACTOR * target:
        return None
    n, need = int(record["n_normals"]), int(record["n_normals_needed"])
    return (
        f"the decision threshold was calibrated on {n} normals ({record.get('method')}): with "
        f"{100 * float(record['fpr_bound_confidence']):g} % confidence its false-positive rate is at most "
        f"{100 * bound:.1f} % (expected {100 * float(record['fpr_expected']):.1f} %), more than "
        f"{BOUND_FACTOR:g} x the target {100 * target:g} %; {need} calibration normals ({need - n} more) would "
        f"bring that bound to {100 * BOUND_FACTOR * target:g} % (--val_fraction, more normal images, or "
        "--calibration_folds K)"
    )


def threshold_record(
    scores: Any,
    target_fpr: float = 0.05,
    method: str = "empirical",
    confidence: float = CONFIDENCE,
    **fields: Any,
) -> dict[str, Any]:
    """The image threshold's record from held-out normal scores: what the checkpoint stores under
    ``"threshold"``, ``threshold.json`` and ``metrics.json["calibration"]``.

    Args:
        scores: the calibration normals' scores, shape ``(n,)``.
        target_fpr, method: as for :func:`calibrate_threshold`.
        confidence: of the FPR bound.
        fields: more entries, e.g. ``method="cross_fit", estimator="lognormal"`` (``method`` here only
            renames the record's method: the threshold is computed with the ``method`` argument
            unless ``estimator`` is given, which then is the one used).

    Returns:
        ``{"value", "target_fpr", "n_normals", "scale", "fpr_on_calibration_set", "method",
        "fpr_expected", "fpr_bound", "fpr_bound_confidence", "fpr_uncertainty", "n_normals_needed", ...}``.

    Example:
        >>> r = threshold_record(np.linspace(1.0, 2.0, 40), 0.05)
        >>> round(r["value"], 4), r["n_normals"], round(r["fpr_bound"], 3), r["n_normals_needed"]
        (1.9744, 40, 0.094, 22)
    """
    import warnings

    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    estimator = fields.pop("estimator", method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few normals: the record's bound says it, louder
        value = float(calibrate_threshold(s, target_fpr, method=estimator))
    rec: dict[str, Any] = {
        "value": value,
        "target_fpr": float(target_fpr),
        "n_normals": int(s.size),
        "scale": float(max(s.std(), 1e-6)),
        "fpr_on_calibration_set": float((s >= value).mean()),
        "method": method,
    }
    if estimator != method:
        rec["estimator"] = estimator
    rec.update(fpr_uncertainty(s.size, target_fpr, estimator, confidence))
    rec["n_normals_needed"] = normals_needed(target_fpr, estimator, confidence=confidence)
    rec.update(fields)
    return rec
