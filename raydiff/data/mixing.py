"""Real training images plus balanced synthetic ones: which, and how many per class.

A mixing rule says how many synthetic images each class gets on top of its real ones:

- ``add:N``: N per class, whatever the class's real count;
- ``topup``: every class up to the head count, n_max - n_c synthetic images for class c (the
  head class gets none), so the mixed set is balanced;
- ``none``: real images only.

Synthetic images come from ``raydiff sample`` folders, in index order: class c takes its first
k images across the folders in the order given, so the same folders and rule give the same
set. ``MixedSet.counts`` is the record of what was mixed. Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raydiff.data.parquet import DatasetInfo
from raydiff.errors import RaydiffError

RULES = ("none", "add:N", "topup")


@dataclass(frozen=True)
class MixRule:
    kind: str  # none | add | topup
    per_class: int = 0  # add: N

    @classmethod
    def parse(cls, text: str) -> MixRule:
        kind, _, number = text.strip().partition(":")
        if kind in ("none", "topup") and not number:
            return cls(kind)
        if kind == "add" and number.strip().isdigit() and int(number) >= 1:
            return cls("add", int(number))
        raise RaydiffError(f"--mix {text!r}: expected one of {', '.join(RULES)} (N >= 1)")

    def __str__(self) -> str:
        return f"add:{self.per_class}" if self.kind == "add" else self.kind

    def synthetic_counts(self, real_counts: Sequence[int]) -> list[int]:
        """Synthetic images per class that this rule adds to ``real_counts``."""
        if self.kind == "add":
            return [self.per_class] * len(real_counts)
        if self.kind == "topup":
            return [max(real_counts) - n for n in real_counts]
        return [0] * len(real_counts)


def check_samples(manifest: dict, where: str, info: DatasetInfo, data: str) -> None:
    """A sample folder's manifest must match the dataset's image side and class count."""
    identity = manifest["identity"]
    if identity["resolution"] != info.resolution:
        raise RaydiffError(f"{where}: samples are {identity['resolution']} px but {data} is "
                           f"{info.resolution} px")
    if identity["num_classes"] != info.num_classes:
        raise RaydiffError(f"{where}: samples come from a {identity['num_classes']}-class model "
                           f"but {data} has {info.num_classes} classes")


def load_synthetic(folders: Sequence[str], info: DatasetInfo,
                   data: str) -> tuple[np.ndarray, np.ndarray]:
    """All images of the sample folders (uint8 NHWC, labels), folder by folder in index order,
    after checking each folder against the dataset."""
    from raydiff.data.samples import MANIFEST, load_manifest, read_samples
    from raydiff.storage import Folder

    images, labels = [], []
    for folder in folders:
        check_samples(load_manifest(folder), Folder(folder).uri(MANIFEST), info, data)
        folder_images, folder_labels, _ = read_samples(folder)
        images.append(folder_images)
        labels.append(np.asarray(folder_labels, np.int64))
    if not images:
        side = info.resolution
        return np.zeros((0, side, side, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(labels)


@dataclass
class MixedSet:
    images: np.ndarray  # uint8 NHWC: the real images, then the synthetic ones
    labels: np.ndarray
    rule: MixRule
    real: list[int]  # per class
    synthetic: list[int]

    def counts(self, class_names: Sequence[str]) -> dict:
        """The record of the mix, as results.json and checkpoints keep it."""
        return {"rule": str(self.rule), "real_images": int(sum(self.real)),
                "synthetic_images": int(sum(self.synthetic)),
                "per_class": [{"class": c, "name": name, "real": r, "synthetic": s}
                              for c, (name, r, s) in enumerate(zip(class_names, self.real,
                                                                   self.synthetic))]}


def mix(real_images: np.ndarray, real_labels: np.ndarray, synthetic_images: np.ndarray,
        synthetic_labels: np.ndarray, rule: MixRule, num_classes: int,
        source: str = "the synthetic samples") -> MixedSet:
    """The real set plus the first k_c synthetic images of each class c, k from ``rule``."""
    real = np.bincount(real_labels, minlength=num_classes).tolist()
    wanted = rule.synthetic_counts(real)
    available = np.bincount(synthetic_labels, minlength=num_classes)
    short = [c for c in range(num_classes) if wanted[c] > available[c]]
    if short:
        c = short[0]
        raise RaydiffError(f"--mix {rule} needs {wanted[c]} synthetic images of class {c} but "
                           f"{source} hold {available[c]}; sample more per class")
    keep = np.concatenate([np.flatnonzero(synthetic_labels == c)[:wanted[c]]
                           for c in range(num_classes)] + [np.zeros(0, np.int64)])
    keep.sort()
    return MixedSet(images=np.concatenate([real_images, synthetic_images[keep]]),
                    labels=np.concatenate([real_labels, synthetic_labels[keep]]),
                    rule=rule, real=real, synthetic=wanted)
