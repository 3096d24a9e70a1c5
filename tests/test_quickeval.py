"""The in-training evaluation (a search's objective): distances, copy rate and diversity."""

from __future__ import annotations

import numpy as np
import pytest

from raydiff.data import parquet
from raydiff.diffusion import GaussianDiffusion
from raydiff.engine import load_for_sampling
from raydiff.metrics import copy_and_diversity
from raydiff.quickeval import EvalSpec, QuickEval, feature_extractor, reference_stats
from raydiff.samplers import sample_images, to_uint8


def test_quick_evaluation_reports_copy_rate_and_diversity_per_group(tiny_checkpoint,
                                                                    shapes16_tiny):
    model, cfg = load_for_sampling(tiny_checkpoint)
    reference = reference_stats(str(shapes16_tiny), "pixels")
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
    extract = feature_extractor("pixels")
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


def test_copy_metrics_can_be_left_out(shapes16_tiny):
    assert reference_stats(str(shapes16_tiny), "pixels", copying=False).rows is None
