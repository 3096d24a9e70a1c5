"""Batch resampling: class probabilities of METHOD.md and the per-row repeat scheme."""

import numpy as np
import pytest

from raydiff.data.resample import brs_class_probs, class_ranks, repeat_rates, resample_rows

CIFAR10_LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_ranks_follow_counts_not_indices():
    assert class_ranks([5, 50, 20]).tolist() == [2, 0, 1]


def test_factor_sets_the_ratio_between_head_and_tail():
    p = brs_class_probs(CIFAR10_LT, 0.1)
    assert p[0] / p[-1] == pytest.approx(10.0)
    assert p.sum() == pytest.approx(1.0)
    assert brs_class_probs(CIFAR10_LT, 1.0) == pytest.approx(np.full(10, 0.1))
    with pytest.raises(ValueError):
        brs_class_probs(CIFAR10_LT, 0.0)


def test_repeated_rows_reach_the_target_class_shares():
    labels = np.repeat(np.arange(10), CIFAR10_LT)
    batch = {"label": labels, "image": labels * 2}
    out = resample_rows(batch, repeat_rates(CIFAR10_LT, 0.1), np.random.default_rng(0))
    assert (out["image"] == out["label"] * 2).all()  # columns stay aligned
    shares = np.bincount(out["label"], minlength=10) / len(out["label"])
    assert shares == pytest.approx(brs_class_probs(CIFAR10_LT, 0.1), rel=0.1)
    assert len(out["label"]) == pytest.approx(len(labels), rel=0.03)
