"""List-file sources (ImageNet-LT, Places-LT) and class-per-folder trees."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raydiff.cli import main
from raydiff.data.images import center_crop_resize, decode_png, encode_png
from raydiff.data.parquet import load_info, read_split, read_split_arrays


def prepare(*args: str, workers: int = 1) -> int:
    return main(["prepare", *args, "--processes", str(workers)])


def test_imagenet_lt_from_the_standard_lists(imagenet_lt_root, tmp_path):
    out = tmp_path / "out"
    assert prepare("imagenet-lt", "--root", str(imagenet_lt_root), "--out", str(out),
                   "--num-classes", "3", "--resolution", "16") == 0  # fmt: skip
    info = load_info(out)
    assert info.train_counts == (5, 3, 2) and info.reference_counts == (2, 2, 2)
    assert info.class_names == ("n01440764", "n01443537", "n01484850")
    assert info.imbalance_ratio is None and info.resolution == 16
    images, labels = read_split_arrays(out, "train")
    assert images.shape == (10, 16, 16, 3)
    sources = read_split(out, "train", columns=["source"]).column("source").to_pylist()
    assert sorted(sources)[0] == "train/n01440764/n01440764_0.JPEG"
    for image, label in zip(images, labels):  # solid colours survive crop, resize and JPEG
        assert np.abs(image.astype(int) - (80 * label, 255 - 80 * label, 128)).max() <= 3


def test_worker_processes_write_the_same_dataset(imagenet_lt_root, tmp_path):
    tables = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        assert prepare("imagenet-lt", "--root", str(imagenet_lt_root), "--out", str(out),
                       "--num-classes", "3", workers=workers) == 0  # fmt: skip
        tables.append(read_split(out, "train"))
    assert tables[0].equals(tables[1])


def test_places_lt_lists_given_explicitly(imagenet_lt_root, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    train = lists / "Places_LT_train.txt"
    train.write_text("/" + (imagenet_lt_root / "ImageNet_LT_train.txt").read_text())
    test = lists / "Places_LT_test.txt"
    test.write_text((imagenet_lt_root / "ImageNet_LT_val.txt").read_text())
    out = tmp_path / "out"
    assert prepare("places-lt", "--root", str(imagenet_lt_root), "--out", str(out),
                   "--train-list", str(train), "--reference-list", str(test),
                   "--num-classes", "3") == 0  # fmt: skip
    assert load_info(out).train_counts == (5, 3, 2)
    assert load_info(out).resolution == 64


def test_center_crop_keeps_the_middle_square():
    wide = np.zeros((40, 60, 3), np.uint8)
    wide[:, :10] = (0, 0, 255)
    wide[:, 50:] = (0, 0, 255)
    wide[:, 10:50] = (255, 0, 0)
    small = np.asarray(center_crop_resize(Image.fromarray(wide), 8))
    assert small.shape == (8, 8, 3)
    assert (small[..., 0] == 255).all() and (small[..., 2] == 0).all()


def test_png_round_trip_is_exact():
    image = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(image)), image)
    with Image.open(io.BytesIO(encode_png(image))) as reread:  # a standard reader agrees
        assert reread.format == "PNG" and np.array_equal(np.asarray(reread), image)


def test_imagefolder_cut_to_a_long_tail(image_tree, tmp_path):
    out = tmp_path / "out"
    assert prepare("imagefolder", "--root", str(image_tree), "--out", str(out),
                   "--imbalance-ratio", "4", "--resolution", "8") == 0  # fmt: skip
    info = load_info(out)
    assert info.class_names == ("cat", "dog", "emu")
    assert info.train_counts == (8, 4, 2)  # int(8 * (1/4) ** (c / 2))
    assert info.reference_counts == (8, 8, 8)  # the whole tree
    sources = read_split(out, "train", columns=["source"]).column("source").to_pylist()
    assert "cat/images/cat_0.png" in sources


def test_imagefolder_with_a_reference_tree(image_tree, tmp_path):
    out = tmp_path / "out"
    assert prepare("imagefolder", "--root", str(image_tree), "--out", str(out),
                   "--images-per-class", "5", "--reference-root", str(image_tree)) == 0  # fmt: skip
    info = load_info(out)
    assert info.train_counts == (5, 5, 5) and info.reference_counts == (8, 8, 8)
    assert info.imbalance_ratio == 1.0


@pytest.mark.parametrize("extra", [[], ["--reference-root", "{tree}"]])
def test_imagefolder_without_a_cut(image_tree, tmp_path, capsys, extra):
    out = tmp_path / "out"
    args = [a.format(tree=image_tree) for a in extra]
    code = prepare("imagefolder", "--root", str(image_tree), "--out", str(out), *args)
    if extra:
        assert code == 0 and load_info(out).train_counts == (8, 8, 8)
    else:
        assert code == 2 and "--reference-root" in capsys.readouterr().err
