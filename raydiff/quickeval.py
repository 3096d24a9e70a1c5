"""Small in-training evaluation: the objective a hyperparameter search optimises.

Every report of a training run with an ``EvalSpec``, rank 0 samples a small class-balanced
set with the EMA weights (DDIM, or Euler under flow matching; few steps, fixed seeds),
extracts features and computes the Frechet distance to precomputed reference statistics,
overall and per class group (head / body / tail, docs/METHOD.md), and in the same feature
space the copy rate and the diversity of the samples (``raydiff.metrics.copy_and_diversity``:
``copy_rate``, ``diversity`` and their ``_head`` / ``_body`` / ``_tail`` versions). Two feature spaces:

- ``inception``: InceptionV3 pool3 (torch-fidelity's ``inception-v3-compat``), i.e. FID;
  needs the weights file.
- ``pixels``: images area-resized to 8x8, as 192-d vectors in [0, 1]. Needs no download and
  still ranks runs by how well their samples match the class-group statistics; metric names
  are prefixed ``fd_pixels`` so they are never mistaken for FID.

The reference side (``ReferenceStats``) is built from the feature rows of the reference and
training splits that ``raydiff evaluate`` extracts and caches (``reference_features``): one
reference pipeline for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from raydiff.config import Config, SampleConfig
from raydiff.diffusion import make_process
from raydiff.features import Extractor, inception_extractor, pixel_extractor
from raydiff.metrics import GROUPS, FeatureStats, class_groups, copy_and_diversity, fid
from raydiff.samplers import sample_images, to_uint8

FEATURES = ("inception", "pixels")
_EVAL_SEED = 1_000_000  # sample seeds start here: disjoint from preview-grid seeds
# Copy rate and diversity need every training image's feature row on the evaluating worker;
# above this many training images they are left out of the in-training evaluation.
COPY_MAX_TRAIN = 200_000


@dataclass(frozen=True)
class EvalSpec:
    feature: str  # inception | pixels
    per_class: int = 10  # generated images per class at each evaluation
    steps: int = 10  # DDIM steps (Euler steps under flow matching)
    guidance: float = 1.5
    weights: str | None = None  # Inception weights file (feature == "inception")
    weights_sha256: str | None = None  # what its bytes must hash to wherever it is loaded

    @property
    def prefix(self) -> str:
        return "fid" if self.feature == "inception" else "fd_pixels"

    def extractor(self) -> Extractor:
        if self.feature == "pixels":
            return pixel_extractor()
        if self.feature == "inception":
            return inception_extractor(self.weights, download=False, sha256=self.weights_sha256)
        raise ValueError(f"unknown feature space {self.feature!r}; choose one of "
                         f"{', '.join(FEATURES)}")


def group_stats(rows: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, FeatureStats]:
    """FeatureStats of all rows and of each class group."""
    stats = {"all": FeatureStats.of(rows)}
    for g, name in enumerate(GROUPS):
        stats[name] = FeatureStats.of(rows[groups[labels] == g])
    return stats


@dataclass
class ReferenceStats:
    """Feature statistics of the balanced reference split, overall and per class group, and
    for the copy rate and diversity, the feature rows of both splits (float32)."""

    feature: str
    stats: dict[str, FeatureStats]
    groups: np.ndarray  # group index per class
    rows: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # split -> (rows, labels)

    @classmethod
    def of(cls, feature: str, train_counts: Sequence[int], rows: np.ndarray,
           labels: np.ndarray, train: tuple[np.ndarray, np.ndarray] | None = None
           ) -> ReferenceStats:
        """From the reference split's feature rows and labels; with ``train`` (the training
        split's rows and labels), what the copy rate and diversity need."""
        groups = class_groups(train_counts)
        copy_rows = None
        if train is not None:
            copy_rows = {"reference": (rows.astype(np.float32), labels),
                         "train": (train[0].astype(np.float32), train[1])}
        return cls(feature, group_stats(rows.astype(np.float64), labels, groups), groups,
                   copy_rows)


class QuickEval:
    """Built once per run on rank 0; called at every report with the EMA model."""

    def __init__(self, spec: EvalSpec, reference: ReferenceStats,
                 device: str | torch.device = "cpu", codec=None):
        if reference.feature != spec.feature:
            raise ValueError(f"reference statistics are {reference.feature} features, "
                             f"the evaluation extracts {spec.feature}")
        self.spec = spec
        self.reference, self.groups = reference.stats, reference.groups
        self.rows = reference.rows
        self.codec = codec  # a raydiff.vae.LatentCodec for a latent-space model, else None
        network = spec.extractor().load(device)
        self.extract = lambda images: network(images)[0].astype(np.float64)

    def __call__(self, model: torch.nn.Module, cfg: Config) -> dict[str, float]:
        num_classes = cfg.model.num_classes
        labels = np.repeat(np.arange(num_classes), self.spec.per_class)
        seeds = _EVAL_SEED + np.arange(len(labels))
        # deterministic and one network call a step: DDIM, or Euler under flow matching
        sampler = "euler" if cfg.diffusion.process == "flow" else "ddim"
        sample_cfg = SampleConfig(sampler=sampler, steps=self.spec.steps, eta=0.0,
                                  guidance=self.spec.guidance)
        x = sample_images(model, make_process(cfg.diffusion), labels.tolist(), seeds.tolist(),
                          sample_cfg, clamp=self.codec is None)
        images = to_uint8(x) if self.codec is None else self.codec.decode(x)
        rows = self.extract(images)
        generated = group_stats(rows, labels, self.groups)
        prefix = self.spec.prefix
        out = {prefix: fid(generated["all"], self.reference["all"])}
        out.update({f"{prefix}_{g}": fid(generated[g], self.reference[g]) for g in GROUPS})
        if self.rows is not None:
            (ref, ref_labels), (train, train_labels) = self.rows["reference"], self.rows["train"]
            sets = {"": range(num_classes), **{f"_{g}": np.flatnonzero(self.groups == i)
                                               for i, g in enumerate(GROUPS)}}
            gen = rows.astype(np.float32)
            for suffix, classes in sets.items():
                values = copy_and_diversity(gen, labels, train,
                                            train_labels, ref, ref_labels, list(classes))
                out.update({f"{name}{suffix}": v for name, v in values.items()})
        return out
