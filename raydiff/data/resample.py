"""Epoch orders and batch resampling (BRS): flatten the class distribution the trainer sees.

Classes ranked by training count (rank 0 = largest) are drawn with probability
p_c proportional to f^(rank_c / (C - 1)) (docs/METHOD.md, "Batch resampling"): f = 1 is fully
balanced, f = 0.1 turns a 100:1 imbalance into 10:1.

The released sampler maps each position of a shuffled epoch to a class (floor(N p_c)
positions per class) and then draws a uniformly random image of that class: an epoch is a
uniformly random sequence with those class counts, each image drawn with replacement. Ray Data
has no weighted sampler, so raydiff builds the same thing from two pipeline stages: each row of
class c is repeated Poisson(rate_c) times with rate_c = N p_c / n_c (``resample_rows``; the
expected epoch length stays N, class c gets the expected share p_c, and the number of copies of
one image has the released mean and nearly its second moment), and then the whole epoch is shuffled
globally (``Dataset.random_shuffle``), so the copies of an image are spread over the epoch as
the released independent draws are. Without that shuffle the copies of a row stay next to each
other and land in the same batch. The two rules differ only in that an epoch's class counts
vary (Poisson) around the released fixed counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def class_ranks(counts: Sequence[int]) -> np.ndarray:
    """Rank of each class by training count, 0 = most images (ties keep class order)."""
    order = np.argsort(-np.asarray(counts), kind="stable")
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


def brs_class_probs(counts: Sequence[int], factor: float) -> np.ndarray:
    """p_c proportional to factor^(rank_c / (C - 1)); a single class gets probability 1."""
    if not 0 < factor <= 1:
        raise ValueError(f"resample factor must be in (0, 1], got {factor}")
    num_classes = len(counts)
    exponent = class_ranks(counts) / max(num_classes - 1, 1)
    p = factor ** exponent.astype(np.float64)
    p[np.asarray(counts) == 0] = 0.0  # a class with no images cannot be drawn
    return p / p.sum()


def repeat_rates(counts: Sequence[int], factor: float) -> np.ndarray:
    """Expected repeats per row and epoch, per class: N p_c / n_c (0 for empty classes)."""
    counts = np.asarray(counts, dtype=np.float64)
    p = brs_class_probs(counts, factor)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counts > 0, counts.sum() * p / counts, 0.0)


def resample_rows(batch: dict, rates: np.ndarray, rng: np.random.Generator) -> dict:
    """Repeat each row Poisson(rates[label]) times (zero drops it); all columns alike."""
    repeats = rng.poisson(rates[np.asarray(batch["label"])])
    return {name: np.repeat(np.asarray(column), repeats, axis=0) for name, column in batch.items()}


class Resample:
    """Ray Data batch function: BRS repeat counts, fresh randomness every epoch."""

    def __init__(self, rates: np.ndarray):
        self.rates = rates

    def __call__(self, batch: dict) -> dict:
        return resample_rows(batch, self.rates, np.random.default_rng())


# --- epochs of a split held in memory -----------------------------------------------------

def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped, a fresh one every epoch)."""
    return num_images // batch_size


def brs_position_counts(counts: Sequence[int], factor: float) -> np.ndarray:
    """Positions of an epoch of sum(counts) rows that the released ``brs()`` gives each class:
    floor(N p_c), and the positions the floors leave over to the class ranked last (the
    released loop hands them to its last class index, the smallest class)."""
    counts = np.asarray(counts)
    n = int(counts.sum())
    positions = np.floor(n * brs_class_probs(counts, factor)).astype(np.int64)
    positions[np.argmax(class_ranks(counts))] += n - int(positions.sum())
    return positions


def brs_epoch_order(labels: np.ndarray, num_classes: int, seed: int, epoch: int,
                    factor: float) -> np.ndarray:
    """The row indices of one BRS epoch, drawn from (seed, epoch) alone, as the released
    sampler draws them: a shuffled epoch of positions, ``brs_position_counts`` of them per
    class, each position filled with a uniformly random image of its class (drawn with
    replacement)."""
    rng = np.random.default_rng([seed, epoch])
    n = len(labels)
    counts = np.bincount(labels, minlength=num_classes)
    by_class = np.argsort(labels, kind="stable")  # the rows of class c: a contiguous run
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cls = rng.permutation(np.repeat(np.arange(num_classes), brs_position_counts(counts, factor)))
    return by_class[first[cls] + (rng.random(n) * counts[cls]).astype(np.int64)]


def epoch_batches(num_images: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world: int = 1, labels: np.ndarray | None = None, num_classes: int = 0,
                  factor: float = 0.0) -> np.ndarray:
    """Indices of one worker's images for every step of an epoch, (steps, batch_size / world).

    One order per (seed, epoch) (a permutation, or with BRS ``brs_epoch_order``, which needs
    the ``labels``), cut into global
    batches; worker ``rank`` takes every ``world``-th image of each, so workers hold disjoint
    shards and take the same number of steps, and a resumed run sees the same order as an
    uninterrupted one.
    """
    steps = steps_per_epoch(num_images, batch_size)
    if factor > 0:
        order = brs_epoch_order(np.asarray(labels), num_classes, seed, epoch, factor)
    else:
        order = np.random.default_rng([seed, epoch]).permutation(num_images)
    return order[:steps * batch_size].reshape(steps, batch_size)[:, rank::world]
