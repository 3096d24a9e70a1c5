"""CIFAR-10/100 from the python-pickle folders torchvision downloads, cut to CIFAR-LT.

The CIFAR files are pickles. Unpickling can run arbitrary code, so they are read with an
unpickler that resolves only the handful of numpy names an array needs; anything else in the
stream (a class, a function, ``os.system``) is refused before it can be called.
"""

from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydiff.data.longtail import BuiltSource, SplitPlan, class_counts, cut_long_tail
from raydiff.errors import RaydiffError

logger = logging.getLogger(__name__)

CIFAR_SIDE = 32
#: Rows of a CIFAR ``data`` array: 1024 red, then 1024 green, then 1024 blue values.
CIFAR_ROW_BYTES = 3 * CIFAR_SIDE * CIFAR_SIDE


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and labels (as torchvision's CIFAR10/100)."""

    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int


LAYOUTS = {
    "cifar10": CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
    ),
    "cifar100": CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
    ),
}


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles written by Python 3 use it for ``bytes``."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing codec {encoding!r}")
    return text.encode("latin-1")


def _frombuffer(buffer, dtype, shape, order):
    """What numpy's protocol-5 pickles call to rebuild an array from its in-band bytes."""
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only names a CIFAR pickle may resolve, by the callables numpy itself pickles with.

    numpy 2 renamed ``numpy.core`` to ``numpy._core``; a pickle names whichever its writer had,
    so both spellings map to the running numpy's functions (found through ``__reduce__``
    rather than imported from either private module).
    """
    reconstruct = np.zeros(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only numpy array reconstruction; every other global is an error."""

    _allowed = None

    def find_class(self, module: str, name: str):
        if _ArrayUnpickler._allowed is None:
            _ArrayUnpickler._allowed = _allowed_globals()
        try:
            return _ArrayUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def load_pickle(path: Path) -> dict:
    """One CIFAR file as a dict with bytes keys, without executing anything it contains."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RaydiffError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # a corrupt pickle raises almost anything; report it as one line
        reason = " ".join(str(err).split()) or type(err).__name__
        raise RaydiffError(f"{path}: not a CIFAR pickle: {reason}") from None
    if not isinstance(obj, dict):
        raise RaydiffError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def find_cifar_folder(root: Path, name: str) -> Path:
    """``root/cifar-10-batches-py`` (or ``root`` itself when it is that folder)."""
    layout = LAYOUTS[name]
    if not root.exists():
        raise RaydiffError(f"--root {root} does not exist")
    for folder in (root / layout.folder, root):
        if (folder / layout.meta_file).is_file():
            return folder
    raise RaydiffError(
        f"{name}: no {layout.folder}/{layout.meta_file} under {root} (point --root at the folder "
        f"that holds {layout.folder}, as torchvision downloads it)"
    )


def _read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle(path)
    for key in (b"data", layout.label_key):
        if key not in batch:
            raise RaydiffError(f"{path}: missing key {key.decode()!r}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[layout.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
        raise RaydiffError(
            f"{path}: 'data' should be uint8 of shape (N, {CIFAR_ROW_BYTES}), "
            f"found {data.dtype} {data.shape}"
        )
    if labels.shape != (len(data),):
        raise RaydiffError(f"{path}: {len(labels)} labels for {len(data)} images")
    bad = np.flatnonzero((labels < 0) | (labels >= layout.num_classes))
    if bad.size:
        raise RaydiffError(
            f"{path}: label {labels[bad[0]]} at index {bad[0]} is out of range "
            f"0..{layout.num_classes - 1}"
        )
    images = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_class_names(folder: Path, name: str) -> list[str]:
    """Class names from batches.meta / meta, decoded to str."""
    layout = LAYOUTS[name]
    path = folder / layout.meta_file
    names = load_pickle(path).get(layout.names_key)
    if names is None or len(names) != layout.num_classes:
        raise RaydiffError(f"{path}: expected {layout.num_classes} {layout.names_key.decode()}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(folder: Path, name: str, split: str) -> SplitPlan:
    """All images of the ``train`` or ``test`` split, rows in torchvision's order.

    Sources read ``train:<index>`` / ``test:<index>``, the index torchvision's dataset (and so
    the released code) uses for the same image.
    """
    layout = LAYOUTS[name]
    files = layout.train_files if split == "train" else (layout.test_file,)
    parts = []
    for file_name in files:
        path = folder / file_name
        if not path.is_file():
            raise RaydiffError(f"{name}: missing {path}")
        parts.append(_read_batch(path, layout))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    sources = [f"{split}:{i}" for i in range(len(labels))]
    return SplitPlan(labels=labels, sources=sources, images=images)


def build_cifar(
    name: str, root: Path, *, imbalance_ratio: float, seed: int, reference: str = "train"
) -> BuiltSource:
    """CIFAR-10-LT / CIFAR-100-LT as LDAM-DRW, CBDM and CCUA build them.

    n_max = training images / classes (5000 or 500), counts from the exponential profile, and
    the kept images chosen by the released selection rule. The balanced reference is the full
    training set (what FID on CIFAR-LT is computed against) or, with ``reference="test"``,
    the test set.
    """
    if reference not in ("train", "test"):
        raise RaydiffError(f"--reference for {name} must be 'train' or 'test', got {reference!r}")
    layout = LAYOUTS[name]
    folder = find_cifar_folder(root, name)
    class_names = read_class_names(folder, name)
    full_train = load_cifar(folder, name, "train")
    n_max = len(full_train) // layout.num_classes
    train, profile = cut_long_tail(full_train, layout.num_classes, imbalance_ratio, n_max, seed)
    reference_plan = full_train if reference == "train" else load_cifar(folder, name, "test")
    logger.info("%s: kept %d of %d training images", name, len(train), len(full_train))
    return BuiltSource(
        source=name,
        class_names=class_names,
        train=train,
        reference=reference_plan,
        imbalance_ratio=float(imbalance_ratio),
        build={
            "root": str(folder),
            "profile": "exponential",
            "n_max": n_max,
            "requested_counts": profile,
            "available_counts": class_counts(full_train.labels, layout.num_classes),
            "selection": "per class in order: RandomState(seed).shuffle(indices), keep first n_c",
            "reference": "full training set" if reference == "train" else "test set",
        },
    )
