"""The bounded accumulators of ``raydiff evaluate``, without Ray.

A generated set of 6 classes laid out as ``raydiff sample`` lays it out (image i has label
``i % 6``) and a reference split, both with random 16-d features and 8-d logits, are fed in
batches of random sizes and orders (as Ray Data actors deliver them) and compared with the
in-memory functions of ``raydiff.metrics`` on all rows, and on the rows the seeded subset
rule picks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_isc import isc_features_to_metric

from raydiff import accumulate, metrics
from raydiff.accumulate import FeatureStream, GeneratedStream, SeededSubset, subset_priority
from raydiff.errors import RaydiffError

DIM, LOGITS, CLASSES, PER_CLASS, REF_PER_CLASS = 16, 8, 6, 13, 11
# training counts: thirds {0,1}, {2,3}, {4,5}; shot groups many {0,1,2}, medium {3,4}, few {5}
TRAIN_COUNTS = [400, 300, 150, 60, 30, 10]
GEN_SEED, REF_SEED = 2020, 2021


def test_priority_is_splitmix64():
    # SplitMix64 seeded with 0 (Vigna's splitmix64.c, Java's SplittableRandom) starts
    # e220a8397b1dcdaf, 6e789e6aa1b965f4, 06c45d188009454f
    assert subset_priority([0, 1, 2], 0).tolist() == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    keys = np.arange(1000)
    assert not np.array_equal(np.argsort(subset_priority(keys, 1)),
                              np.argsort(subset_priority(keys, 2)))
    with pytest.raises(ValueError):
        subset_priority([-1], 0)


def batches(n: int, seed: int) -> list[np.ndarray]:
    """The indices 0..n-1 shuffled and cut into batches of random sizes."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, n // 5), replace=False))
    return np.split(order, cuts)


def test_subset_keeps_the_smallest_priorities_whatever_the_batches():
    n, size = 1000, 50
    keys = np.arange(n) * 3 + 7  # any non-negative keys
    rows = np.stack([keys, -keys], axis=1).astype(np.float32)
    expected = np.sort(keys[np.lexsort((keys, subset_priority(keys, 5)))[:size]])
    for seed in range(3):
        subset = SeededSubset(size, 2, seed=5)
        for batch in batches(n, seed):
            subset.offer(keys[batch], keys[batch] % 4, rows[batch])
            assert len(subset.prio) <= size  # bounded: never a buffer beyond the size
        kept = accumulate.smallest([subset], size)
        assert kept.keys.tolist() == expected.tolist()
        np.testing.assert_array_equal(kept.rows[:, 0], kept.keys)
        assert (kept.labels == kept.keys % 4).all()
    small = SeededSubset(size, 2, seed=5)
    small.offer(keys[:10], keys[:10] % 4, rows[:10])
    assert len(small) == 10  # fewer rows than the size: all of them


def features(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, DIM)) + shift).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    n_gen, n_ref = PER_CLASS * CLASSES, REF_PER_CLASS * CLASSES
    rng = np.random.default_rng(0)
    train_labels = np.repeat(np.arange(CLASSES), 12)
    return {
        "gen": features(n_gen, 1, shift=0.3), "gen_labels": np.arange(n_gen) % CLASSES,
        "logits": (rng.normal(size=(n_gen, LOGITS)) * 3).astype(np.float32),
        "ref": features(n_ref, 2), "ref_labels": rng.permutation(np.arange(n_ref) % CLASSES),
        "train": features(len(train_labels), 3), "train_labels": train_labels,
    }


def streams(data, size: int, order_seed: int, per_class_stats: bool = False):
    groups = metrics.class_groups(TRAIN_COUNTS)
    shots = metrics.shot_groups(TRAIN_COUNTS)
    classes = list(range(CLASSES))
    sets = accumulate.eval_sets(classes, groups, shots, with_groups=True)
    cells = accumulate.class_cells(CLASSES, classes, groups, shots)
    gen = GeneratedStream(FeatureStream(cells, DIM, size, GEN_SEED, per_class_stats), classes,
                          PER_CLASS, sets, logits_dim=LOGITS, top1=True)
    for b in batches(len(data["gen"]), order_seed):
        gen.add(b, data["gen_labels"][b], data["gen"][b], data["logits"][b])
    ref = FeatureStream(cells, DIM, size, REF_SEED, per_class_stats)
    for b in batches(len(data["ref"]), order_seed + 1):
        ref.add(b, data["ref_labels"][b], data["ref"][b])
    return gen, ref, sets


def results(data, gen, ref, sets) -> dict:
    split = lambda rows, labels: [accumulate.Rows(np.flatnonzero(labels == c),  # noqa: E731
                                                  labels[labels == c], rows[labels == c])
                                  for c in range(CLASSES)]
    queries = gen.features.subset_rows()
    copies = accumulate.CopyRatios(queries.keys, accumulate.copy_ratios(
        queries, split(data["train"], data["train_labels"]),
        split(data["ref"], data["ref_labels"])))
    diversity = accumulate.class_diversity(gen.features, ref, range(CLASSES))
    return {name: accumulate.set_results(metrics.METRICS, gen, ref, name, members, copies,
                                         diversity)
            for name, members in sets.items()}


def test_sets_equal_the_in_memory_metrics_when_the_subset_holds_everything(data):
    gen, ref, sets = streams(data, size=1000, order_seed=0)
    assert set(sets) == {"overall", "head", "body", "tail", "many", "medium", "few"}
    for name, values in results(data, gen, ref, sets).items():
        members = sets[name]
        in_gen, in_ref = np.isin(data["gen_labels"], members), np.isin(data["ref_labels"], members)
        g, r = data["gen"][in_gen], data["ref"][in_ref]
        assert (values["num_generated"], values["num_reference"]) == (len(g), len(r))
        assert values["subset_generated"] == len(g) and values["subset_reference"] == len(r)
        assert values["fid"] == pytest.approx(metrics.fid_from_rows(g, r), rel=1e-7)
        assert values["kid_mean"] == metrics.kid(g, r)["kid_mean"], name
        assert {k: values[k] for k in ("precision", "recall")} == metrics.precision_recall(g, r)
        expected_isc = metrics.inception_score(data["logits"][in_gen])
        assert values["isc_mean"] == pytest.approx(expected_isc["isc_mean"], rel=1e-12), name
        assert values["isc_std"] == pytest.approx(expected_isc["isc_std"], rel=1e-9, abs=1e-12)
        copy = metrics.copy_and_diversity(data["gen"], data["gen_labels"], data["train"],
                                          data["train_labels"], data["ref"], data["ref_labels"],
                                          members)
        assert values["copy_rate"] == pytest.approx(copy["copy_rate"])
        assert values["diversity"] == pytest.approx(copy["diversity"], rel=1e-9)
        top1 = (data["logits"][in_gen].argmax(1) == data["gen_labels"][in_gen]).mean()
        assert values["classifier_top1"] == pytest.approx(top1)


def chosen(keys: np.ndarray, seed: int, size: int) -> np.ndarray:
    """The rule, written out: the ``size`` keys of smallest (priority, key), in key order."""
    return np.sort(keys[np.lexsort((keys, subset_priority(keys, seed)))[:size]])


def test_a_smaller_subset_keeps_fid_and_draws_kid_and_pr_from_the_seeded_rows(data):
    size = 7
    full = results(data, *streams(data, size=1000, order_seed=0))
    one_actor = results(data, *streams(data, size=size, order_seed=1))
    two_actors = results(data, *streams(data, size=size, order_seed=2))
    for name, values in one_actor.items():  # the same rows, however the batches came ...
        sums = {"fid", "isc_mean", "isc_std"}  # ... and float64 sums in another order
        assert {k: v for k, v in values.items() if k not in sums} == {
            k: v for k, v in two_actors[name].items() if k not in sums}
        for key in sums:  # FID: rank-deficient covariances (see below) at rel 1e-9
            rel = 1e-7 if key == "fid" else 1e-9
            assert values[key] == pytest.approx(two_actors[name][key], rel=rel), (name, key)
    for name, values in one_actor.items():
        # FID and IS from every image: as with the whole set (the few-shot class has fewer
        # rows than dimensions: rank-deficient covariances carry ~1e-9 of eigensolver noise)
        assert values["fid"] == pytest.approx(full[name]["fid"], rel=1e-7)
        assert values["isc_mean"] == pytest.approx(full[name]["isc_mean"], rel=1e-12)
        gen_keys = chosen(np.flatnonzero(np.isin(data["gen_labels"], values["classes"])),
                          GEN_SEED, size)
        ref_keys = chosen(np.flatnonzero(np.isin(data["ref_labels"], values["classes"])),
                          REF_SEED, size)
        assert values["subset_generated"] == len(gen_keys) == min(size, values["num_generated"])
        g, r = data["gen"][gen_keys], data["ref"][ref_keys]
        assert values["kid_mean"] == metrics.kid(g, r)["kid_mean"], name
        assert {k: values[k] for k in ("precision", "recall")} == metrics.precision_recall(g, r)
        ratios = metrics.copy_ratios(g, data["gen_labels"][gen_keys], data["train"],
                                     data["train_labels"], data["ref"], data["ref_labels"])
        assert values["copy_rate"] == pytest.approx(metrics.copy_rate(ratios))
    assert one_actor["overall"]["kid_mean"] != full["overall"]["kid_mean"]


def test_per_class_fid_from_statistics_or_subset_rows(data, monkeypatch):
    expected = metrics.per_class_fid(data["gen"], data["gen_labels"], data["ref"],
                                     data["ref_labels"], range(CLASSES))
    assert accumulate.per_class_stats_fit(CLASSES, DIM)
    assert not accumulate.per_class_stats_fit(1000, metrics.FEATURE_DIM)
    with_stats = streams(data, size=1000, order_seed=0, per_class_stats=True)
    from_rows = streams(data, size=1000, order_seed=0)
    for gen, ref, _ in (with_stats, from_rows):
        got = accumulate.per_class_fid(gen.features, ref, range(CLASSES))
        assert got == pytest.approx(expected, rel=1e-9)
    # a subset smaller than a class: that class's FID comes from its subset rows
    gen, ref, _ = streams(data, size=5, order_seed=0)
    rows = gen.features.class_rows(0)
    assert len(rows) <= 5 and (rows.labels == 0).all()
    got = accumulate.per_class_fid(gen.features, ref, [0])[0]
    assert got == pytest.approx(metrics.fid_from_rows(rows.rows, ref.class_rows(0).rows))


def test_inception_score_streamed_equals_torch_fidelity():
    logits = (np.random.default_rng(4).normal(size=(37, LOGITS)) * 4).astype(np.float32)
    score = accumulate.SplitScore(37, LOGITS)
    for b in batches(37, 0):
        score.update(b, *accumulate.softmax_terms(logits[b]))
    expected = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True,
                                      rng_seed=2020)
    got = score.result()
    assert got["isc_mean"] == pytest.approx(expected["inception_score_mean"], rel=1e-12)
    assert got["isc_std"] == pytest.approx(expected["inception_score_std"], rel=1e-9)
    short = accumulate.SplitScore(37, LOGITS)
    short.update(np.arange(5), *accumulate.softmax_terms(logits[:5]))
    with pytest.raises(RuntimeError, match="over 5 of 37 images"):
        short.result()


def test_a_generated_row_that_breaks_the_labels_rule_is_refused():
    cells = np.zeros(3, np.int64)
    gen = GeneratedStream(FeatureStream(cells, 2, 10, 0), [0, 1, 2], 4, {"overall": [0, 1, 2]})
    gen.add([0, 1, 5], [0, 1, 2], np.zeros((3, 2)))
    with pytest.raises(RaydiffError, match="generated image 4 has label 2, but the sample "
                                           "folder's labels rule gives 1"):
        gen.add([4], [2], np.zeros((1, 2)))


def test_copy_ratios_read_in_chunks_equal_the_in_memory_ones(data):
    queries = accumulate.Rows(np.arange(len(data["gen"])), data["gen_labels"], data["gen"])
    chunks = lambda rows, labels: [accumulate.Rows(np.arange(s, s + 5), labels[s:s + 5],  # noqa: E731
                                                   rows[s:s + 5]) for s in range(0, len(rows), 5)]
    got = accumulate.copy_ratios(queries, chunks(data["train"], data["train_labels"]),
                                 chunks(data["ref"], data["ref_labels"]))
    expected = metrics.copy_ratios(data["gen"], data["gen_labels"], data["train"],
                                   data["train_labels"], data["ref"], data["ref_labels"])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    no_train = accumulate.copy_ratios(queries, [], chunks(data["ref"], data["ref_labels"]))
    assert np.isnan(no_train).all()
