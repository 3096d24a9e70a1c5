"""The classifier core without Ray: network, schedule, sharding, resume, checkpoints, class
groups, mixing rules, and its penultimate layer as an FID feature space.

Data are the built-in shapes drawn in memory at 16 px (4 classes): a train set and a test set
from different seeds, so the test images were never seen. Torch runs on one thread here: these
networks are small, and two threads on a busy 2-core machine ran up to 40x slower (measured).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from raydiff import classifier as C
from raydiff.data.mixing import MixRule, check_samples, mix
from raydiff.data.parquet import DatasetInfo
from raydiff.data.shapes import make_shapes
from raydiff.errors import RaydiffError
from raydiff.metrics import fid_from_rows, shot_groups

SMALL = {"arch": "resnet10", "width": 16}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes_sets():
    return make_shapes(100, 4, resolution=16, seed=0), make_shapes(30, 4, resolution=16, seed=1)


@pytest.fixture(scope="module")
def trained(shapes_sets):
    """15 epochs of 400 images, 2-3 s: 79% top-1 on the test set when written."""
    (images, labels), _ = shapes_sets
    cfg = C.ClassifierConfig(**SMALL, epochs=15, batch_size=64, warmup_epochs=1)
    return C.train_classifier(C.fit_to_data(cfg, 4, 16, images), images, labels)


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "wide_resnet50_2"])
def test_network_is_torchvisions_with_the_small_image_stem(arch):
    # at 224 px and width 64 it is torchvision's network, tensor for tensor
    ours = C.build_classifier(C.ClassifierConfig(arch=arch, num_classes=7, resolution=224))
    theirs = torchvision.models.get_model(arch, weights=None, num_classes=7)
    assert _shapes(ours.state_dict()) == _shapes(theirs.state_dict())
    assert ours.conv1.kernel_size == (7, 7) and isinstance(ours.maxpool, torch.nn.MaxPool2d)


def test_small_images_get_a_3x3_stride_1_stem_and_features():
    model = C.build_classifier(C.ClassifierConfig(**SMALL, num_classes=5, resolution=16))
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 5) and model.features(x).shape == (2, 8 * 16)
    assert model.layer4[0].conv1.out_channels == 8 * 16


def test_trained_on_a_tiny_balanced_set_beats_chance(trained, shapes_sets):
    _, (test_images, test_labels) = shapes_sets
    _, logits = C.predict(trained.model, trained.cfg, test_images)
    correct, total = C.correct_counts(logits.argmax(1), test_labels, 4)
    report = C.accuracy_report(correct, total, [60] * 4)
    assert report["num_images"] == 120
    assert report["top1"] > 0.6, report  # chance: 0.25


def test_classifier_fid_is_zero_against_itself_and_grows_without_a_class(trained, shapes_sets):
    _, (images, labels) = shapes_sets
    features, _ = C.predict(trained.model, trained.cfg, images)
    assert features.shape == (120, 128)
    assert abs(fid_from_rows(features, features)) < 1e-6 * float((features ** 2).sum(1).mean())
    half_a, half_b = np.arange(120) % 2 == 0, np.arange(120) % 2 == 1
    same = fid_from_rows(features[half_a], features[half_b])
    dropped = fid_from_rows(features[half_a & (labels != 3)], features[half_b])
    assert dropped > 1.5 * same, (same, dropped)  # 9.0 and 24.5 when written


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = C.ClassifierConfig(epochs=10, batch_size=256, warmup_epochs=2)
    assert cfg.base_lr == pytest.approx(0.2)  # 0.1 per 128 images
    rates = [C.learning_rate(cfg, step, per_epoch=5) for step in range(50)]
    assert rates[:10] == pytest.approx([0.2 * (s + 1) / 10 for s in range(10)])
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] < 0.01 * 0.2


def test_epoch_shards_are_disjoint_and_equally_long():
    shards = [C.epoch_batches(103, 8, seed=3, epoch=1, rank=r, world=2) for r in range(2)]
    assert shards[0].shape == shards[1].shape == (12, 4)
    both = np.concatenate([s.ravel() for s in shards])
    assert len(set(both.tolist())) == 96  # 12 global batches of 8, no image twice
    assert np.array_equal(shards[0], C.epoch_batches(103, 8, seed=3, epoch=1, rank=0, world=2))
    assert not np.array_equal(shards[0], C.epoch_batches(103, 8, seed=3, epoch=2, rank=0,
                                                         world=2))


def test_resumed_training_equals_uninterrupted_and_checkpoints_round_trip(shapes_sets, tmp_path):
    (images, labels), (test_images, _) = shapes_sets
    images, labels = images[::8], labels[::8]  # 50 images, 3 steps of 16 per epoch
    cfg = C.fit_to_data(C.ClassifierConfig(**SMALL, epochs=2, batch_size=16, warmup_epochs=1),
                        4, 16, images)
    straight = C.train_classifier(cfg, images, labels)
    first = C.ClassifierTrainer(cfg, C.steps_per_epoch(50, 16))
    first.train_epoch(images, labels)
    path = first.save(tmp_path / "checkpoint_000000003", {"mix": {"rule": "none"}})
    resumed = C.ClassifierTrainer(cfg, C.steps_per_epoch(50, 16))
    assert resumed.load(path)["mix"] == {"rule": "none"} and resumed.step == 3
    resumed.train_epoch(images, labels)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    # the features of a saved checkpoint are those of the network that saved it
    final = resumed.save(tmp_path / "checkpoint_000000006")
    assert C.resolve_checkpoint(tmp_path) == str(final)
    features, logits = C.ClassifierFeatures(tmp_path / "checkpoint_000000006")(test_images)
    expected = C.predict(resumed.model, cfg, test_images)
    assert np.array_equal(features, expected[0]) and np.array_equal(logits, expected[1])
    meta = json.loads((final / C.META_FILE).read_text())
    assert meta["kind"] == C.KIND and meta["step"] == 6 and meta["config"]["mean"] == list(cfg.mean)


def test_checkpoints_refuse_code_and_other_networks(shapes_sets, tmp_path):
    (images, labels), _ = shapes_sets
    cfg = C.fit_to_data(C.ClassifierConfig(**SMALL, epochs=2, batch_size=16, warmup_epochs=1),
                        4, 16, images)
    path = C.ClassifierTrainer(cfg, 3).save(tmp_path / "ckpt")
    with pytest.raises(RaydiffError, match="of another classifier: width: checkpoint 16, "
                                           "requested 32"):
        C.ClassifierTrainer(C.ClassifierConfig(**{**cfg.to_dict(), "width": 32}), 3).load(path)
    torch.save({"state": {}, "payload": MixRule("none")}, path / C.OPTIMIZER_FILE)
    with pytest.raises(RaydiffError, match="refused: it holds more than tensors"):
        C.ClassifierTrainer(cfg, 3).load(path)
    with pytest.raises(RaydiffError, match="is neither a classifier checkpoint"):
        C.read_meta(tmp_path)
    with pytest.raises(RaydiffError, match="neither a classifier checkpoint"):
        C.read_meta(C.resolve_checkpoint(tmp_path / "nothing"))


def test_config_rejects_bad_values_in_one_line():
    with pytest.raises(RaydiffError, match=r"classifier arch='vgg' is invalid: expected one of"):
        C.ClassifierConfig(arch="vgg")
    with pytest.raises(RaydiffError, match=r"warmup_epochs=5.0 is invalid: expected in \[0, "
                                           r"epochs=3\)"):
        C.ClassifierConfig(epochs=3)
    with pytest.raises(RaydiffError, match="unknown classifier config key 'depth'"):
        C.ClassifierConfig.from_dict({"depth": 3})
    with pytest.raises(RaydiffError, match="expected an integer"):
        C.ClassifierConfig.from_dict({"epochs": "many"})


def test_shot_groups_and_accuracy_come_from_training_counts():
    counts = [150, 101, 100, 20, 19, 5]  # > 100 many, 20..100 medium, < 20 few
    assert shot_groups(counts).tolist() == [0, 0, 1, 1, 2, 2]
    correct, total = [4, 2, 1, 3, 0, 2], [4] * 6
    report = C.accuracy_report(correct, total, counts, list("abcdef"))
    assert report["top1"] == pytest.approx(12 / 24)
    assert report["per_class"] == {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.75, "e": 0.0, "f": 0.5}
    shots = report["shot_groups"]
    assert [shots[g]["classes"] for g in ("many", "medium", "few")] == [[0, 1], [2, 3], [4, 5]]
    assert [shots[g]["top1"] for g in ("many", "medium", "few")] == [0.75, 0.5, 0.25]
    thirds = report["groups"]
    assert [thirds[g]["classes"] for g in ("head", "body", "tail")] == [[0, 1], [2, 3], [4, 5]]
    # on a small dataset a shot group can be empty: reported as such, not as 0
    small = C.accuracy_report([1, 1], [2, 2], [48, 12])
    assert small["shot_groups"]["many"] == {"classes": [], "top1": None}
    assert small["shot_groups"]["few"] == {"classes": [1], "top1": 0.5}


def test_mixing_rules_give_the_recorded_counts():
    real_labels = np.repeat(np.arange(4), [48, 30, 19, 12])
    real = np.zeros((len(real_labels), 2, 2, 3), np.uint8)
    # 40 synthetic images per class in sample order (label i % 4), pixel value = their index
    synthetic_labels = np.arange(160) % 4
    synthetic = np.broadcast_to(np.arange(160, dtype=np.uint8)[:, None, None, None],
                                (160, 2, 2, 3)).copy()
    names = ["circle", "square", "triangle", "ring"]
    for text, wanted in (("add:5", [5, 5, 5, 5]), ("topup", [0, 18, 29, 36]),
                         ("none", [0, 0, 0, 0])):
        mixed = mix(real, real_labels, synthetic, synthetic_labels, MixRule.parse(text), 4)
        assert np.bincount(mixed.labels, minlength=4).tolist() == [
            r + w for r, w in zip([48, 30, 19, 12], wanted)]
        taken = mixed.images[len(real_labels):, 0, 0, 0]
        for c in range(4):  # each class's first k synthetic images, in index order
            assert taken[mixed.labels[len(real_labels):] == c].tolist() == list(
                range(c, 4 * wanted[c], 4))
        record = mixed.counts(names)
        assert record["rule"] == text and record["synthetic_images"] == sum(wanted)
        assert [(e["name"], e["real"], e["synthetic"]) for e in record["per_class"]] == list(
            zip(names, [48, 30, 19, 12], wanted))
    with pytest.raises(RaydiffError, match="--mix add:41 needs 41 synthetic images of class 0 "
                                           "but samples/x hold 40"):
        mix(real, real_labels, synthetic, synthetic_labels, MixRule.parse("add:41"), 4,
            source="samples/x")
    for bad in ("add:0", "add", "topup:3", "half"):
        with pytest.raises(RaydiffError, match=f"--mix '{bad}': expected one of none, add:N"):
            MixRule.parse(bad)


def test_sample_folders_must_match_the_dataset():
    info = DatasetInfo(source="shapes", class_names=("a", "b", "c", "d"),
                       train_counts=(8, 6, 3, 2), reference_counts=(8,) * 4, resolution=16,
                       imbalance_ratio=4.0, seed=0, files={"train": (), "reference": ()})
    manifest = {"identity": {"resolution": 32, "num_classes": 4}}
    with pytest.raises(RaydiffError, match="s/manifest.json: samples are 32 px but data is 16 px"):
        check_samples(manifest, "s/manifest.json", info, "data")
    manifest = {"identity": {"resolution": 16, "num_classes": 3}}
    with pytest.raises(RaydiffError, match="from a 3-class model but data has 4 classes"):
        check_samples(manifest, "s/manifest.json", info, "data")
