"""Image-level metrics and the normalised score: hand-computed cases and slow reference implementations."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
from conftest import assert_plain_json
from scipy.special import expit

from monai_skipts.metrics import image_metrics, metrics_at_threshold, normalize_score

# slow references


def pairwise_auroc(scores, labels):
    """P(score of a random anomalous > score of a random normal), ties counted 1/2."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_force_youden(scores, labels):
    """Highest observed threshold maximising TPR - FPR, by trying every observed score."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    n_pos, n_neg = int(np.sum(labels == 1)), int(np.sum(labels == 0))
    best_j, best_t = None, None
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        j = Fraction(int(np.sum(pred[labels == 1])), n_pos) - Fraction(int(np.sum(pred[labels == 0])), n_neg)
        if best_j is None or j > best_j:
            best_j, best_t = j, t
    return best_t


def test_image_metrics_hand_example_with_youden_tie():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    m = image_metrics(scores, labels)
    # pairs (anomalous, normal): (.35,.1) win, (.35,.4) loss, (.8,.1) win, (.8,.4) win -> 3/4
    assert pairwise_auroc(scores, labels) == 0.75
    assert m["auroc"] == pytest.approx(0.75)
    # ranked: .8 (anomalous; P=1, R=1/2), .4 (normal), .35 (anomalous; P=2/3, R=1)
    assert m["aupr"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # J: t=.8 -> 1/2 - 0; t=.4 -> 1/2 - 1/2; t=.35 -> 1 - 1/2; t=.1 -> 0. Tie -> the higher, .8
    assert m["threshold"] == 0.8
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (2, 0, 1, 1)
    assert m["sensitivity"] == 0.5 and m["specificity"] == 1.0 and m["precision"] == 1.0
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == 0.75
    assert (m["n_normal"], m["n_abnormal"]) == (2, 2)
    assert_plain_json(m)


def test_image_metrics_hand_example_unique_youden():
    scores = [0.1, 0.2, 0.3, 0.6, 0.5, 0.9]
    labels = [0, 0, 0, 0, 1, 1]
    m = image_metrics(scores, labels)
    assert m["auroc"] == pytest.approx(7 / 8) == pairwise_auroc(scores, labels)
    # J: .9 -> .5, .6 -> .5 - .25, .5 -> 1 - .25 = .75 (max), .3 -> .5, ...
    assert m["threshold"] == 0.5 == brute_force_youden(scores, labels)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (3, 1, 0, 2)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.75
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.8) and m["accuracy"] == pytest.approx(5 / 6)


def test_image_metrics_random_against_references():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(4, 40))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = np.round(rng.random(n) + 0.3 * labels, 1)  # many ties
        m = image_metrics(scores, labels)
        assert m["auroc"] == pytest.approx(pairwise_auroc(scores.tolist(), labels.tolist()))
        assert m["threshold"] == brute_force_youden(scores, labels)
        assert m["f1"] == pytest.approx(f1_score(labels, scores >= m["threshold"]))
        same = metrics_at_threshold(scores, labels, m["threshold"])
        assert same == {k: v for k, v in m.items() if k not in ("auroc", "aupr")}


def test_image_metrics_perfect_separation():
    m = image_metrics([0.1, 0.2, 0.3, 0.7, 0.9], [0, 0, 0, 1, 1])
    assert m["auroc"] == 1.0 and m["aupr"] == 1.0 and m["f1"] == 1.0 and m["accuracy"] == 1.0
    assert m["threshold"] == 0.7
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (3, 0, 0, 2)


def test_image_metrics_inverted_scores_no_nan():
    m = image_metrics([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1])
    assert m["auroc"] == 0.0
    assert all(np.isfinite(v) for v in m.values())


def test_image_metrics_accepts_bool_and_torch():
    torch = pytest.importorskip("torch")
    ref = image_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert image_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == ref
    got = image_metrics(torch.tensor([0.1, 0.4, 0.35, 0.8], dtype=torch.float64), torch.tensor([0, 0, 1, 1]))
    assert got == ref


@pytest.mark.parametrize("fn", [image_metrics, lambda s, y: metrics_at_threshold(s, y, 0.5)])
def test_one_class_is_an_error(fn):
    both = r"needs both normal \(label 0\) and anomalous \(label 1\) images; got only normal"
    with pytest.raises(ValueError, match=both):
        fn([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match=r"got only anomalous images \(2 with label 1"):
        fn([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="no images"):
        fn([], [])


def test_bad_image_inputs():
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\)"):
        image_metrics([0.1, np.nan, 0.3, np.inf], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="differ in length: 3 scores, 4 labels"):
        image_metrics([0.1, 0.2, 0.3], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="1-D"):
        image_metrics([[0.1, 0.2], [0.3, 0.4]], [[0, 0], [1, 1]])
    with pytest.raises(ValueError, match="only 0 and 1"):
        image_metrics([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        metrics_at_threshold([0.1, 0.2], [0, 1], float("nan"))


def test_metrics_at_threshold_hand_example():
    scores, labels = [0.1, 0.4, 0.35, 0.8, 0.5], [0, 0, 1, 1, 0]
    m = metrics_at_threshold(scores, labels, 0.4)  # score == threshold counts as anomalous
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (1, 2, 1, 1)
    assert m["sensitivity"] == 0.5 and m["specificity"] == pytest.approx(1 / 3)
    assert m["precision"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(0.4)
    assert m["accuracy"] == pytest.approx(0.4) and m["threshold"] == 0.4
    assert_plain_json(m)
    none_flagged = metrics_at_threshold(scores, labels, 10.0)
    assert none_flagged["precision"] == 0.0 and none_flagged["f1"] == 0.0 and none_flagged["tp"] == 0


# ----------------------------------------------------------------------------------------------
# calibration and normalisation
# ----------------------------------------------------------------------------------------------


def test_normalize_score():
    assert normalize_score(2.0, threshold=2.0, scale=0.5) == 0.5
    assert normalize_score(2.5, 2.0, 0.5) == pytest.approx(expit(1.0))
    assert isinstance(normalize_score(2.5, 2.0, 0.5), float)
    x = np.linspace(-10.0, 14.0, 2001)
    y = normalize_score(x, 2.0, 1.5)
    assert y.shape == x.shape
    assert np.all(np.diff(y) >= 0)
    core = np.abs(x - 2.0) < 20
    assert np.all(np.diff(y[core]) > 0)
    assert np.all((y >= 0.5) == (x >= 2.0))
    # the decision survives rounding right next to the threshold
    below, above = np.nextafter(2.0, 0.0), np.nextafter(2.0, 4.0)
    assert normalize_score(below, 2.0, 1e3) < 0.5 <= normalize_score(above, 2.0, 1e3)
    maps = np.random.default_rng(3).random((2, 4, 4))
    assert normalize_score(maps, 0.5, 0.1).shape == (2, 4, 4)


def test_normalize_score_bad_input():
    with pytest.raises(ValueError, match="scale"):
        normalize_score(1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="threshold"):
        normalize_score(1.0, float("inf"), 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        normalize_score([1.0, np.nan], 0.0, 1.0)
