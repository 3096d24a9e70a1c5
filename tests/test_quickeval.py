"""The in-training evaluation (a search's objective): distances, copy rate and diversity."""

from __future__ import annotations

import numpy as np
import pytest

from raydiff.data import parquet
from raydiff.diffusion import GaussianDiffusion
from raydiff.engine import load_for_sampling
from raydiff.features import pixel_extractor
from raydiff.metrics import copy_and_diversity
from raydiff.quickeval import EvalSpec, QuickEval, ReferenceStats
from raydiff.samplers import sample_images, to_uint8


def _extract(images: np.ndarray) -> np.ndarray:
    return pixel_extractor().load()(images)[0]


def _reference(dataset, copying: bool = True) -> ReferenceStats:
    """The reference side as a search builds it, from rows extracted here instead of by
    ``raydiff evaluate``'s Ray Data pipeline."""
    info = parquet.load_info(dataset)
    images, labels = parquet.read_split_arrays(dataset, "reference")
    train = None
    if copying:
        train_images, train_labels = parquet.read_split_arrays(dataset, "train")
        train = (_extract(train_images), train_labels)
    return ReferenceStats.of("pixels", info.counts("train"), _extract(images), labels, train)


def test_quick_evaluation_reports_copy_rate_and_diversity_per_group(tiny_checkpoint,
                                                                    shapes16_tiny):
    model, cfg = load_for_sampling(tiny_checkpoint)
    reference = _reference(shapes16_tiny)
    spec = EvalSpec(feature="pixels", per_class=3, steps=2, guidance=1.0)
    out = QuickEval(spec, reference)(model, cfg)
    groups = ("", "_head", "_body", "_tail")
    assert {f"{m}{g}" for m in ("fd_pixels", "copy_rate", "diversity") for g in groups} \
        <= set(out)

    # the same numbers from the same samples, drawn and measured here
    labels = np.repeat(np.arange(4), 3)
    sampler = cfg.sample.__class__(sampler="ddim", steps=2, eta=0.0, guidance=1.0)
    images = to_uint8(sample_images(model, GaussianDiffusion(cfg.diffusion), labels.tolist(),
                                    (1_000_000 + np.arange(12)).tolist(), sampler))
    extract = _extract
    rows = extract(images).astype(np.float32)
    ref_images, ref_labels = parquet.read_split_arrays(shapes16_tiny, "reference")
    train_images, train_labels = parquet.read_split_arrays(shapes16_tiny, "train")
    # shapes16_tiny trains on 8, 6, 3, 2 images: the tail third is class 3
    for suffix, classes in (("", [0, 1, 2, 3]), ("_tail", [3])):
        expected = copy_and_diversity(rows, labels, extract(train_images).astype(np.float32),
                                      train_labels, extract(ref_images).astype(np.float32),
                                      ref_labels, classes)
        assert out[f"copy_rate{suffix}"] == pytest.approx(expected["copy_rate"])
        assert out[f"diversity{suffix}"] == pytest.approx(expected["diversity"], rel=1e-5)
    assert 0.0 <= out["copy_rate"] <= 1.0 and out["diversity"] > 0


def test_copy_metrics_can_be_left_out(tiny_checkpoint, shapes16_tiny):
    model, cfg = load_for_sampling(tiny_checkpoint)
    spec = EvalSpec(feature="pixels", per_class=2, steps=2, guidance=1.0)
    out = QuickEval(spec, _reference(shapes16_tiny, copying=False))(model, cfg)
    assert "fd_pixels_tail" in out and not any(k.startswith(("copy_rate", "diversity"))
                                               for k in out)
