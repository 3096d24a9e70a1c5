"""Copy rate and intra-class diversity on constructed feature sets.

Three classes of Gaussian features; a long-tailed training split (40, 12, 3 rows) and a
balanced reference split drawn from the same distributions. A generator that returns its
training rows (with a little noise) must score a high copy rate and a low diversity; one that
draws fresh rows from the data distribution must score like the reference itself.
"""

import numpy as np
import pytest

from raydiff.metrics import (
    COPY_RATIO,
    class_diversity,
    copy_and_diversity,
    copy_ratios,
    mean_pairwise_distance,
    nearest_distance,
)

DIM, CLASSES = 16, 3
TRAIN_COUNTS, REF_PER_CLASS, GEN_PER_CLASS = (40, 12, 3), 200, 30


def draw(rng, counts):
    centres = np.random.default_rng(0).normal(size=(CLASSES, DIM)) * 4
    labels = np.repeat(np.arange(CLASSES), counts)
    return centres[labels] + rng.normal(size=(len(labels), DIM)), labels


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(1)
    train, train_y = draw(rng, TRAIN_COUNTS)
    ref, ref_y = draw(rng, [REF_PER_CLASS] * CLASSES)
    fresh, fresh_y = draw(rng, [GEN_PER_CLASS] * CLASSES)
    picks = np.concatenate([rng.choice(np.flatnonzero(train_y == c), GEN_PER_CLASS)
                            for c in range(CLASSES)])
    copies = train[picks] + rng.normal(size=(len(picks), DIM)) * 0.01
    return dict(train=(train, train_y), ref=(ref, ref_y), fresh=(fresh, fresh_y),
                copies=(copies, train_y[picks]))


def test_nearest_and_pairwise_distances_by_hand():
    keys = np.array([[0.0, 0.0], [3.0, 4.0]])
    assert nearest_distance(np.array([[3.0, 0.0], [3.0, 5.0]]), keys).tolist() == [3.0, 1.0]
    # pairs of (0,0), (3,4), (6,8): 5, 10, 5
    assert mean_pairwise_distance(np.array([[0, 0], [3, 4], [6, 8]])) == pytest.approx(20 / 3)
    assert np.isnan(mean_pairwise_distance(np.zeros((1, 2))))


def test_copying_generator_is_caught_in_every_class(splits):
    out = copy_and_diversity(*splits["copies"], *splits["train"], *splits["ref"], range(CLASSES))
    assert out["copy_rate"] == 1.0
    # The tail class has 3 training images: about a third of the pairs of its 30 copies are
    # copies of the same image (distance ~0), so its spread falls to about 2/3 of the
    # reference's; the head's 30 copies of 40 images lose little.
    per_class = class_diversity(*splits["copies"], *splits["ref"], range(CLASSES))
    assert per_class[2] < 0.85 and per_class[2] < per_class[0] - 0.1
    fresh = copy_and_diversity(*splits["fresh"], *splits["train"], *splits["ref"], range(CLASSES))
    assert out["diversity"] < fresh["diversity"] - 0.05


def test_fresh_generator_scores_like_the_reference(splits):
    out = copy_and_diversity(*splits["fresh"], *splits["train"], *splits["ref"], range(CLASSES))
    assert out["copy_rate"] <= 0.05
    assert out["diversity"] == pytest.approx(1.0, abs=0.15)
    ratios = copy_ratios(*splits["fresh"], *splits["train"], *splits["ref"])
    # the reference (200 rows a class) is at least as close as the training split
    assert np.median(ratios) > 1.0 > COPY_RATIO


def test_classes_without_rows_give_nan_not_a_number_of_zero(splits):
    gen, gen_y = splits["fresh"]
    train, train_y = splits["train"]
    no_tail_train = train_y != 2
    ratios = copy_ratios(gen, gen_y, train[no_tail_train], train_y[no_tail_train],
                         *splits["ref"])
    assert np.isnan(ratios[gen_y == 2]).all() and not np.isnan(ratios[gen_y != 2]).any()
    out = copy_and_diversity(gen, gen_y, train[no_tail_train], train_y[no_tail_train],
                             *splits["ref"], [2])
    assert np.isnan(out["copy_rate"])
