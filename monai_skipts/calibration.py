"""How far a calibrated threshold can be trusted, and the thresholds a deployment decides with.

One place for the calibration logic around :func:`calibrate_threshold`:

=========================================  ===============================================================
uncertainty of an image threshold           :func:`fpr_uncertainty`, :func:`normals_needed`,
                                            :func:`uncertainty_warning`
the threshold record (checkpoint, JSON)     :func:`threshold_record`
more calibration normals, none lost         :class:`CrossFitScorer` (cross-fitted, out-of-fold scores)
volume threshold                            :func:`sidak_slice_fpr`, :func:`volume_threshold`
pixel threshold (outlines, ``dice``)        :class:`PixelScoreSketch`, :func:`pixel_threshold`,
                                            :class:`PixelThresholdHandler`
=========================================  ===============================================================

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

import copy
import csv
import io
import logging
import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset

from monai_skipts.bundle.data import seeded_generator
from monai_skipts.bundle.prepare_batch import training_prepare_batch
from monai_skipts.engines import LevelStatsFitter, SkipTSEvaluator, SkipTSTrainer, build_optimizer
from monai_skipts.metrics import as_float_array, to_numpy
from monai_skipts.transforms.volume import aggregate_volume_scores
from monai_skipts.utils import atomic_write_text

__all__ = [
    "CalibrationWarning",
    "CALIBRATION_METHODS",
    "MIN_PARAMETRIC_NORMALS",
    "calibrate_threshold",
    "check_calibration_data",
    "min_calibration_normals",
    "CONFIDENCE",
    "DEFAULT_PIXEL_FPR",
    "CrossFitScorer",
    "PixelScoreSketch",
    "PixelThresholdHandler",
    "fpr_uncertainty",
    "normals_needed",
    "pixel_threshold",
    "sidak_slice_fpr",
    "threshold_record",
    "uncertainty_warning",
    "volume_threshold",
]

logger = logging.getLogger(__name__)

#: the confidence of the FPR bound stored with every threshold
CONFIDENCE = 0.9
#: the default share of normal pixels inside the anatomy allowed at or above the pixel threshold
DEFAULT_PIXEL_FPR = 0.005
#: the bound is acceptable when at most this many times the target (else the training log warns)
BOUND_FACTOR = 2.0


class CalibrationWarning(UserWarning):
    """Too few normal scores to resolve the requested false positive rate."""


# --------------------------------------------------------------------------------------------
# the decision threshold from held-out normals
# --------------------------------------------------------------------------------------------


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
        raise ValueError(
            f"{where}{n_normals} validation normals cannot calibrate target_fpr={target_fpr:g} with the "
            f"{method!r} calibration (needs at least {need}); give the validation split more normals "
            f"(--val_fraction, or more normal images), raise --target_fpr, or use --calibration lognormal "
            f"(needs {MIN_PARAMETRIC_NORMALS})"
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


# ------------------------------------------------------------------------------------ uncertainty


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


# ----------------------------------------------------------------------------------- cross-fitting


class CrossFitScorer:
    """Cross-fitted calibration scores: K students trained on K folds of the training normals, each
    fold's held-out normals scored by the student that did not see them; the pooled out-of-fold
    scores calibrate the threshold of the final model, trained on all normals (the cross-validation
    form of conformal calibration, CV+ / Jackknife+: Barber et al. 2021). No normal is lost to
    calibration and ``n`` is the training set's size.

    The fold detectors are copies of ``network`` as it is when the scorer is constructed (call it
    before the final training; the bundle's ``run`` does); each one's model is trained like the final
    one (same loss, optimizer settings, epochs, batch size, per-level statistics) on the other folds,
    and the detector (same sigma, similarity and map head) scores the held-out fold.

    Args:
        folds: K (at least 2); 0 or 1: off (``__call__`` returns ``None``).
        network: the untrained :class:`~monai_skipts.networks.AnomalyDetector` (its ``model`` is trained).
        data: the training datalist (normals).
        transform: the training preprocessing.
        loss_function: the training loss.
        epochs, batch_size, lr, betas, amp, device: as for the final training.
        level_stats: fit the per-level map statistics on each fold's training part.
        cache_teacher: cache teacher features (:class:`~monai_skipts.engines.TeacherFeatureCache`).
        seed: fold assignment and data order.
        output_dir: ``cross_fit_scores.csv`` (``id, fold, score``) is written there and reused by a
            resumed run with the same folds and ids.

    ``scorer()`` returns the pooled scores (``float64``, one per training normal) and sets ``records``
    (``[{"id", "fold", "score"}]``); a second call returns them again without training.

    Example:
        >>> scorer = CrossFitScorer(0, network=None, data=[], transform=None, loss_function=None)
        >>> scorer() is None
        True
    """

    def __init__(
        self,
        folds: int,
        network: torch.nn.Module | None,
        data: Sequence[Mapping[str, Any]],
        transform: Callable | None,
        loss_function: Callable | None,
        epochs: int = 1,
        batch_size: int = 16,
        lr: float = 0.005,
        betas: Sequence[float] = (0.5, 0.999),
        amp: bool = True,
        device: str | torch.device = "cpu",
        level_stats: bool = True,
        cache_teacher: bool = True,
        seed: int = 0,
        output_dir: str | Path | None = None,
        num_workers: int = 0,
    ):
        self.folds = int(folds or 0)
        self.data, self.transform, self.loss_function = list(data), transform, loss_function
        self.epochs, self.batch_size, self.lr, self.betas = int(epochs), int(batch_size), float(lr), tuple(betas)
        self.amp, self.device, self.level_stats, self.cache_teacher = amp, device, level_stats, cache_teacher
        self.seed, self.num_workers = int(seed), int(num_workers)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.records: list[dict[str, Any]] = []
        self.network = None
        if self.folds >= 2 and torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError("calibration_folds is not supported in multi-GPU training; train in one process")
        if self.folds >= 2:
            if len(self.data) < self.folds:
                raise ValueError(f"calibration_folds={self.folds} needs at least {self.folds} training normals")
            self.network = copy.deepcopy(network).cpu()  # the untrained starting point of every fold

    @property
    def enabled(self) -> bool:
        return self.folds >= 2

    def fold_of(self) -> list[int]:
        """The fold of every training item (seeded permutation, sizes differing by at most one)."""
        perm = np.random.default_rng(self.seed).permutation(len(self.data))
        fold = np.empty(len(self.data), dtype=int)
        fold[perm] = np.arange(len(self.data)) % self.folds
        return fold.tolist()

    def _cached(self, ids: list[str], fold: list[int]) -> list[dict[str, Any]] | None:
        path = self.output_dir / "cross_fit_scores.csv" if self.output_dir is not None else None
        if path is None or not path.is_file():
            return None
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if [r["id"] for r in rows] != ids or [int(r["fold"]) for r in rows] != fold:
            return None
        logger.info("cross-fitted calibration scores reused from %s", path)
        return [{"id": r["id"], "fold": int(r["fold"]), "score": float(r["score"])} for r in rows]

    def _train_and_score(self, train: list, held_out: list, k: int) -> list[float]:
        detector = copy.deepcopy(self.network)
        net = detector.model
        loader = DataLoader(
            Dataset(train, self.transform),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=seeded_generator(self.seed + 1000 * (k + 1)),
        )
        prepare = training_prepare_batch(net, self.transform, self.cache_teacher)
        trainer = SkipTSTrainer(
            device=self.device,
            max_epochs=self.epochs,
            train_data_loader=loader,
            network=net,
            optimizer=build_optimizer(net, self.lr, self.betas),
            loss_function=self.loss_function,
            amp=self.amp,
            prepare_batch=prepare,
        )
        trainer.run()
        LevelStatsFitter(detector, loader, prepare_batch=prepare, enabled=self.level_stats)()
        scores: list[float] = []

        def collect(engine: Engine) -> None:
            scores.extend(engine.state.output["score"].detach().float().cpu().view(-1).tolist())

        ev = SkipTSEvaluator(
            device=self.device,
            val_data_loader=DataLoader(Dataset(held_out, self.transform), batch_size=self.batch_size),
            network=detector,
            amp=self.amp,
        )
        ev.add_event_handler(Events.ITERATION_COMPLETED, collect)
        ev.run()
        return scores

    def __call__(self) -> np.ndarray | None:
        if not self.enabled:
            return None
        if self.records:  # already run (the bundle runs it before training; the calibrator asks again)
            return np.array([r["score"] for r in self.records], dtype=np.float64)
        ids = [str(d.get("id", d.get("image"))) for d in self.data]
        fold = self.fold_of()
        records = self._cached(ids, fold)
        if records is None:
            by_id: dict[int, float] = {}
            for k in range(self.folds):
                train = [d for d, f in zip(self.data, fold) if f != k]
                idx = [i for i, f in enumerate(fold) if f == k]
                logger.info(
                    "cross-fitted calibration: fold %d of %d (%d training, %d held-out normals)",
                    k + 1,
                    self.folds,
                    len(train),
                    len(idx),
                )
                for i, s in zip(idx, self._train_and_score(train, [self.data[i] for i in idx], k)):
                    by_id[i] = float(s)
            records = [{"id": ids[i], "fold": fold[i], "score": by_id[i]} for i in range(len(ids))]
            if self.output_dir is not None:
                buf = io.StringIO()
                csv.writer(buf).writerows(
                    [("id", "fold", "score")] + [(r["id"], r["fold"], repr(r["score"])) for r in records]
                )
                atomic_write_text(self.output_dir / "cross_fit_scores.csv", buf.getvalue())
        self.records = records
        return np.array([r["score"] for r in records], dtype=np.float64)


# -------------------------------------------------------------------------------------- volumes


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


# --------------------------------------------------------------------------------------- pixels


class PixelScoreSketch:
    """A bounded sample of normal anomaly-map pixels (inside the anatomy when a mask is given), for
    the pixel threshold's quantile: every pixel is kept with the same probability ``rate``, so each
    image contributes in proportion to its (in-anatomy) pixels and the memory is ``rate`` × the
    pixels seen, never the full-resolution maps; at most ``max_samples`` are kept (a uniform
    subsample, seeded, when more arrive).

    Args:
        rate: share of pixels kept (``1.0``: all).
        max_samples: the most values held.
        seed: the sampling generator's seed.

    Example:
        >>> sk = PixelScoreSketch(rate=1.0)
        >>> sk.update(np.arange(1000.0).reshape(1, 10, 100))
        >>> sk.quantile_threshold(0.01), sk.n_images
        (990.0, 1)
    """

    def __init__(self, rate: float = 1 / 16, max_samples: int = 2_000_000, seed: int = 0):
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1]; got {rate}")
        self.rate, self.max_samples = float(rate), int(max_samples)
        self.rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        self._parts: list[np.ndarray] = []
        self.n_kept = self.n_seen = self.n_images = 0

    def update(self, maps: Any, masks: Any = None) -> None:
        """Add maps ``(B, H, W)`` or ``(B, 1, H, W)`` (tensor or array) with optional anatomy masks
        (same shape; pixels where the mask is false are ignored)."""
        m = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float32)
        m = m.reshape(m.shape[0], -1) if m.ndim > 1 else m.reshape(1, -1)
        if masks is not None:
            k = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
            k = k.reshape(m.shape) > 0.5 if k.size == m.size else None
            if k is None:
                raise ValueError(f"anatomy masks of shape {np.shape(masks)} do not match maps of {np.shape(maps)}")
        for i in range(m.shape[0]):
            v = m[i] if masks is None else m[i][k[i]]
            v = v[np.isfinite(v)]
            self.n_seen += v.size
            self.n_images += 1
            if self.rate < 1.0:
                v = v[self.rng.random(v.size) < self.rate]
            self._parts.append(v.astype(np.float32))
            self.n_kept += v.size
        if self.n_kept > self.max_samples:
            allv = np.concatenate(self._parts)
            self._parts = [self.rng.choice(allv, self.max_samples, replace=False)]
            self.n_kept = self.max_samples

    def values(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)

    def quantile_threshold(self, target_fpr: float) -> float:
        """The smallest sampled value with at most ``target_fpr`` of the sample at or above it (the
        order-statistic rule of :func:`calibrate_threshold`)."""
        v = self.values()
        if v.size == 0:
            raise ValueError("the pixel threshold needs normal maps; none were seen")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(calibrate_threshold(v.astype(np.float64), target_fpr, method="empirical"))


def pixel_threshold(sketch: PixelScoreSketch, target_fpr: float = DEFAULT_PIXEL_FPR) -> dict[str, Any]:
    """The pixel threshold's record from a :class:`PixelScoreSketch` of validation normals' maps:
    ``{"value", "target_fpr", "n_images", "n_pixels", "n_pixels_sampled", "method"}``; outlines (the
    SEG, the SC outline, MONAI Label's mask, the panels) and ``dice`` use ``map >= value``.

    Example:
        >>> sk = PixelScoreSketch(rate=1.0); sk.update(np.linspace(0, 1, 2000).reshape(2, 1000))
        >>> r = pixel_threshold(sk, 0.005); round(r["value"], 4), r["n_images"]
        (0.9955, 2)
    """
    value = sketch.quantile_threshold(target_fpr)
    return {
        "value": value,
        "target_fpr": float(target_fpr),
        "n_images": int(sketch.n_images),
        "n_pixels": int(sketch.n_seen),
        "n_pixels_sampled": int(sketch.n_kept),
        "method": "pixel_quantile",
    }


class PixelThresholdHandler:
    """An evaluator handler feeding the maps of every iteration (``output["pred"]``) into a
    :class:`PixelScoreSketch`, restarted each run; the anatomy mask is the batch's ``anatomy_key``
    entry when present. Attach it to the validation evaluator next to the score handler; the
    :class:`~monai_skipts.handlers.ThresholdCalibrator` reads ``record(target_fpr)``.

    Args:
        rate, max_samples, seed: of the sketch.
        anatomy_key: the batch key of the anatomy mask (absent: every pixel counts).
    """

    def __init__(self, rate: float = 1 / 16, max_samples: int = 2_000_000, seed: int = 0, anatomy_key: str = "anatomy"):
        self.sketch = PixelScoreSketch(rate, max_samples, seed)
        self.anatomy_key = anatomy_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.sketch.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        mask = batch.get(self.anatomy_key) if isinstance(batch, dict) else None
        mask = engine.state.output.get(self.anatomy_key, mask)  # the detector's own (SkipTSEvaluator's output)
        self.sketch.update(engine.state.output["pred"], mask if isinstance(mask, torch.Tensor) else None)

    def record(self, target_fpr: float = DEFAULT_PIXEL_FPR) -> dict[str, Any] | None:
        """The pixel threshold record, ``None`` when no map was seen."""
        return pixel_threshold(self.sketch, target_fpr) if self.sketch.n_kept else None
