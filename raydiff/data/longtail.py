"""The exponential long-tail profile, its selection rule, and the rows of a split before encoding.

Every builder (CIFAR, ImageFolder, shapes) cuts its long-tailed training split with the two
functions here, so the same ``--imbalance-ratio`` and ``--seed`` mean the same thing for every
source, and CIFAR-LT matches the released LDAM-DRW / CBDM / CCUA code index for index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from raydiff.errors import RaydiffError

#: Rows handed to one encode task; small enough to balance work across processes even when
#: each row is a large JPEG, large enough that task overhead stays negligible.
DEFAULT_CHUNK_ROWS = 256


def exponential_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Per-class image counts n_c = int(n_max * (1/IR)^(c/(C-1))), class 0 largest.

    Written exactly as ``get_img_num_per_cls`` of the released code (``img_max * imb_factor **
    (cls_idx / (cls_num - 1.0))`` with ``imb_factor = 1/IR``): the floating-point order of
    operations decides ``int()`` at the boundaries, and CIFAR-10-LT must come out as
    5000, 2997, ..., 50.
    """
    if n_max < 1:
        raise RaydiffError(f"images per class must be at least 1, got {n_max}")
    if num_classes < 1:
        raise RaydiffError(f"number of classes must be at least 1, got {num_classes}")
    if not imbalance_ratio >= 1.0:
        raise RaydiffError(f"--imbalance-ratio must be >= 1, got {imbalance_ratio}")
    if num_classes == 1:
        return [int(n_max)]
    imb_factor = 1.0 / imbalance_ratio
    return [int(float(n_max) * imb_factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def select_long_tail(labels: np.ndarray, counts: Sequence[int], seed: int) -> np.ndarray:
    """Indices of the kept rows: per class in order, shuffle its indices, keep the first n_c.

    ``np.random.RandomState(seed)`` shuffling class after class is the same stream as the
    released code's ``np.random.seed(0)`` followed by ``np.random.shuffle`` per class, so the
    selected images are identical. A class with fewer than n_c images keeps all of them.
    The result is sorted, so rows keep the order of the source.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.RandomState(seed)
    kept = []
    for c, n_c in enumerate(counts):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        kept.append(idx[: int(n_c)])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Images per class, for dataset.json and for checking that no class is empty."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


@dataclass(frozen=True)
class SplitPlan:
    """The rows of one split before encoding: labels, provenance, and where the pixels are.

    Exactly one of ``images`` (uint8 NHWC already in memory: CIFAR, shapes) or ``files``
    (``(path, origin)`` pairs to decode, where ``origin`` names the list file and line or the
    folder that asked for the image, for error messages) is set.
    """

    labels: np.ndarray
    sources: list[str]
    images: np.ndarray | None = None
    files: list[tuple[str, str]] | None = None

    def __post_init__(self) -> None:
        if (self.images is None) == (self.files is None):
            raise ValueError("a SplitPlan holds either in-memory images or files, not both")
        n = len(self.labels)
        held = len(self.images) if self.images is not None else len(self.files)
        if len(self.sources) != n or held != n:
            raise ValueError(f"labels ({n}), sources and pixels ({held}) differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> SplitPlan:
        """The plan restricted to (and reordered by) ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        return SplitPlan(
            labels=np.asarray(self.labels, dtype=np.int64)[rows],
            sources=[self.sources[i] for i in rows],
            images=None if self.images is None else self.images[rows],
            files=None if self.files is None else [self.files[i] for i in rows],
        )

    def chunks(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[SplitPlan]:
        """Consecutive pieces of at most ``chunk_rows`` rows, in order."""
        for start in range(0, len(self), chunk_rows):
            yield self.take(np.arange(start, min(start + chunk_rows, len(self))))

    def counts(self, num_classes: int) -> list[int]:
        return class_counts(self.labels, num_classes)


@dataclass(frozen=True)
class BuiltSource:
    """What a source builder hands to ``prepare``: both splits plus what dataset.json records.

    ``build`` describes how the splits were made (profile, n_max, selection rule, reference
    choice, input files) in plain JSON values, so a dataset.json can be reproduced by reading it.
    """

    source: str
    class_names: list[str]
    train: SplitPlan
    reference: SplitPlan
    imbalance_ratio: float | None
    build: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_classes(self, train_where: str, reference_where: str) -> None:
        """Refuse a split with an empty class: training and per-class FID both need every class.

        ``*_where`` name the file or folder the split came from, to lead the error message.
        """
        for split_name, plan, where in (
            ("train", self.train, train_where),
            ("reference", self.reference, reference_where),
        ):
            for c, n in enumerate(plan.counts(self.num_classes)):
                if n == 0:
                    raise RaydiffError(
                        f"{where}: class {c} ({self.class_names[c]!r}) has no images in the "
                        f"{split_name} split"
                    )


def cut_long_tail(
    plan: SplitPlan, num_classes: int, imbalance_ratio: float, n_max: int, seed: int
) -> tuple[SplitPlan, list[int]]:
    """The long-tailed subset of a (roughly balanced) plan and the profile it asked for.

    Classes are ranked by index (class 0 keeps the most); a class with fewer images than its
    n_c keeps all it has, so the kept counts are min(available, n_c).
    """
    profile = exponential_counts(n_max, num_classes, imbalance_ratio)
    if profile[-1] < 1:
        raise RaydiffError(
            f"--imbalance-ratio {imbalance_ratio} with {n_max} images for the largest class "
            f"leaves class {num_classes - 1} empty; lower the ratio or raise --images-per-class"
        )
    return plan.take(select_long_tail(plan.labels, profile, seed)), profile
