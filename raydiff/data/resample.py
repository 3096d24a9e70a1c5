"""Batch resampling (BRS): flatten the class distribution the trainer sees.

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
