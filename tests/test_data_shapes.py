"""The built-in shapes dataset: deterministic, varied within a class, distinct across classes."""

from __future__ import annotations

import numpy as np
import pytest

from raydiff.data.longtail import exponential_counts
from raydiff.data.parquet import load_info, read_split_arrays
from raydiff.data.shapes import SHAPE_NAMES, build_shapes, make_shapes, render
from raydiff.errors import RaydiffError


def test_make_shapes_returns_uint8_nhwc_and_balanced_labels():
    images, labels = make_shapes(images_per_class=3, num_classes=5, resolution=24)
    assert images.shape == (15, 24, 24, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [3] * 5


def test_images_depend_only_on_seed_class_and_index():
    first = render([2, 2, 7], resolution=16, seed=3)
    again = render([7, 2], indices=[0, 1], resolution=16, seed=3)
    assert np.array_equal(first[2], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first, render([2, 2, 7], resolution=16, seed=4))


def test_a_class_varies_more_than_a_collapsed_copy():
    images, labels = make_shapes(images_per_class=40, num_classes=len(SHAPE_NAMES))
    pixels = images.reshape(len(images), -1).astype(np.float32)
    for c in range(len(SHAPE_NAMES)):
        members = pixels[labels == c]
        # Spread across a class's images, per pixel: zero for a collapsed class.
        assert members.std(axis=0).mean() > 20, SHAPE_NAMES[c]
        assert len(np.unique(members, axis=0)) == len(members)


def _radial_profile(images: np.ndarray) -> np.ndarray:
    """How the object's area spreads with distance from its centroid (scaled by its size).

    Invariant to where the object is, how large, how turned and what colour: it sees shape only.
    The object is bright and the background dark (see shapes._colours), so a threshold finds it.
    """
    masks = (images.max(axis=-1) > 150).astype(np.float64)
    yy, xx = np.mgrid[: masks.shape[1], : masks.shape[2]]
    profiles = []
    for mask in masks:
        area = mask.sum() + 1e-6
        cy, cx = (mask * yy).sum() / area, (mask * xx).sum() / area
        radius = np.hypot(yy - cy, xx - cx) / np.sqrt(area)
        histogram, _ = np.histogram(radius, bins=8, range=(0, 1.6), weights=mask)
        profiles.append(histogram / area)
    return np.array(profiles)


def test_classes_differ_in_shape_not_only_in_colour():
    images, labels = make_shapes(images_per_class=60, num_classes=len(SHAPE_NAMES), seed=1)
    features = _radial_profile(images)
    centroids = np.stack([features[labels == c].mean(axis=0) for c in range(len(SHAPE_NAMES))])
    nearest = np.argmin(((features[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    # Nearest class mean on this crude feature: about 0.65 when written, chance is 1/12.
    assert (nearest == labels).mean() > 0.5


def test_build_shapes_cuts_the_default_profile():
    built = build_shapes(num_classes=4, images_per_class=30, imbalance_ratio=10, seed=0)
    assert built.train.counts(4) == exponential_counts(30, 4, 10)
    assert built.reference.counts(4) == [30] * 4
    assert built.class_names == list(SHAPE_NAMES[:4])
    assert built.train.sources[0].startswith("circle/")


def test_prepared_shapes_fixture_is_readable(shapes_dataset):
    info = load_info(shapes_dataset)
    assert info.source == "shapes" and info.train_counts == (24, 15, 9, 6)
    images, labels = read_split_arrays(shapes_dataset, "reference")
    assert images.shape == (96, 32, 32, 3) and np.bincount(labels).tolist() == [24] * 4


@pytest.mark.parametrize("num_classes", [0, len(SHAPE_NAMES) + 1])
def test_too_many_or_too_few_classes(num_classes):
    with pytest.raises(RaydiffError, match="--num-classes"):
        make_shapes(2, num_classes)
