"""FID, KID, Inception Score and improved Precision/Recall from Inception features.

No Ray and no network here: the functions take feature rows (``2048``, InceptionV3 pool3) and
logits (``logits_unbiased``) as numpy arrays, however they were extracted. The last step of
each metric is torch-fidelity's own function (``fid_statistics_to_metric``,
``kid_features_to_metric``, ``isc_features_to_metric``, ``prc_features_to_metric``), so a
number computed here from the same features is the number ``torch_fidelity.calculate_metrics``
reports; FID is the exception, computed here in a faster but equivalent way (``fid``), and
checked against torch-fidelity's ``fid_statistics_to_metric`` in the tests. FID is finished
from sufficient statistics (sum and sum of outer products, float64) that are accumulated batch
by batch and merge across workers, so a million images never need one covariance pass. KID
and P/R take whatever rows they are given: ``raydiff evaluate`` gives them a seeded subset
(``raydiff.accumulate``), and streams the Inception Score and the copy rate's distances
there too.

Class groups follow the long-tail literature (docs/METHOD.md, "Evaluation"): classes
ranked by training count and cut into thirds, head / body / tail. Long-tailed recognition also
cuts by absolute training count, many / medium / few shot (``shot_groups``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from raydiff.data.resample import class_ranks

GROUPS = ("head", "body", "tail")
SHOT_GROUPS = ("many", "medium", "few")
# Liu et al. 2019 (OLTR), the thresholds of ImageNet-LT / Places-LT papers since: many-shot
# classes have more than 100 training images, few-shot fewer than 20, medium the rest.
MANY_SHOT_ABOVE = 100
FEW_SHOT_BELOW = 20
METRICS = ("fid", "kid", "isc", "prc")
FEATURE_DIM = 2048

# torch-fidelity's defaults, named so metrics.json can state them.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
ISC_SPLITS = 10
PRC_NEIGHBORHOOD = 3  # k of the k-NN radius (Kynkaanniemi et al. 2019)
RNG_SEED = 2020
# Improved P/R is quadratic in the number of images; above this many per side
# ``precision_recall`` draws a seeded random subset (the ADM evaluator uses 10k-50k).
# ``raydiff evaluate`` hands it its own subset (``--metric-subset``) instead.
PRC_MAX_IMAGES = 10_000
_PRC_BATCH = 10_000


def class_groups(train_counts: Sequence[int]) -> np.ndarray:
    """Group index per class (0 head, 1 body, 2 tail): training-count rank cut into thirds.

    With 10 classes the groups hold 4, 3 and 3 classes (ranks 0-3, 4-6, 7-9).
    """
    ranks = class_ranks(train_counts)
    return ranks * len(GROUPS) // max(len(ranks), 1)


def shot_groups(train_counts: Sequence[int]) -> np.ndarray:
    """Shot group per class (0 many: > 100 training images, 1 medium: 20-100, 2 few: < 20).

    On a small dataset some groups are empty (no class of the built-in shapes dataset at its
    default size is few-shot); ``class_groups`` gives the thirds, which always exist.
    """
    counts = np.asarray(train_counts)
    return np.where(counts > MANY_SHOT_ABOVE, 0, np.where(counts < FEW_SHOT_BELOW, 2, 1))


@dataclass
class FeatureStats:
    """Running count, sum and sum of outer products of feature rows, in float64.

    ``update`` adds a batch; two stats of disjoint rows ``merge`` into the stats of their
    union. Mean and covariance (unbiased, as ``np.cov``) come from the sums at the end.
    """

    dim: int = FEATURE_DIM
    count: int = 0
    total: np.ndarray = field(default=None)  # type: ignore[assignment]
    outer: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = np.zeros(self.dim, np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, rows: np.ndarray) -> FeatureStats:
        rows = np.asarray(rows, dtype=np.float64)
        self.count += len(rows)
        self.total += rows.sum(axis=0)
        self.outer += rows.T @ rows
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(self.dim, self.count + other.count, self.total + other.total,
                            self.outer + other.outer)

    @classmethod
    def of(cls, rows: np.ndarray, chunk: int = 4096) -> FeatureStats:
        stats = cls(dim=rows.shape[1])
        for start in range(0, len(rows), chunk):
            stats.update(rows[start:start + chunk])
        return stats

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.count

    @property
    def cov(self) -> np.ndarray:
        mu = self.mean
        return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)


def _frechet(mu_diff: np.ndarray, trace_1: float, trace_2: float, trace_sqrt: float) -> float:
    """||mu_1 - mu_2||^2 + tr S_1 + tr S_2 - 2 tr sqrt(S_1 S_2)  (Heusel et al. 2017, Eq. 6)."""
    return float(mu_diff @ mu_diff + trace_1 + trace_2 - 2.0 * trace_sqrt)


def fid(gen: FeatureStats, ref: FeatureStats) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets, from their sums.

    tr sqrt(S_1 S_2) is taken from the symmetric matrix S_1^(1/2) S_2 S_1^(1/2), which has the
    same eigenvalues: two symmetric eigensolves instead of torch-fidelity's general ``eigvals``
    of S_1 S_2 (about 3x faster at 2048 dimensions, and the same number to ~1e-9 relative).
    """
    if min(gen.count, ref.count) < 2:
        return float("nan")
    sigma_1, sigma_2 = gen.cov, ref.cov
    w, v = np.linalg.eigh(sigma_1)
    half = v * np.sqrt(np.clip(w, 0, None))  # S_1 = half @ half.T
    inner = np.linalg.eigvalsh(half.T @ sigma_2 @ half)
    return _frechet(gen.mean - ref.mean, np.trace(sigma_1), np.trace(sigma_2),
                    np.sqrt(np.clip(inner, 0, None)).sum())


def fid_from_rows(gen: np.ndarray, ref: np.ndarray) -> float:
    """The same distance from feature rows, for sets smaller than the feature dimension.

    With centred rows X_1 (n_1 x d) and X_2, S_1 S_2 has the non-zero eigenvalues of
    C C^T / ((n_1-1)(n_2-1)) with C = X_1 X_2^T, so tr sqrt(S_1 S_2) is the sum of C's singular
    values over sqrt((n_1-1)(n_2-1)): an n_1 x n_2 problem instead of a d x d one, which makes
    per-class FID cheap for any number of classes.
    """
    if min(len(gen), len(ref)) < 2:
        return float("nan")
    gen, ref = np.asarray(gen, np.float64), np.asarray(ref, np.float64)
    x_1, x_2 = gen - gen.mean(axis=0), ref - ref.mean(axis=0)
    scale_1, scale_2 = len(gen) - 1, len(ref) - 1
    singular = np.linalg.svd(x_1 @ x_2.T, compute_uv=False)
    return _frechet(gen.mean(axis=0) - ref.mean(axis=0), (x_1 * x_1).sum() / scale_1,
                    (x_2 * x_2).sum() / scale_2, singular.sum() / np.sqrt(scale_1 * scale_2))


def fid_of(gen: FeatureStats, ref: FeatureStats, gen_rows: np.ndarray | None = None,
           ref_rows: np.ndarray | None = None) -> float:
    """FID of two sets from their statistics, or from their rows (the same number, cheaper)
    when the rows given are all of both sets and no more than the feature dimension."""
    whole = (gen_rows is not None and ref_rows is not None and len(gen_rows) == gen.count
             and len(ref_rows) == ref.count)
    if whole and max(gen.count, ref.count) <= gen.dim:
        return fid_from_rows(gen_rows, ref_rows)
    return fid(gen, ref)


def kid(gen: np.ndarray, ref: np.ndarray, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = RNG_SEED) -> dict[str, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): cubic polynomial-kernel MMD^2 averaged
    over random subsets; the subset size shrinks to the smaller set when needed."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(gen), len(ref))
    if size < 2:
        return {"kid_mean": float("nan"), "kid_std": float("nan"), "kid_subset_size": size}
    out = kid_features_to_metric(torch.from_numpy(np.asarray(gen)), torch.from_numpy(np.asarray(ref)),
                                 kid_subsets=subsets, kid_subset_size=size, rng_seed=seed,
                                 verbose=False)
    return {"kid_mean": out["kernel_inception_distance_mean"],
            "kid_std": out["kernel_inception_distance_std"], "kid_subset_size": size}


def inception_score(logits: np.ndarray, splits: int = ISC_SPLITS,
                    seed: int = RNG_SEED) -> dict[str, float]:
    """Inception Score (Salimans et al. 2016) from ``logits_unbiased``, shuffled then split."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    splits = min(splits, len(logits))
    if splits < 1:
        return {"isc_mean": float("nan"), "isc_std": float("nan")}
    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits=splits,
                                 shuffle=True, rng_seed=seed)
    return {"isc_mean": out["inception_score_mean"], "isc_std": out["inception_score_std"]}


def _subset(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(rows) <= limit:
        return np.asarray(rows)
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
    return np.asarray(rows[keep])


def precision_recall(gen: np.ndarray, ref: np.ndarray, k: int = PRC_NEIGHBORHOOD,
                     max_images: int = PRC_MAX_IMAGES, seed: int = RNG_SEED) -> dict[str, float]:
    """Improved Precision and Recall (Kynkaanniemi et al. 2019) with k-NN radii in feature space.

    Precision: the share of generated rows inside some reference row's k-NN ball; recall: the
    share of reference rows inside some generated row's ball.
    """
    from torch_fidelity.metric_prc import prc_features_to_metric

    if min(len(gen), len(ref)) <= k:
        return {"precision": float("nan"), "recall": float("nan")}
    gen, ref = _subset(gen, max_images, seed), _subset(ref, max_images, seed + 1)
    out = prc_features_to_metric(torch.from_numpy(gen), torch.from_numpy(ref),
                                 prc_neighborhood=k, prc_batch_size=_PRC_BATCH,
                                 save_cpu_ram=True, verbose=False)
    return {"precision": out["precision"], "recall": out["recall"]}


def set_metrics(metrics: Sequence[str], gen_stats: FeatureStats, ref_stats: FeatureStats,
                gen_rows: np.ndarray, ref_rows: np.ndarray,
                max_images: int = PRC_MAX_IMAGES) -> dict[str, float]:
    """FID (from the statistics of every image), KID and P/R (from the rows given, which may
    be a subset) of one generated set against one reference set."""
    out: dict[str, float] = {"num_generated": gen_stats.count, "num_reference": ref_stats.count}
    if "fid" in metrics:
        out["fid"] = fid_of(gen_stats, ref_stats, gen_rows, ref_rows)
    if "kid" in metrics:
        out.update(kid(gen_rows, ref_rows))
    if "prc" in metrics:
        out.update(precision_recall(gen_rows, ref_rows, max_images=max_images))
    return out


def per_class_fid(gen_rows: np.ndarray, gen_labels: np.ndarray, ref_rows: np.ndarray,
                  ref_labels: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """FID of each class's samples against that class's reference images."""
    return {int(c): fid_from_rows(gen_rows[gen_labels == c], ref_rows[ref_labels == c])
            for c in classes}


# --- copying and diversity (what CCUA is for) ------------------------------------------------

# A generated image counts as a copy when its nearest training image of its class is at least
# COPY_RATIO times closer than its nearest reference image of that class (a ratio test in the
# spirit of the memorisation studies, e.g. Gu et al. 2023, who compare the nearest and second
# nearest training image with the same 1/3). A fresh sample is about as close to the reference
# as to the training images (closer, where the training class is small); a copy is at
# distance ~0 from a training image.
COPY_RATIO = 1 / 3
DIVERSITY_MAX_ROWS = 1000  # rows per class and side in the pairwise distances (seeded subset)


def nearest_distance(queries: np.ndarray, keys: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Euclidean distance from every query row to its nearest key row, in float64."""
    keys = np.asarray(keys, np.float64)
    key_sq = (keys ** 2).sum(1)
    out = np.empty(len(queries))
    for start in range(0, len(queries), chunk):
        q = np.asarray(queries[start:start + chunk], np.float64)
        d2 = (q ** 2).sum(1)[:, None] + key_sq[None] - 2 * q @ keys.T
        out[start:start + chunk] = np.sqrt(np.clip(d2.min(axis=1), 0, None))
    return out


def copy_ratios(gen: np.ndarray, gen_labels: np.ndarray, train: np.ndarray,
                train_labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray) -> np.ndarray:
    """Per generated row: (distance to the nearest training row of its class) / (distance to
    the nearest reference row of its class); NaN where the class has no training or no
    reference rows. Below ``COPY_RATIO`` the row counts as a copy."""
    out = np.full(len(gen), np.nan)
    for c in np.unique(gen_labels):
        rows, t, r = gen_labels == c, train[train_labels == c], ref[ref_labels == c]
        if len(t) and len(r):
            d_ref = nearest_distance(gen[rows], r)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[rows] = nearest_distance(gen[rows], t) / d_ref
    return out


def mean_pairwise_distance(rows: np.ndarray, max_rows: int = DIVERSITY_MAX_ROWS,
                           seed: int = RNG_SEED) -> float:
    """Mean Euclidean distance over the pairs of distinct rows (a seeded subset above
    ``max_rows``); NaN with fewer than two rows."""
    rows = np.asarray(_subset(np.asarray(rows), max_rows, seed), np.float64)
    n = len(rows)
    if n < 2:
        return float("nan")
    sq = (rows ** 2).sum(1)
    d = np.sqrt(np.clip(sq[:, None] + sq[None] - 2 * rows @ rows.T, 0, None))
    return float(d[np.triu_indices(n, 1)].mean())


def class_diversity(gen: np.ndarray, gen_labels: np.ndarray, ref: np.ndarray,
                    ref_labels: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Per class: mean pairwise distance of its generated rows over that of its reference
    rows. 1 = as diverse as real images of the class; a generator that repeats a few images
    scores well below 1."""
    return {int(c): mean_pairwise_distance(gen[gen_labels == c])
            / mean_pairwise_distance(ref[ref_labels == c]) for c in classes}


def copy_rate(ratios: np.ndarray) -> float:
    """The share of copies (ratio below ``COPY_RATIO``) among the rows with a ratio."""
    defined = np.asarray(ratios)[~np.isnan(ratios)]
    return float((defined < COPY_RATIO).mean()) if len(defined) else float("nan")


def mean_diversity(values: Sequence[float]) -> float:
    """The mean of the classes' diversities that have a value."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def copy_and_diversity(gen: np.ndarray, gen_labels: np.ndarray, train: np.ndarray,
                       train_labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray,
                       classes: Sequence[int]) -> dict[str, float]:
    """``copy_rate`` (share of the generated rows of ``classes`` that are copies, see
    ``COPY_RATIO``) and ``diversity`` (mean of ``class_diversity`` over the classes that have
    a value) of one set of classes."""
    keep = np.isin(gen_labels, list(classes))
    ratios = copy_ratios(gen[keep], gen_labels[keep], train, train_labels, ref, ref_labels)
    diversity = class_diversity(gen, gen_labels, ref, ref_labels, classes).values()
    return {"copy_rate": copy_rate(ratios), "diversity": mean_diversity(list(diversity))}
