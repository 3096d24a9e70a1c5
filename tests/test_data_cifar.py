"""CIFAR-LT from torchvision-layout pickle folders: counts, selection, round trip, safety."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from raydiff.cli import main
from raydiff.data.cifar import CIFAR_ROW_BYTES, load_cifar, load_pickle
from raydiff.data.parquet import load_info, read_split, read_split_arrays
from raydiff.errors import RaydiffError


def prepare(*args: str) -> int:
    return main(["prepare", *args, "--processes", "1"])


# Published per-class counts of CIFAR-10-LT at imbalance 100 (LDAM-DRW, CBDM, CCUA).
CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.fixture(scope="module")
def cifar10_lt(cifar10_full, tmp_path_factory):
    """CIFAR-10-LT (IR 100) prepared once from the full-size fixture, test set as reference."""
    out = tmp_path_factory.mktemp("c10") / "cifar10-lt"
    root = str(cifar10_full)
    assert prepare("cifar10", "--root", root, "--out", str(out), "--reference-from", "test") == 0
    return out


def test_cifar10_lt_has_the_published_counts(cifar10_lt):
    info = load_info(cifar10_lt)
    assert list(info.train_counts) == CIFAR10_LT_100
    assert info.num_images("train") == 12406
    assert info.reference_counts == (3,) * 10
    assert info.class_names == tuple(f"class{c}" for c in range(10))
    assert (info.resolution, info.imbalance_ratio, info.seed) == (32, 100.0, 0)
    raw = json.loads((cifar10_lt / "dataset.json").read_text())
    assert raw["format_version"] == 1 and raw["build"]["n_max"] == 5000
    assert raw["splits"]["train"]["num_images"] == 12406


def test_cifar10_lt_keeps_the_images_the_released_code_keeps(
    cifar10_lt, cifar10_full, released_selection
):
    targets = load_cifar(cifar10_full / "cifar-10-batches-py", "cifar10", "train").labels
    expected = released_selection(targets, CIFAR10_LT_100, seed=0)
    table = read_split(cifar10_lt, "train", columns=["source", "label"])
    indices = np.array([int(s.split(":")[1]) for s in table.column("source").to_pylist()])
    assert np.array_equal(np.sort(indices), expected)
    assert np.array_equal(table.column("label").to_numpy(), targets[indices])


def test_cifar100_lt_total(cifar100_full, tmp_path):
    out = tmp_path / "c100"
    root = str(cifar100_full / "cifar-100-python")  # --root may name the folder itself
    assert prepare("cifar100", "--root", root, "--out", str(out), "--reference-from", "test") == 0
    info = load_info(out)
    assert info.num_images("train") == 10847
    assert (info.train_counts[0], info.train_counts[-1]) == (500, 5)
    assert info.num_classes == 100 and info.num_images("reference") == 100


def test_images_and_labels_survive_the_round_trip(make_cifar, tmp_path):
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), 20))
    folder = make_cifar(tmp_path / "src", "cifar10", labels, np.arange(10), seed=5)
    out = tmp_path / "out"
    assert prepare("cifar10", "--root", str(tmp_path / "src"), "--out", str(out),
                   "--imbalance-ratio", "10", "--rows-per-shard", "64") == 0  # fmt: skip
    full = load_cifar(folder, "cifar10", "train")
    for split in ("train", "reference"):
        images, stored_labels = read_split_arrays(out, split)
        sources = read_split(out, split, columns=["source"]).column("source").to_pylist()
        index = np.array([int(s.split(":")[1]) for s in sources])
        assert np.array_equal(images, full.images[index])
        assert np.array_equal(stored_labels, labels[index])
    assert load_info(out).num_images("reference") == 200  # full balanced training set
    assert len(load_info(out).files["reference"]) == 4  # 200 rows in shards of 64


def test_resized_cifar_is_the_same_with_worker_processes(make_cifar, tmp_path):
    make_cifar(tmp_path / "src", "cifar10", np.repeat(np.arange(10), 10), np.arange(10))
    tables = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        assert main(["prepare", "cifar10", "--root", str(tmp_path / "src"), "--out", str(out),
                     "--imbalance-ratio", "5", "--resolution", "40",
                     "--processes", workers]) == 0  # fmt: skip
        tables.append(read_split(out, "reference"))
    assert tables[0].equals(tables[1])
    images, _ = read_split_arrays(tmp_path / "out2", "train")
    assert images.shape == (46, 40, 40, 3)


def test_pixels_are_unpacked_as_torchvision_does(make_cifar, tmp_path):
    folder = make_cifar(tmp_path, "cifar10", np.arange(10), np.arange(10))
    raw = load_pickle(folder / "data_batch_1")[b"data"]
    images = load_cifar(folder, "cifar10", "train").images
    # torchvision: data.reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
    assert np.array_equal(images[:2], raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert raw.shape[1] == CIFAR_ROW_BYTES


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_cannot_run_code(tmp_path):
    marker = tmp_path / "owned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Exploit(marker)}, protocol=2))
    with pytest.raises(RaydiffError, match="refusing to load"):
        load_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_of_any_protocol_load(tmp_path, protocol):
    data = np.arange(12, dtype=np.uint8).reshape(2, 6)
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": data, "labels": [1, 2]}, protocol=protocol))
    loaded = load_pickle(path)
    assert np.array_equal(loaded[b"data"], data) and loaded[b"labels"] == [1, 2]
