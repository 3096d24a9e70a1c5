"""Shared fixtures: a local Ray instance, CIFAR-format files, and a small prepared dataset.

Nothing here downloads: CIFAR fixtures are written in the exact pickle layout torchvision
downloads (same file names, keys and dtypes), with synthetic pixels.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CIFAR_ROW_BYTES = 3 * 32 * 32


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (4 logical CPUs on a 2-core box).

    Starting Ray takes seconds, so every test that needs it shares this one; it is shut down
    when the session ends.
    """
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _cifar_pixels(n: int, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).bytes(n * CIFAR_ROW_BYTES)
    return np.frombuffer(noise, np.uint8).reshape(n, CIFAR_ROW_BYTES)


def _dump(path: Path, obj: dict) -> None:
    # Protocol 2, as the real (Python 2 cPickle) files; keys and names are bytes as there.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


_LAYOUTS = {
    # name: (folder, label key, names key, classes, train files, test file, meta file)
    "cifar10": ("cifar-10-batches-py", b"labels", b"label_names", 10,
                [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"),
    "cifar100": ("cifar-100-python", b"fine_labels", b"fine_label_names", 100,
                 ["train"], "test", "meta"),
}  # fmt: skip


def write_cifar(
    root: Path, name: str, train_labels: np.ndarray, test_labels: np.ndarray, seed: int = 0
) -> Path:
    """Write a CIFAR-10 (5 train batches) or CIFAR-100 folder under ``root``; returns it."""
    layout = _LAYOUTS[name]
    folder_name, label_key, names_key, num_classes, train_files, test_file, meta_file = layout
    folder = root / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    pixels = _cifar_pixels(len(train_labels), seed)
    batches = np.array_split(np.arange(len(train_labels)), len(train_files))
    for file_name, rows in zip(train_files, batches):
        batch = {b"batch_label": file_name.encode(), label_key: train_labels[rows].tolist()}
        _dump(folder / file_name, {**batch, b"data": pixels[rows]})
    test = {b"batch_label": b"test", label_key: np.asarray(test_labels).tolist()}
    _dump(folder / test_file, {**test, b"data": _cifar_pixels(len(test_labels), seed + 1)})
    _dump(folder / meta_file, {names_key: [f"class{c}".encode() for c in range(num_classes)]})
    return folder


@pytest.fixture
def make_cifar():
    """``write_cifar`` for tests that need their own small CIFAR folder."""
    return write_cifar


def cifar_full_labels(num_classes: int, train_total: int = 50000, seed: int = 0) -> np.ndarray:
    """Balanced labels in a shuffled order, as in the real training batches."""
    labels = np.repeat(np.arange(num_classes), train_total // num_classes)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _released_selection(targets: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """LDAM-DRW's ``IMBALANCECIFAR10.gen_imbalanced_data`` restated, global numpy RNG and all.

    The released code seeds with ``np.random.seed(rand_number)`` (0) in ``__init__`` and then
    shuffles each class's indices in class order; returns the kept indices, sorted.
    """
    np.random.seed(seed)
    kept = []
    for the_class, the_img_num in zip(np.unique(targets), counts):
        idx = np.where(targets == the_class)[0]
        np.random.shuffle(idx)
        kept.extend(idx[:the_img_num].tolist())
    return np.sort(np.array(kept))


@pytest.fixture
def released_selection():
    """The released code's selection rule, as an independent oracle for ours."""
    return _released_selection


@pytest.fixture(scope="session")
def cifar10_full(tmp_path_factory) -> Path:
    """A CIFAR-10 root with the full 50,000-image training layout and a small test batch."""
    root = tmp_path_factory.mktemp("cifar10_full")
    test_labels = np.repeat(np.arange(10), 3)
    write_cifar(root, "cifar10", cifar_full_labels(10), test_labels)
    return root


@pytest.fixture(scope="session")
def cifar100_full(tmp_path_factory) -> Path:
    """A CIFAR-100 root with the full 50,000-image training layout and a small test file."""
    root = tmp_path_factory.mktemp("cifar100_full")
    write_cifar(root, "cifar100", cifar_full_labels(100), np.arange(100))
    return root


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> Path:
    """A tiny prepared shapes dataset (4 classes, 24 .. 6 training images) for any test."""
    from raydiff.data.prepare import PrepareOptions, prepare_dataset

    out = tmp_path_factory.mktemp("shapes") / "shapes-lt"
    options = PrepareOptions(
        source="shapes", out=out, num_classes=4, images_per_class=24, imbalance_ratio=4.0
    )
    prepare_dataset(options)
    return out


def _write_photo(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def imagenet_lt_root(tmp_path) -> Path:
    """An ImageNet-LT-shaped root: 3 classes with 5, 3, 2 training JPEGs, 2 val images each.

    List files carry the standard names and live in the root; images vary in size and aspect,
    so cropping and resizing are exercised. Training images sit in per-class folders (their
    names become the class names); val images sit in one flat folder, as in ImageNet.
    """
    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537", "n01484850"]
    train_lines, val_lines = [], []
    for label, (wnid, count) in enumerate(zip(wnids, (5, 3, 2))):
        colour = (80 * label, 255 - 80 * label, 128)
        for i in range(count):
            relative = f"train/{wnid}/{wnid}_{i}.JPEG"
            _write_photo(root / relative, (40 + 7 * i, 30 + 5 * label), colour)
            train_lines.append(f"{relative} {label}")
        for i in range(2):
            relative = f"val/ILSVRC2012_val_{label}{i}.png"
            _write_photo(root / relative, (33, 47), colour)
            val_lines.append(f"{relative} {label}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "ImageNet_LT_val.txt").write_text("\n".join(val_lines) + "\n")
    return root


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """A class-per-folder tree: 3 classes with 8 PNGs each (nested, as TinyImageNet's train)."""
    root = tmp_path / "tree"
    for label, name in enumerate(["cat", "dog", "emu"]):
        for i in range(8):
            colour = (30 * i, 80 * label, 200)
            _write_photo(root / name / "images" / f"{name}_{i}.png", (24, 20), colour)
    (root / "cat" / "cat_boxes.txt").write_text("not an image\n")
    return root
