import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ovlib.eval.metrics import (
    confusion_matrix,
    iou_acc_from_confusion,
    macc_from_counts,
    mean_class_accuracy,
    miou_from_confusion,
    miou_statistic,
    per_class_counts,
    topk_hits,
)
from ovlib.stats import bootstrap_ci


def test_topk_hits_hand_case():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.1, 0.2]])
    labels = torch.tensor([1, 2, 0])
    h = topk_hits(logits, labels, ks=(1, 2, 5))
    assert h[1].tolist() == [True, False, False]
    assert h[2].tolist() == [True, True, False]
    assert h[5].tolist() == [True, True, True]  # k clipped to C


def test_topk_hits_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        topk_hits(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_macc_with_missing_class():
    # class 0: 2 of 3 right; class 1 absent (must not count as 0); class 2: 1 of 1 right
    hits = np.array([1, 1, 0, 1], bool)
    labels = np.array([0, 0, 0, 2])
    assert mean_class_accuracy(hits, labels, num_classes=3) == pytest.approx(100 * (2 / 3 + 1) / 2)
    # micro (per-sample) accuracy would be 75 %; macc is 83.3 %
    h, t = per_class_counts(hits, labels, 3)
    assert h.tolist() == [2, 0, 1] and t.tolist() == [3, 0, 1]
    assert math.isnan(macc_from_counts(np.zeros(3), np.zeros(3)))


def test_confusion_and_miou_with_empty_class():
    gt = np.array([[0, 0, 1], [1, -1, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 2]])
    conf = confusion_matrix(pred, gt, num_classes=4, ignore_index=-1)
    assert conf.sum() == 5
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    iou, acc = iou_acc_from_confusion(conf)
    # class 0: tp 1, union 2; class 1: tp 2, union 3; class 2: tp 1, union 1; class 3: absent -> nan
    np.testing.assert_allclose(iou[:3], [50.0, 200 / 3, 100.0])
    assert math.isnan(iou[3]) and math.isnan(acc[3])
    np.testing.assert_allclose(acc[:3], [50.0, 100.0, 100.0])
    m, a = miou_from_confusion(conf)
    assert m == pytest.approx((50 + 200 / 3 + 100) / 3)
    assert a == pytest.approx(250 / 3)


def test_predicted_only_class_counts_with_zero_iou():
    conf = confusion_matrix(np.array([1, 1]), np.array([0, 0]), 2)
    iou, _ = iou_acc_from_confusion(conf)
    assert iou.tolist() == [0.0, 0.0]


def test_confusion_rejects_out_of_range():
    with pytest.raises(ValueError, match="pred labels"):
        confusion_matrix(np.array([5]), np.array([0]), 2)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=60))
def test_confusion_matches_brute_force(pairs):
    gt = np.array([p[0] for p in pairs])
    pred = np.array([p[1] for p in pairs])
    conf = confusion_matrix(pred, gt, 4)
    brute = np.zeros((4, 4), int)
    for g, p in pairs:
        brute[g, p] += 1
    assert (conf == brute).all()


def test_bootstrap_constant_and_coverage():
    # every image identical -> the interval collapses on the point estimate
    per_image = np.tile(np.array([[3, 0], [4, 1]], float)[None], (20, 1, 1))  # (N, 2, C): hits, totals
    point, lo, hi = bootstrap_ci(per_image, lambda s: macc_from_counts(s[0], s[1]), n_boot=200, seed=0)
    assert point == pytest.approx(37.5) and lo == pytest.approx(37.5) and hi == pytest.approx(37.5)
    # a mean of Bernoulli(0.5) images: the 95 % interval contains the point and has roughly the normal width
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, size=400).astype(float)
    per = np.stack([x, np.ones_like(x)], 1)  # (N, 2)
    point, lo, hi = bootstrap_ci(per, lambda s: s[0] / s[1], n_boot=2000, seed=1)
    half = 1.96 * math.sqrt(point * (1 - point) / 400)
    assert lo < point < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    # same seed -> same numbers
    assert bootstrap_ci(per, lambda s: s[0] / s[1], n_boot=50, seed=3) == \
        bootstrap_ci(per, lambda s: s[0] / s[1], n_boot=50, seed=3)


def test_miou_statistic_over_a_selection():
    conf = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 absent from GT and prediction: nan, excluded
    iou, _ = iou_acc_from_confusion(conf)
    assert miou_statistic()(conf) == pytest.approx(np.nanmean(iou))
    assert miou_statistic(np.array([False, True, True]))(conf) == pytest.approx(iou[1])
    assert math.isnan(miou_statistic(np.array([False, False, True]))(conf))
