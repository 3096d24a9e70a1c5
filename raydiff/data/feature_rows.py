"""The reference-feature cache entry's files: feature rows written as they arrive, read back
a chunk at a time.

::

    ENTRY/features.npy   float32 (images, feature_dim), row k = the image with key k
    ENTRY/labels.npy     int64 (images,)
    ENTRY/meta.json      what the entry is of (``raydiff.distributed.evaluate`` keys it)

Plain ``.npy`` files (``np.load`` reads them, never unpickling): ``RowsWriter`` writes each
batch of rows straight to its place in ``features.npy``, so no process holds the whole set;
``StoredRows`` checks the header against the file's size and reads it in chunks. No Ray here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FEATURES_FILE, LABELS_FILE, META_FILE = "features.npy", "labels.npy", "meta.json"
CHUNK_ROWS = 4096  # rows per read of a cache entry


class StoredRows:
    """The feature rows of a cache entry (``features.npy``, float32, one row per key) and
    their labels: read a chunk at a time (``chunks``), or mapped whole (``features``) by
    those that need every row at once."""

    def __init__(self, path: Path, labels: np.ndarray):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(f)
            self.offset = f.tell()
        if dtype != np.dtype("<f4") or fortran_order or len(shape) != 2:
            raise ValueError(f"{path.name} holds {dtype} {shape}, not float32 rows")
        self.path, self.labels, self.shape = path, labels, tuple(shape)
        size = path.stat().st_size
        if size != self.offset + shape[0] * shape[1] * 4:
            raise ValueError(f"{path.name} has {size} bytes, not the "
                             f"{self.offset + shape[0] * shape[1] * 4} of {shape} rows")

    @property
    def features(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")  # read-only; allow_pickle=False: arrays only

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row in memory, with the labels."""
        return np.load(self.path), self.labels

    def chunks(self, size: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]]:
        """(keys, labels, rows) of ``size`` rows at a time, in key order."""
        n, dim = self.shape
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for start in range(0, n, size):
                count = min(size, n - start)
                rows = np.fromfile(f, np.float32, count * dim).reshape(count, dim)
                yield np.arange(start, start + count), self.labels[start:start + count], rows


class RowsWriter:
    """A new cache entry, filled as the feature pass runs: each batch's rows written to
    ``features.npy`` at their keys' rows (no row kept in memory), the labels kept."""

    def __init__(self, folder: Path, n: int, dim: int):
        self.folder, self.dim = folder, dim
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.file = open(folder / FEATURES_FILE, "w+b")  # closed by finish or discard
        np.lib.format.write_array_header_1_0(self.file, {
            "descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
            "shape": (n, dim)})
        self.offset = self.file.tell()
        self.file.truncate(self.offset + n * dim * 4)
        self.labels = np.full(n, -1, np.int64)

    def add(self, batch: dict) -> None:
        keys = np.asarray(batch["key"], np.int64)
        order = np.argsort(keys)
        keys, rows = keys[order], np.ascontiguousarray(np.asarray(batch["feat"])[order], "<f4")
        runs = np.split(np.arange(len(keys)), np.flatnonzero(np.diff(keys) != 1) + 1)
        for run in runs:  # consecutive keys: one write
            if len(run):
                self.file.seek(self.offset + int(keys[run[0]]) * self.dim * 4)
                self.file.write(rows[run].tobytes())
        self.labels[keys] = np.asarray(batch["label"])[order]

    def finish(self, meta: dict, name: str) -> None:
        self.file.close()
        missing = int((self.labels < 0).sum())
        if missing:
            raise RuntimeError(f"{missing} {name} images got no features")
        np.save(self.folder / LABELS_FILE, self.labels)
        (self.folder / META_FILE).write_text(json.dumps({**meta, "num_images": len(self.labels)}))

    def discard(self) -> None:
        self.file.close()
        shutil.rmtree(self.folder, ignore_errors=True)
