"""The exponential profile and the selection rule, against the released code's numbers."""

from __future__ import annotations

import numpy as np
import pytest

from raydiff.data.longtail import (
    SplitPlan,
    cut_long_tail,
    exponential_counts,
    select_long_tail,
)
from raydiff.errors import RaydiffError

# Published per-class counts of CIFAR-10-LT at imbalance 100 (LDAM-DRW, CBDM, CCUA).
CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_cifar10_lt_counts_are_the_published_ones():
    counts = exponential_counts(5000, 10, 100)
    assert counts == CIFAR10_LT_100
    assert sum(counts) == 12406


@pytest.mark.parametrize(
    "n_max, num_classes, total",
    [(500, 100, 10847), (500, 200, 21549)],  # CIFAR-100-LT and TinyImageNet-LT at IR 100
)
def test_published_totals(n_max, num_classes, total):
    counts = exponential_counts(n_max, num_classes, 100)
    assert sum(counts) == total
    assert counts[0] == n_max and counts[-1] == n_max // 100


@pytest.mark.parametrize("seed", [0, 7])
def test_selection_equals_the_released_rule(seed, released_selection):
    targets = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 300))
    counts = exponential_counts(300, 10, 50)
    ours = select_long_tail(targets, counts, seed)
    assert np.array_equal(ours, released_selection(targets, counts, seed))
    assert np.bincount(targets[ours]).tolist() == counts


def test_a_class_with_too_few_images_keeps_all_it_has():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 6)
    kept = select_long_tail(labels, [8, 5, 3], seed=0)
    assert np.bincount(labels[kept]).tolist() == [8, 2, 3]


@pytest.mark.parametrize("ratio", [0.5, float("nan")])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(RaydiffError, match="imbalance-ratio"):
        exponential_counts(100, 10, ratio)


def test_a_ratio_that_empties_the_tail_is_refused():
    images = np.zeros((12, 2, 2, 3), np.uint8)
    plan = SplitPlan(labels=np.arange(3).repeat(4), sources=["x"] * 12, images=images)
    with pytest.raises(RaydiffError, match="leaves class 2 empty"):
        cut_long_tail(plan, 3, imbalance_ratio=10, n_max=4, seed=0)


def test_split_plan_take_and_chunks_keep_rows_together():
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    plan = SplitPlan(labels=np.array([0, 1, 0, 1, 2]), sources=list("abcde"), images=images)
    taken = plan.take(np.array([4, 0]))
    assert taken.sources == ["e", "a"] and taken.labels.tolist() == [2, 0]
    assert np.array_equal(taken.images, images[[4, 0]])
    chunks = list(plan.chunks(2))
    assert [c.sources for c in chunks] == [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(ValueError):
        SplitPlan(labels=np.zeros(2), sources=["a"], images=images[:2])
