"""``raydiff evaluate`` on the session's Ray against torch-fidelity in one process.

The Inception weights are the random but calibrated file of the ``inception_weights`` fixture
(the real ones are a download). 12 generated and 16 reference images: Inception costs about
0.1 s per image on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch_fidelity

from raydiff.data.parquet import read_split_arrays
from raydiff.data.samples import read_samples
from raydiff.distributed.evaluate import EvalJob, run_evaluation
from raydiff.distributed.sample import SampleJob, run_sampling

REF_PER_CLASS = 4


class UInt8Images(torch.utils.data.Dataset):
    """uint8 NHWC arrays as the 3xHxW uint8 tensors torch-fidelity reads."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i].copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def samples(ray_local, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "samples"
    run_sampling(SampleJob(checkpoint=str(tiny_checkpoint), out=str(out), per_class=3,
                           forward_batch=4, shard_size=8))
    return out


def first_per_class(images: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    seen: dict[int, int] = {}
    keep = []
    for i, label in enumerate(labels.tolist()):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= n:
            keep.append(i)
    return images[keep]


@pytest.fixture(scope="module")
def first_evaluation(samples, shapes16_tiny, inception_weights, tmp_path_factory):
    cache = tmp_path_factory.mktemp("feature-cache")
    job = EvalJob(samples=str(samples), reference=str(shapes16_tiny), groups=True, per_class=True,
                  inception_weights=str(inception_weights), actors=2, batch_size=4,
                  reference_per_class=REF_PER_CLASS, cache_dir=str(cache))
    return job, run_evaluation(job)


def test_metrics_over_two_actors_equal_torch_fidelity_in_one_process(
        first_evaluation, samples, shapes16_tiny, inception_weights):
    _, result = first_evaluation
    generated = read_samples(samples)[0]
    reference = first_per_class(*read_split_arrays(shapes16_tiny, "reference"), REF_PER_CLASS)
    expected = torch_fidelity.calculate_metrics(
        input1=UInt8Images(generated), input2=UInt8Images(reference), fid=True, kid=True,
        isc=True, prc=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(inception_weights), kid_subset_size=len(generated),
        cuda=False, batch_size=8, cache=False, save_cpu_ram=True, verbose=False)
    overall = result["sets"]["overall"]
    assert (overall["num_generated"], overall["num_reference"]) == (12, 16)
    assert overall["fid"] > 1.0  # the calibrated random weights give non-degenerate features
    assert overall["fid"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-4)
    assert overall["kid_mean"] == pytest.approx(expected["kernel_inception_distance_mean"],
                                                rel=1e-4)
    assert overall["isc_mean"] == pytest.approx(expected["inception_score_mean"], rel=1e-4)
    assert overall["precision"] == pytest.approx(expected["precision"])
    assert overall["recall"] == pytest.approx(expected["recall"])


def test_groups_per_class_and_outputs(first_evaluation, samples, shapes16_tiny):
    from raydiff.data.parquet import load_info

    _, result = first_evaluation
    # shapes16_tiny trains on 8, 6, 3, 2 images: 4 classes cut into thirds -> 2, 1, 1
    assert result["groups"] == {"head": [0, 1], "body": [2], "tail": [3]}
    sets = result["sets"]
    assert [sets[g]["num_generated"] for g in ("head", "body", "tail")] == [6, 3, 3]
    assert [sets[g]["num_reference"] for g in ("head", "body", "tail")] == [8, 4, 4]
    assert all(np.isfinite(sets[g]["fid"]) for g in sets)
    # every class has fewer than 20 training images: one non-empty shot group, all of them
    assert result["shot_groups"] == {"many": [], "medium": [], "few": [0, 1, 2, 3]}
    assert "many" not in sets and "medium" not in sets
    assert sets["few"]["fid"] == pytest.approx(sets["overall"]["fid"], rel=1e-6)
    assert sets["few"]["copy_rate"] == pytest.approx(sets["overall"]["copy_rate"])
    assert set(result["per_class_fid"]) == {"0", "1", "2", "3"}
    assert result["per_class_fid_mean"] == pytest.approx(np.mean(list(
        result["per_class_fid"].values())))
    on_disk = json.loads((samples / "metrics.json").read_text())
    assert on_disk["sets"]["overall"]["fid"] == pytest.approx(sets["overall"]["fid"])
    assert (samples / "metrics.png").stat().st_size > 1000
    assert result["reference_cache"] == "miss"
    # one feature pass: the 12 generated, 16 reference (4 a class) and every training image
    train = load_info(shapes16_tiny).num_images("train")
    assert result["extracted"] == {"reference": 16, "train": train, "generated": 12}


def test_second_evaluation_reads_the_reference_features_from_the_cache(first_evaluation, tmp_path):
    job, result = first_evaluation
    again = run_evaluation(replace(job, actors=1, metrics=("fid",), groups=False,
                                   per_class=False, copying=False, out=str(tmp_path)))
    assert again["reference_cache"] == "hit"
    assert again["extracted"] == {"generated": 12}  # the reference's features: the cache's
    assert again["sets"]["overall"]["fid"] == pytest.approx(result["sets"]["overall"]["fid"],
                                                            rel=1e-6)
    assert set(again["sets"]["overall"]) == {"num_generated", "num_reference", "fid", "classes"}


@pytest.fixture(scope="module")
def in_process(samples, shapes16_tiny, inception_weights) -> dict:
    """The features of the generated, reference (the first REF_PER_CLASS per class) and
    training images, extracted here in one process, with their labels."""
    from raydiff.features import InceptionFeatures

    extract = InceptionFeatures(inception_weights)
    gen_images, gen_labels, _ = read_samples(samples)
    ref_images, ref_labels = read_split_arrays(shapes16_tiny, "reference")
    keep = first_per_class(np.arange(len(ref_labels)), ref_labels, REF_PER_CLASS)
    train_images, train_labels = read_split_arrays(shapes16_tiny, "train")
    return {"gen": extract(gen_images)[0], "gen_labels": gen_labels,
            "ref": extract(ref_images[keep])[0], "ref_labels": ref_labels[keep],
            "train": extract(train_images)[0], "train_labels": train_labels}


def test_copy_rate_and_diversity_equal_an_in_process_computation(first_evaluation, in_process):
    """The training split's features (the copy rate's other side) come through the same
    actors and cache as the reference's; the numbers equal the metric on features extracted
    here, in one process."""
    from raydiff.metrics import copy_and_diversity

    _, result = first_evaluation
    f = in_process
    assert result["settings"]["copy_ratio"] == pytest.approx(1 / 3)
    for name, values in result["sets"].items():
        expected = copy_and_diversity(f["gen"], f["gen_labels"], f["train"], f["train_labels"],
                                      f["ref"], f["ref_labels"], values["classes"])
        assert 0.0 <= values["copy_rate"] <= 1.0
        assert values["copy_rate"] == pytest.approx(expected["copy_rate"]), name
        assert values["diversity"] == pytest.approx(expected["diversity"], rel=1e-4), name


def chosen(keys: np.ndarray, seed: int, size: int) -> np.ndarray:
    """The metric subset's rule, written out: the ``size`` keys of smallest (priority, key)."""
    from raydiff.accumulate import subset_priority

    return np.sort(keys[np.lexsort((keys, subset_priority(keys, seed)))[:size]])


def test_a_smaller_metric_subset_keeps_fid_and_draws_kid_and_pr_from_the_seeded_rows(
        first_evaluation, in_process, tmp_path):
    """--metric-subset 5 (of 12 generated, 16 reference images): FID and IS are the whole
    set's, KID, P/R and the copy rate those of the 5 images of each side whose keys have the
    smallest seeded priority, on 1 actor as on 2. The overall set only: its subset is chosen
    from three (third, shot group) cells; every group's is checked without Ray in
    test_accumulate.py. The reference's features come from the cache the first evaluation
    filled."""
    from raydiff.distributed.evaluate import GENERATED_SEED, REFERENCE_SEED
    from raydiff.metrics import copy_rate, copy_ratios, kid, precision_recall

    job, full = first_evaluation
    f = in_process
    whole = full["sets"]["overall"]
    g = chosen(np.arange(len(f["gen_labels"])), GENERATED_SEED, 5)
    r = chosen(np.arange(len(f["ref_labels"])), REFERENCE_SEED, 5)
    expected = {**kid(f["gen"][g], f["ref"][r]), **precision_recall(f["gen"][g], f["ref"][r])}
    ratios = copy_ratios(f["gen"][g], f["gen_labels"][g], f["train"], f["train_labels"],
                         f["ref"], f["ref_labels"])
    for actors in (1, 2):
        result = run_evaluation(replace(job, metric_subset=5, actors=actors, groups=False,
                                        per_class=False, out=str(tmp_path / f"{actors}")))
        assert result["settings"]["metric_subset"] == 5
        assert result["extracted"] == {"generated": 12}
        overall = result["sets"]["overall"]
        assert (overall["num_generated"], overall["num_reference"]) == (12, 16)
        assert (overall["subset_generated"], overall["subset_reference"]) == (5, 5)
        assert overall["fid"] == pytest.approx(whole["fid"], rel=1e-6)
        assert overall["isc_mean"] == pytest.approx(whole["isc_mean"], rel=1e-6)
        assert overall["kid_mean"] == pytest.approx(expected["kid_mean"], rel=1e-4, abs=1e-9)
        assert overall["kid_mean"] != pytest.approx(whole["kid_mean"], rel=1e-3)
        assert overall["precision"] == pytest.approx(expected["precision"])
        assert overall["recall"] == pytest.approx(expected["recall"])
        assert overall["copy_rate"] == pytest.approx(copy_rate(ratios))


def test_cache_rows_written_as_they_arrive_are_read_back_in_chunks(tmp_path):
    from raydiff.data.feature_rows import RowsWriter
    from raydiff.distributed.evaluate import _read_cache

    rows = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    labels = np.arange(10) % 4
    entry = tmp_path / "entry"
    writer = RowsWriter(entry, 10, 3)
    for keys in ([7, 3, 4, 5], [0, 9], [8, 1, 2, 6]):  # any order, as actors deliver them
        writer.add({"key": np.array(keys), "label": labels[keys], "feat": rows[keys]})
    writer.finish({"version": 1}, "reference")
    stored = _read_cache(entry, 3)
    np.testing.assert_array_equal(stored.load()[0], rows)
    np.testing.assert_array_equal(stored.labels, labels)
    keys, chunk_labels, chunk_rows = zip(*stored.chunks(size=4))
    assert [len(k) for k in keys] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(chunk_rows), rows)
    np.testing.assert_array_equal(np.concatenate(chunk_labels), labels)
    assert np.concatenate(keys).tolist() == list(range(10))
    short = RowsWriter(tmp_path / "short", 3, 3)
    short.add({"key": np.array([0, 2]), "label": np.zeros(2), "feat": rows[:2]})
    with pytest.raises(RuntimeError, match="1 reference images got no features"):
        short.finish({}, "reference")
    assert _read_cache(tmp_path / "short", 3) is None  # never finished: no entry


def test_bad_input_is_one_clear_line(cli_error, samples, shapes_dataset, shapes16_tiny, tmp_path,
                                     monkeypatch):
    from raydiff.data.prepare import PrepareOptions, prepare_dataset

    args = ["evaluate", "--samples", str(samples), "--data"]
    # shapes_dataset is 32 px; the samples are 16 px
    assert "is 32x32 but the samples are 16x16" in cli_error(args + [str(shapes_dataset)])
    three = tmp_path / "three-classes"
    prepare_dataset(PrepareOptions(source="shapes", out=three, resolution=16, num_classes=3,
                                   images_per_class=4, imbalance_ratio=2.0))
    assert "has 3 classes but the samples' checkpoint has 4" in cli_error(args + [str(three)])
    assert "not a 'raydiff sample' folder" in cli_error(
        ["evaluate", "--samples", str(tmp_path), "--data", str(three)])
    matching = args + [str(shapes16_tiny)]
    assert "--metrics fid,foo: expected a comma-separated subset" in cli_error(
        matching + ["--metrics", "fid,foo"])
    # no weights file, none cached, no download: what to do, in one line
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    line = cli_error(matching + ["--no-download"])
    assert "downloading is off; pass --inception-weights PATH" in line
    # a weights file that is a pickle of more than tensors is refused before torch-fidelity
    # would unpickle it with weights_only=False
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": UInt8Images(np.zeros(1))}, evil)
    line = cli_error(matching + ["--inception-weights", str(evil)])
    assert "is not a plain Inception state dict" in line


@pytest.mark.parametrize("split", ["reference", "train"])
def test_driver_read_and_streamed_rows_are_the_same(ray_local, shapes16_tiny, monkeypatch,
                                                     split):
    """Small image sets are read by the driver, large ones by Ray Data's readers: the same
    (part, key, label, image) rows either way."""
    from raydiff.data import parquet
    from raydiff.distributed import evaluate
    from raydiff.storage import Folder

    positions = evaluate._reference_positions(str(shapes16_tiny), 3, split)
    names = parquet.load_info(shapes16_tiny).files[split]

    def rows() -> list[tuple]:
        ds = evaluate.image_rows(Folder(shapes16_tiny), names, ["image", "label", "source"], 7,
                                 evaluate.key_by_source, rows_per_block=5,
                                 keyer_kwargs={"positions": positions})
        batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        assert all(len(b["key"]) <= 5 for b in batches)  # blocks for every actor
        return sorted(zip(*(np.concatenate([b[c] for b in batches]).tolist()
                            for c in ("part", "key", "label", "image"))))

    read_here = rows()
    monkeypatch.setattr(evaluate, "DRIVER_READ_MAX_BYTES", 0)
    streamed = rows()
    assert streamed == read_here
    assert [r[1] for r in read_here] == list(range(len(positions)))  # every kept row, once
    assert {r[0] for r in read_here} == {7}
