"""Batch resampling (BRS): flatten the class distribution the trainer sees.

Classes ranked by training count (rank 0 = largest) are drawn with probability
p_c proportional to f^(rank_c / (C - 1)) (METHOD.md, "Losses" 8): f = 1 is fully balanced,
f = 0.1 turns a 100:1 imbalance into 10:1. Ray Data has no weighted sampler, so the
resampling is done in the pipeline with per-row repeat counts: each epoch, a row of class c
appears Poisson(rate_c) times with rate_c = N p_c / n_c, which keeps the expected epoch
length N and gives class c the expected share p_c.
"""

from __future__ import annotations

from typing import Sequence

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
