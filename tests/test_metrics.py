"""FID/KID/IS/PR from features, checked against torch-fidelity's own functions.

Feature dimensions are small here (64-256) so every check runs in milliseconds; the metric
math does not depend on the dimension. The end-to-end check with Inception features at 2048
dimensions, against ``torch_fidelity.calculate_metrics``, is in test_evaluate.py.
"""

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric

from raydiff import metrics


def features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated dimensions, as real features
    return (rng.normal(size=(n, d)) @ mixing + shift).astype(np.float32)


def torch_fidelity_fid(a: np.ndarray, b: np.ndarray) -> float:
    """torch-fidelity's path: fid_features_to_statistics (np.mean, np.cov), then eigvals."""
    stats = [{"mu": x.astype(np.float64).mean(axis=0), "sigma": np.cov(x, rowvar=False)}
             for x in (a, b)]
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


def test_feature_stats_merged_from_batches_equal_numpy_mean_and_cov():
    rows = features(300, 16, seed=0, shift=3.0)
    # two "actors" with uneven batches, merged afterwards
    first = metrics.FeatureStats(16).update(rows[:7]).update(rows[7:120])
    second = metrics.FeatureStats(16).update(rows[120:])
    stats = first.merge(second)
    assert stats.count == 300
    np.testing.assert_allclose(stats.mean, rows.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(rows, rowvar=False), rtol=1e-9, atol=1e-12)
    assert stats.total.dtype == stats.outer.dtype == np.float64


@pytest.mark.parametrize("n_gen,n_ref,d", [(400, 300, 64), (30, 45, 64), (20, 12, 256)])
def test_fid_both_ways_equal_torch_fidelity(n_gen, n_ref, d):
    gen, ref = features(n_gen, d, seed=1, shift=0.3), features(n_ref, d, seed=2)
    expected = torch_fidelity_fid(gen, ref)
    from_stats = metrics.fid(metrics.FeatureStats.of(gen, chunk=50), metrics.FeatureStats.of(ref))
    from_rows = metrics.fid_from_rows(gen, ref)
    # rank-deficient covariances (n < d): torch-fidelity's eigvals carries ~1e-8 of noise
    assert from_stats == pytest.approx(expected, rel=1e-6)
    assert from_rows == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    rows = features(200, 32, seed=3)
    stats = metrics.FeatureStats.of(rows)
    assert abs(metrics.fid(stats, stats)) < 1e-8
    assert abs(metrics.fid_from_rows(rows, rows)) < 1e-8
    # a pure mean shift of s in every dimension adds d * s^2
    shifted = metrics.FeatureStats.of(rows + 0.5)
    assert metrics.fid(shifted, stats) == pytest.approx(32 * 0.25, rel=1e-9)
    assert np.isnan(metrics.fid(metrics.FeatureStats.of(rows[:1]), stats))


def test_class_groups_cut_the_training_count_ranking_into_thirds():
    counts = [50, 500, 129, 77, 359, 278, 215, 100, 166, 64]  # shuffled CIFAR-10-LT-like
    groups = metrics.class_groups(counts)
    order = np.argsort(-np.asarray(counts))
    assert groups[order].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert metrics.class_groups([5, 5, 5]).tolist() == [0, 1, 2]  # ties keep class order


def test_kid_is_near_zero_for_one_distribution_and_large_for_a_shifted_one():
    rng = np.random.default_rng(4)
    draw = lambda: rng.normal(size=(60, 32)).astype(np.float32)  # noqa: E731
    same = metrics.kid(draw(), draw(), subsets=5, subset_size=60)
    shifted = metrics.kid(draw() + 1.0, draw(), subsets=5, subset_size=1000)
    assert same["kid_subset_size"] == 60 and shifted["kid_subset_size"] == 60
    assert shifted["kid_mean"] > 20 * abs(same["kid_mean"])


def test_inception_score_bounds_and_torch_fidelity_agreement():
    uniform = np.zeros((20, 8), np.float32)
    assert metrics.inception_score(uniform)["isc_mean"] == pytest.approx(1.0)
    confident = np.eye(8, dtype=np.float32).repeat(5, axis=0) * 50  # 40 rows, 8 classes
    assert metrics.inception_score(confident, splits=1)["isc_mean"] == pytest.approx(8.0, rel=1e-3)
    logits = features(40, 8, seed=5)
    expected = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True,
                                      rng_seed=2020)
    assert metrics.inception_score(logits)["isc_mean"] == expected["inception_score_mean"]
    assert metrics.inception_score(logits[:4])["isc_mean"] > 0  # fewer rows than splits


def test_precision_recall_with_three_neighbours():
    ref = features(50, 16, seed=6)
    same = metrics.precision_recall(ref, ref)
    assert same == {"precision": 1.0, "recall": 1.0}
    far = metrics.precision_recall(ref + 100.0, ref)
    assert far == {"precision": 0.0, "recall": 0.0}
    # a generated set collapsed onto a few reference points: precise, but no recall
    collapsed = np.repeat(ref[:2], 10, axis=0)
    result = metrics.precision_recall(collapsed, ref)
    assert result["precision"] == 1.0 and result["recall"] < 0.2
    assert np.isnan(metrics.precision_recall(ref[:3], ref)["precision"])  # k = 3 needs 4 rows


def test_precision_recall_subsets_large_sets_deterministically():
    gen, ref = features(40, 8, seed=7), features(40, 8, seed=8)
    a = metrics.precision_recall(gen, ref, max_images=20)
    assert a == metrics.precision_recall(gen, ref, max_images=20)
    assert 0.0 <= a["precision"] <= 1.0 and 0.0 <= a["recall"] <= 1.0


def test_per_class_fid_compares_each_class_with_its_own_reference():
    gen, ref = features(40, 16, seed=9), features(40, 16, seed=10)
    labels = np.arange(40) % 2
    gen[labels == 1] += 2.0  # class 1's samples are off, class 0's are fine
    per_class = metrics.per_class_fid(gen, labels, ref, labels, [0, 1])
    assert per_class[1] > per_class[0] + 16 * 3.0
    assert per_class[0] == pytest.approx(torch_fidelity_fid(gen[labels == 0], ref[labels == 0]),
                                         rel=1e-6)
