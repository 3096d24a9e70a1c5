"""Bad input: one clear error line naming the file, line or value; exit 2; nothing left behind."""

from __future__ import annotations

import os

import numpy as np
import pytest

from raydiff.cli import main


@pytest.fixture
def work(tmp_path):
    """An empty folder to put --out in; after a failure it must still be empty."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def fails(capsys, work, *args: str, workers: int = 1) -> str:
    """Run prepare, check the failure contract, and return the error message."""
    code = main(["prepare", *args, "--out", str(work / "out"), "--processes", str(workers)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("raydiff: error: ")
    assert list(work.iterdir()) == [], "partial output or a temporary sibling was left"
    return lines[0]


def test_missing_root(capsys, work, tmp_path):
    missing = tmp_path / "nowhere"
    assert str(missing) in fails(capsys, work, "cifar10", "--root", str(missing))


def test_root_without_cifar_files(capsys, work, tmp_path):
    message = fails(capsys, work, "cifar10", "--root", str(tmp_path))
    assert "cifar-10-batches-py/batches.meta" in message


def test_cifar_label_out_of_range(capsys, work, tmp_path, make_cifar):
    labels = np.repeat(np.arange(10), 3)
    labels[4] = 10
    make_cifar(tmp_path / "src", "cifar10", labels, np.arange(10))
    message = fails(capsys, work, "cifar10", "--root", str(tmp_path / "src"))
    assert "data_batch_1" in message and "label 10" in message and "0..9" in message


def _edit_list(root, name, line_number, new_text):
    path = root / name
    lines = path.read_text().splitlines()
    lines[line_number - 1] = new_text
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_image_named_in_a_list(capsys, work, imagenet_lt_root, workers):
    (imagenet_lt_root / "train/n01443537/n01443537_1.JPEG").write_bytes(b"not a jpeg at all")
    args = ["imagenet-lt", "--root", str(imagenet_lt_root), "--num-classes", "3"]
    message = fails(capsys, work, *args, workers=workers)
    assert "ImageNet_LT_train.txt:7" in message and "n01443537_1.JPEG" in message


def test_missing_image_named_in_a_list(capsys, work, imagenet_lt_root):
    _edit_list(imagenet_lt_root, "ImageNet_LT_val.txt", 3, "val/gone.png 1")
    message = fails(capsys, work, "imagenet-lt", "--root", str(imagenet_lt_root),
                    "--num-classes", "3")  # fmt: skip
    assert "ImageNet_LT_val.txt:3" in message and "gone.png does not exist" in message


@pytest.mark.parametrize(
    "line, expected",
    [("train/x.JPEG 3", "label 3 is out of range 0..2"),
     ("train/x.JPEG -1", "label -1 is out of range"),
     ("train/x.JPEG three", "label 'three' is not an integer"),
     ("train/x.JPEG", "expected 'relative/path.jpg label'")],
)  # fmt: skip
def test_bad_list_lines(capsys, work, imagenet_lt_root, line, expected):
    _edit_list(imagenet_lt_root, "ImageNet_LT_train.txt", 2, line)
    message = fails(capsys, work, "imagenet-lt", "--root", str(imagenet_lt_root),
                    "--num-classes", "3")  # fmt: skip
    assert "ImageNet_LT_train.txt:2:" in message and expected in message


def test_empty_class_in_a_list(capsys, work, imagenet_lt_root):
    message = fails(capsys, work, "imagenet-lt", "--root", str(imagenet_lt_root),
                    "--num-classes", "4")  # fmt: skip
    assert "ImageNet_LT_train.txt" in message and "class 3" in message and "no images" in message


def test_empty_class_folder(capsys, work, image_tree):
    (image_tree / "fox").mkdir()
    message = fails(capsys, work, "imagefolder", "--root", str(image_tree),
                    "--imbalance-ratio", "2")  # fmt: skip
    assert str(image_tree / "fox") in message and "no images" in message


def test_non_existent_split_file(capsys, work, imagenet_lt_root):
    missing = imagenet_lt_root / "ImageNet_LT_nope.txt"
    message = fails(capsys, work, "imagenet-lt", "--root", str(imagenet_lt_root),
                    "--train-list", str(missing))  # fmt: skip
    assert f"split list {missing} does not exist" in message


def test_default_reference_list_missing(capsys, work, imagenet_lt_root):
    message = fails(capsys, work, "imagenet-lt", "--root", str(imagenet_lt_root),
                    "--reference-from", "test")  # fmt: skip
    assert "ImageNet_LT_test.txt does not exist" in message and "--reference-list" in message


def test_option_that_does_not_apply(capsys, work):
    message = fails(capsys, work, "shapes", "--train-list", "x.txt")
    assert "--train-list does not apply to source shapes" in message


def test_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"
    code = main(["prepare", "shapes", "--out", str(out), "--images-per-class", "10"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and str(out) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_parent(capsys, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    code = main(["prepare", "shapes", "--out", str(parent / "out"), "--images-per-class", "10"])
    assert code == 2 and len(capsys.readouterr().err.splitlines()) == 1
    assert list(parent.iterdir()) == []


def test_existing_output_is_refused_then_replaced_with_overwrite(capsys, tmp_path):
    out = tmp_path / "out"
    args = ["prepare", "shapes", "--out", str(out), "--num-classes", "2",
            "--images-per-class", "10", "--processes", "1"]  # fmt: skip
    assert main(args) == 0
    assert main(args) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    assert '"seed": 1' in (out / "dataset.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_never_replaces_a_folder_that_is_not_a_dataset(capsys, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("...")
    code = main(["prepare", "shapes", "--out", str(out), "--overwrite"])
    assert code == 2 and "not a prepared dataset" in capsys.readouterr().err
    assert (out / "thesis.tex").exists()


def test_truncated_cifar_pickle(capsys, work, tmp_path, make_cifar):
    folder = make_cifar(tmp_path / "src", "cifar10", np.repeat(np.arange(10), 3), np.arange(10))
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    message = fails(capsys, work, "cifar10", "--root", str(tmp_path / "src"))
    assert f"{batch}: not a CIFAR pickle" in message
