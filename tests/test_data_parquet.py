"""Reading a prepared dataset: dataset.json, shard paths, decoding, torch and Ray Data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raydiff.data.dataset import SplitDataset
from raydiff.data.parquet import (
    DatasetInfo,
    decode_batch,
    load_info,
    read_split,
    read_split_arrays,
    split_paths,
)
from raydiff.errors import RaydiffError


def test_info_round_trips_through_json(shapes_dataset):
    info = load_info(shapes_dataset)
    assert DatasetInfo.from_json(info.to_json(), "here") == info
    assert info.num_classes == 4 and info.class_names[:2] == ("circle", "square")
    assert info.counts("reference") == (24,) * 4 and info.num_images("train") == 54
    assert info.build["options"]["images_per_class"] == 24


def test_split_paths_are_the_shards_on_disk(shapes_dataset):
    paths = split_paths(shapes_dataset, "train")
    assert paths == [str(shapes_dataset / "train" / "part-00000.parquet")]
    with pytest.raises(RaydiffError, match="unknown split 'val'"):
        split_paths(shapes_dataset, "val")


def test_file_uris_read_like_local_paths(shapes_dataset):
    uri = shapes_dataset.as_uri()
    assert load_info(uri) == load_info(shapes_dataset)
    assert split_paths(uri, "train")[0].startswith("file://")
    assert read_split(uri, "train").equals(read_split(shapes_dataset, "train"))


def test_rows_are_shuffled_but_counts_hold(shapes_dataset):
    labels = read_split(shapes_dataset, "train", columns=["label"]).column("label").to_numpy()
    assert np.bincount(labels).tolist() == list(load_info(shapes_dataset).train_counts)
    assert not np.all(np.diff(labels) >= 0), "rows should not be sorted by class"


def test_torch_dataset_yields_chw_tensors(shapes_dataset):
    as_float = SplitDataset(shapes_dataset, "train")
    as_uint8 = SplitDataset(shapes_dataset, "train", output="uint8")
    image, label = as_float[0]
    raw, same_label = as_uint8[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert raw.dtype == torch.uint8 and label == same_label and isinstance(label, int)
    assert -1.0 <= image.min() and image.max() <= 1.0
    assert torch.allclose(image, raw.float() / 127.5 - 1)
    images, _ = read_split_arrays(shapes_dataset, "train")
    assert np.array_equal(raw.permute(1, 2, 0).numpy(), images[0])
    assert len(as_float) == 54


def test_missing_or_foreign_dataset_json(tmp_path):
    with pytest.raises(RaydiffError, match="run 'raydiff prepare' first"):
        load_info(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(RaydiffError, match="not a raydiff dataset.json"):
        load_info(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(RaydiffError, match="newer than this raydiff reads"):
        load_info(tmp_path)


def test_ray_data_reads_what_dataset_json_promises(ray_local, shapes_dataset):
    info = load_info(shapes_dataset)
    paths = split_paths(shapes_dataset, "train") + split_paths(shapes_dataset, "reference")
    # One pipeline for both splits (each Ray Data run costs seconds); the path tells them apart.
    ds = ray_local.data.read_parquet(paths, include_paths=True)
    batch = ds.map_batches(decode_batch, batch_format="numpy").take_batch(10_000)
    assert batch["image"].shape[1:] == (32, 32, 3) and batch["image"].dtype == np.uint8
    splits = np.array([Path(p).parent.name for p in batch["path"]])
    for split in ("train", "reference"):
        labels = batch["label"][splits == split]
        assert len(labels) == info.num_images(split)
        assert np.bincount(labels, minlength=info.num_classes).tolist() == list(info.counts(split))
