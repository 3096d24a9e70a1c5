"""Sources read from image files: the ImageNet-LT / Places-LT split lists and image trees.

Split lists (Liu et al. 2019, OLTR). Each line of a list file is ``relative/path.jpg label``,
relative to the image root. The training list is already long-tailed, so no profile is applied;
the balanced val (or test) list is the reference. List files carry no class names, so a class
is named after the folder its training images sit in (``n01440764`` for ImageNet,
``a/airfield`` for Places).

Image trees (``imagefolder``: one subfolder per class). This is how TinyImageNet-LT and the
released code's ImageNet-LT / Places-LT variants are built: start from a (roughly balanced)
tree, rank classes in sorted folder order (class 0 keeps the most), keep
n_c = int(n_max * (1/IR)^(c/(C-1))) images of class c, where n_max is ``--images-per-class``
or else the largest class's count, and a class with fewer images than n_c keeps all it has.
Which images are kept follows the CIFAR-LT rule, over the class's files in sorted order. The
balanced reference is ``--reference-root`` (another tree with the same class folders, e.g. a
validation set) or, by default, the whole tree before the cut, as the full training set is the
reference for CIFAR-LT. A tree used without a cut must come with ``--reference-root``: there
would be no balanced set to evaluate against otherwise.

Both kinds only list files here; decoding happens later, in worker processes (see parquet.py).
Each file travels with its origin (list file and line, or class folder) for error messages.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from raydiff.data.images import list_image_files
from raydiff.data.longtail import BuiltSource, SplitPlan, class_counts, cut_long_tail
from raydiff.errors import RaydiffError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListLayout:
    """Class count and default list file names of one list-based benchmark."""

    num_classes: int
    train_list: str
    reference_lists: dict[str, str]


LIST_LAYOUTS = {
    "imagenet-lt": ListLayout(
        num_classes=1000,
        train_list="ImageNet_LT_train.txt",
        reference_lists={"val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"},
    ),
    "places-lt": ListLayout(
        num_classes=365,
        train_list="Places_LT_train.txt",
        reference_lists={"val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
    ),
}


@dataclass(frozen=True)
class ListEntry:
    """One line of a list file: the image, its label, and where the line is (for errors)."""

    relative_path: str
    label: int
    origin: str


def _parse_line(text: str, origin: str, num_classes: int) -> ListEntry:
    fields = text.rsplit(maxsplit=1)
    if len(fields) != 2:
        raise RaydiffError(f"{origin}: expected 'relative/path.jpg label', found {text!r}")
    path, label_text = fields
    try:
        label = int(label_text)
    except ValueError:
        raise RaydiffError(f"{origin}: label {label_text!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise RaydiffError(f"{origin}: label {label} is out of range 0..{num_classes - 1}")
    # Some copies of the Places-LT lists start paths with '/'; they are still root-relative.
    return ListEntry(relative_path=path.lstrip("/"), label=label, origin=origin)


def read_list(path: Path, num_classes: int) -> list[ListEntry]:
    """All entries of a list file, checked: two fields per line, an integer label in range."""
    if not path.is_file():
        raise RaydiffError(f"split list {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RaydiffError(f"cannot read split list {path}: {err}") from None
    entries = [
        _parse_line(line, f"{path}:{number}", num_classes)
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]
    if not entries:
        raise RaydiffError(f"split list {path} has no entries")
    return entries


def plan_from_entries(entries: list[ListEntry], root: Path) -> SplitPlan:
    """The split's rows, after checking that every listed image exists.

    Checking up front (a stat per file) fails in seconds instead of after decoding for an hour.
    """
    files = []
    for entry in entries:
        path = os.path.join(root, entry.relative_path)
        if not os.path.isfile(path):
            raise RaydiffError(f"{entry.origin}: image {path} does not exist")
        files.append((path, entry.origin))
    return SplitPlan(
        labels=np.array([e.label for e in entries], dtype=np.int64),
        sources=[e.relative_path for e in entries],
        files=files,
    )


def class_names_from_paths(entries: list[ListEntry], num_classes: int) -> list[str]:
    """Each class named after its images' folder, relative to the folder all images share.

    A class whose images sit in more than one folder (or that has no training image) falls
    back to ``class_<index>``; names only label plots and reports.
    """
    parents = [PurePosixPath(e.relative_path).parent for e in entries]
    common = os.path.commonpath([p.as_posix() for p in parents]) if parents else ""
    folders: dict[int, set[str]] = {}
    for entry, parent in zip(entries, parents):
        relative = os.path.relpath(parent.as_posix(), common) if common else parent.as_posix()
        folders.setdefault(entry.label, set()).add(relative)
    names = []
    for c in range(num_classes):
        found = folders.get(c, set())
        names.append(next(iter(found)) if len(found) == 1 and "." not in found else f"class_{c}")
    return names


def _list_path(given: str | None, root: Path, default_name: str, option: str) -> Path:
    if given is not None:
        return Path(given)
    path = root / default_name
    if not path.is_file():
        raise RaydiffError(f"split list {path} does not exist (pass {option} FILE)")
    return path


def build_list_source(
    name: str,
    root: Path,
    *,
    train_list: str | None = None,
    reference_list: str | None = None,
    reference: str = "val",
    num_classes: int | None = None,
) -> BuiltSource:
    """ImageNet-LT / Places-LT: the training list as is, the balanced val/test list as reference.

    List files default to their standard names inside ``root``; ``num_classes`` defaults to the
    benchmark's (1000 or 365) and bounds the labels.
    """
    layout = LIST_LAYOUTS[name]
    if not root.is_dir():
        raise RaydiffError(f"--root {root} does not exist")
    if reference not in layout.reference_lists:
        choices = " or ".join(repr(k) for k in layout.reference_lists)
        raise RaydiffError(f"--reference for {name} must be {choices}, got {reference!r}")
    num_classes = num_classes or layout.num_classes
    train_path = _list_path(train_list, root, layout.train_list, "--train-list")
    reference_path = _list_path(
        reference_list, root, layout.reference_lists[reference], "--reference-list"
    )
    train_entries = read_list(train_path, num_classes)
    reference_entries = read_list(reference_path, num_classes)
    built = BuiltSource(
        source=name,
        class_names=class_names_from_paths(train_entries, num_classes),
        train=plan_from_entries(train_entries, root),
        reference=plan_from_entries(reference_entries, root),
        imbalance_ratio=None,
        build={
            "root": str(root),
            "train_list": str(train_path),
            "reference_list": str(reference_path),
            "profile": "as listed (Liu et al. 2019 split lists)",
            "reference": f"{reference} list",
        },
    )
    built.check_classes(str(train_path), str(reference_path))
    logger.info("%s: %d training and %d reference images listed", name, len(train_entries),
                len(reference_entries))  # fmt: skip
    return built


def class_folders(root: Path, option: str = "--root") -> list[Path]:
    """The class subfolders of a tree, in sorted order (hidden folders skipped)."""
    if not root.is_dir():
        raise RaydiffError(f"{option} {root} does not exist or is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise RaydiffError(f"{root}: no class subfolders found")
    return folders


def scan_tree(root: Path, class_names: list[str], option: str = "--root") -> SplitPlan:
    """Every image of a tree whose subfolders are (some of) ``class_names``.

    An empty class folder or a folder that is not one of ``class_names`` is an error.
    """
    label_of = {name: c for c, name in enumerate(class_names)}
    labels: list[int] = []
    sources: list[str] = []
    files: list[tuple[str, str]] = []
    for folder in class_folders(root, option):
        if folder.name not in label_of:
            raise RaydiffError(f"{folder}: class {folder.name!r} is not a training class")
        images = list_image_files(folder)
        if not images:
            raise RaydiffError(f"{folder}: class folder has no images")
        labels += [label_of[folder.name]] * len(images)
        sources += [p.relative_to(root).as_posix() for p in images]
        files += [(str(p), str(folder)) for p in images]
    return SplitPlan(labels=np.array(labels, dtype=np.int64), sources=sources, files=files)


def build_imagefolder(
    root: Path,
    *,
    reference_root: Path | None = None,
    imbalance_ratio: float | None = None,
    images_per_class: int | None = None,
    seed: int = 0,
) -> BuiltSource:
    """A long-tailed training split and a balanced reference from image trees.

    With neither ``imbalance_ratio`` nor ``images_per_class`` the tree is kept as it is (it is
    taken to be long-tailed already); ``images_per_class`` alone caps every class (ratio 1).
    """
    class_names = [p.name for p in class_folders(root)]
    full = scan_tree(root, class_names)
    num_classes = len(class_names)
    available = class_counts(full.labels, num_classes)
    cut = imbalance_ratio is not None or images_per_class is not None
    if not cut and reference_root is None:
        raise RaydiffError(
            f"imagefolder {root}: give --imbalance-ratio to cut a long-tailed split from this "
            "tree, or --reference-root with a balanced tree to evaluate against"
        )
    build: dict = {"root": str(root), "available_counts": available}
    train = full
    if cut:
        ratio = 1.0 if imbalance_ratio is None else imbalance_ratio
        n_max = images_per_class or max(available)
        train, profile = cut_long_tail(full, num_classes, ratio, n_max, seed)
        build.update(
            profile="exponential, min(available, n_c); classes ranked in sorted folder order",
            n_max=n_max,
            requested_counts=profile,
            selection="per class in order: RandomState(seed).shuffle(sorted files), keep first n_c",
        )
    else:
        build["profile"] = "as found in the tree"
    if reference_root is None:
        reference, build["reference"] = full, "the whole tree before the cut"
    else:
        reference = scan_tree(reference_root, class_names, "--reference-root")
        build["reference"] = f"the tree at {reference_root}"
    built = BuiltSource(
        source="imagefolder",
        class_names=class_names,
        train=train,
        reference=reference,
        imbalance_ratio=None if not cut else float(imbalance_ratio or 1.0),
        build=build,
    )
    built.check_classes(str(root), str(reference_root or root))
    logger.info("imagefolder: kept %d of %d images in %d classes", len(train), len(full),
                num_classes)  # fmt: skip
    return built
