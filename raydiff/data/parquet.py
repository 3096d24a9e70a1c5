"""The on-disk format of a prepared dataset: Parquet shards plus dataset.json.

Layout::

    DIR/dataset.json              what DatasetInfo reads: classes, counts, files, how it was built
    DIR/train/part-00000.parquet  long-tailed training split
    DIR/reference/part-*.parquet  balanced reference split (FID and friends are measured on it)

Each row holds ``image`` (PNG bytes, RGB, resolution x resolution), ``label`` (int64 class
index) and ``source`` (where the image came from: a CIFAR index, a list-file path, ...). Rows
are written in a seeded random order, so any contiguous run of rows (a Ray Data block, a
shard) mixes classes as the whole split does.

A latent dataset (``raydiff prepare --latents VAE``; ``DatasetInfo.latent``) keeps all of
that, images included, and its training rows also hold ``latent_mean`` and ``latent_std``:
the VAE posterior's mean and standard deviation times the scale, for the image and for its
horizontal mirror, each a fixed-size list of ``2 * C * h * w`` float16 (or float32) values
in (orientation, channel, row, column) order. Training draws a posterior sample from them
(``mean + std * eps``) of the image or, with ``train.hflip``, of its mirror: what the
released CCUA-SiT code computes by encoding a randomly flipped image at every step. The
images stay, so everything that reads images (evaluation, copy rate, ``raydiff classify``)
reads a latent dataset as it reads any other.

Reading works on local paths and on any URI pyarrow opens (``s3://``, ``gs://``, ...); writing
is local only, because ``prepare`` relies on an atomic rename (copy the folder up afterwards).
Nothing here imports Ray: ``ray.data.read_parquet(split_paths(dir, "train"))`` is the Ray side.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydiff.data.images import decode_images, decode_png, encode_arrays, encode_files
from raydiff.data.longtail import DEFAULT_CHUNK_ROWS, SplitPlan
from raydiff.errors import RaydiffError
from raydiff.storage import Folder

__all__ = [
    "FORMAT_VERSION", "SPLITS", "INFO_FILE", "DatasetInfo", "load_info", "split_paths",
    "read_split", "read_split_arrays", "decode_png", "decode_images", "decode_batch",
    "write_split", "encode_pool",
]  # fmt: skip

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "reference")
INFO_FILE = "dataset.json"
DEFAULT_ROWS_PER_SHARD = 4096
SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)
# PNG bytes do not compress further; the small label/source columns do.
_COMPRESSION = {"image": "NONE", "label": "SNAPPY", "source": "SNAPPY"}
LATENT_COLUMNS = ("latent_mean", "latent_std")
LATENT_DTYPES = ("float16", "float32")
LATENT_ORIENTATIONS = ("as stored", "mirrored")  # axis 0 of a row's latent arrays


@dataclass(frozen=True)
class LatentInfo:
    """dataset.json's ``latent`` entry: which VAE encoded the training split, and how."""

    vae: str  # the name or folder ``--latents`` gave
    sha256: str  # of the VAE's weights file
    scale: float
    channels: int
    resolution: int  # latent side; the images' side is DatasetInfo.resolution
    dtype: str  # storage type of the latent columns

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one row's ``latent_mean`` (and ``latent_std``)."""
        return (len(LATENT_ORIENTATIONS), self.channels, self.resolution, self.resolution)

    def to_json(self) -> dict:
        return {"vae": self.vae, "vae_sha256": self.sha256, "scale": self.scale,
                "channels": self.channels, "resolution": self.resolution, "dtype": self.dtype,
                "splits": ["train"], "orientations": list(LATENT_ORIENTATIONS),
                "encoding": "posterior mean and std of AutoencoderKL.encode(image / 127.5 - 1), "
                            "times scale"}

    @classmethod
    def from_json(cls, data: dict) -> LatentInfo:
        return cls(vae=str(data["vae"]), sha256=str(data["vae_sha256"]),
                   scale=float(data["scale"]), channels=int(data["channels"]),
                   resolution=int(data["resolution"]), dtype=str(data["dtype"]))


@dataclass(frozen=True)
class DatasetInfo:
    """dataset.json as a typed object: what training and evaluation need to know up front."""

    source: str
    class_names: tuple[str, ...]
    train_counts: tuple[int, ...]
    reference_counts: tuple[int, ...]
    resolution: int
    imbalance_ratio: float | None
    seed: int
    files: dict[str, tuple[str, ...]]
    build: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    latent: LatentInfo | None = None  # None: images only

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def counts(self, split: str) -> tuple[int, ...]:
        """Images per class in ``split`` (``train`` or ``reference``)."""
        _check_split(split)
        return self.train_counts if split == "train" else self.reference_counts

    def num_images(self, split: str) -> int:
        return sum(self.counts(split))

    def to_json(self) -> dict:
        counts = self.train_counts
        measured = max(counts) / min(counts) if counts and min(counts) > 0 else None
        return {
            "format_version": self.format_version,
            "source": self.source,
            "resolution": self.resolution,
            "channels": 3,
            "image_format": "png",
            "num_classes": self.num_classes,
            "classes": [
                {"label": c, "name": name, "train": n_train, "reference": n_ref}
                for c, (name, n_train, n_ref) in enumerate(
                    zip(self.class_names, self.train_counts, self.reference_counts)
                )
            ],
            "splits": {
                split: {"num_images": self.num_images(split), "files": list(self.files[split])}
                for split in SPLITS
            },
            "imbalance_ratio": self.imbalance_ratio,
            "measured_imbalance_ratio": measured,
            "seed": self.seed,
            "columns": {
                "image": "PNG bytes, RGB",
                "label": "int64 class index",
                "source": "where the image came from",
                **({} if self.latent is None else {
                    name: f"train split: {self.latent.dtype} x {list(self.latent.row_shape)}, "
                          f"(orientation, channel, row, column)" for name in LATENT_COLUMNS}),
            },
            "build": self.build,
            **({} if self.latent is None else {"latent": self.latent.to_json()}),
        }

    @classmethod
    def from_json(cls, data: dict, where: str) -> DatasetInfo:
        """Parse dataset.json; a missing key or a newer format version is a clear error."""
        try:
            version = int(data["format_version"])
            if version > FORMAT_VERSION:
                raise RaydiffError(
                    f"{where}: format_version {version} is newer than this raydiff reads "
                    f"({FORMAT_VERSION}); upgrade raydiff"
                )
            classes = sorted(data["classes"], key=lambda entry: entry["label"])
            ratio = data["imbalance_ratio"]
            return cls(
                source=str(data["source"]),
                class_names=tuple(str(entry["name"]) for entry in classes),
                train_counts=tuple(int(entry["train"]) for entry in classes),
                reference_counts=tuple(int(entry["reference"]) for entry in classes),
                resolution=int(data["resolution"]),
                imbalance_ratio=None if ratio is None else float(ratio),
                seed=int(data["seed"]),
                files={s: tuple(data["splits"][s]["files"]) for s in SPLITS},
                build=dict(data.get("build", {})),
                format_version=version,
                latent=LatentInfo.from_json(data["latent"]) if data.get("latent") else None,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise RaydiffError(f"{where}: not a raydiff dataset.json ({err!r})") from None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise RaydiffError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _filesystem(dataset_dir: str | Path) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a local folder or a URI, and the folder's path inside it."""
    folder = Folder(dataset_dir)
    return folder.fs, folder.base


def _join(dataset_dir: str | Path, relative: str) -> str:
    return Folder(dataset_dir).uri(relative)


def load_info(dataset_dir: str | Path) -> DatasetInfo:
    """The DatasetInfo of a prepared dataset (a folder or a URI)."""
    fs, base = _filesystem(dataset_dir)
    where = _join(dataset_dir, INFO_FILE)
    try:
        with fs.open_input_stream(f"{base}/{INFO_FILE}") as stream:
            data = json.loads(stream.read().decode("utf-8"))
    except FileNotFoundError:
        raise RaydiffError(f"{where} does not exist; run 'raydiff prepare' first") from None
    except (OSError, ValueError) as err:
        raise RaydiffError(f"cannot read {where}: {err}") from None
    return DatasetInfo.from_json(data, where)


def split_paths(dataset_dir: str | Path, split: str) -> list[str]:
    """The Parquet shards of one split, as paths or URIs ``ray.data.read_parquet`` accepts."""
    _check_split(split)
    return [_join(dataset_dir, rel) for rel in load_info(dataset_dir).files[split]]


def missing_files(dataset_dir: str | Path, info: DatasetInfo | None = None) -> list[str]:
    """The shards ``dataset.json`` (``info``, read if not given) lists that are not there."""
    fs, base = _filesystem(dataset_dir)
    info = info or load_info(dataset_dir)
    listed = [rel for split in SPLITS for rel in info.files[split]]
    found = fs.get_file_info([f"{base}/{rel}" for rel in listed])
    return [rel for rel, f in zip(listed, found) if f.type != pafs.FileType.File]


def check_split(dataset_dir: str | Path, split: str, info: DatasetInfo | None = None) -> None:
    """Refuse, with one line naming the shard, a split whose shards are missing, are not
    readable Parquet, hold another number of rows than ``dataset.json`` says, or hold a label
    outside its classes. Reads only the footers (labels from the column statistics; the label
    column itself where a footer has none): cheap enough to run before every job. ``info`` is
    the dataset's ``dataset.json``, read if not given."""
    _check_split(split)
    info = info or load_info(dataset_dir)
    fs, base = _filesystem(dataset_dir)
    rows = 0
    for rel in info.files[split]:
        where = _join(dataset_dir, rel)
        try:
            with fs.open_input_file(f"{base}/{rel}") as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
                column = schema.get_field_index("label")
                if column < 0:
                    raise RaydiffError(f"{where} has no label column")
                if split == "train" and info.latent is not None:
                    _check_latent_field(schema, info.latent, where)
                low, high = _label_range(meta, column)
                if low is None:  # no statistics: read the (small) label column
                    labels = pq.read_table(f, columns=["label"]).column("label")
                    low, high = pc.min(labels).as_py(), pc.max(labels).as_py()
        except FileNotFoundError:
            raise RaydiffError(f"{where} is missing ({split} shard listed in {INFO_FILE})") from None
        except (pa.ArrowInvalid, OSError) as err:
            raise RaydiffError(f"{where} is not a readable Parquet file: "
                               f"{str(err).splitlines()[0]}") from None
        rows += meta.num_rows
        for label in (low, high):
            if label is not None and not 0 <= label < info.num_classes:
                raise RaydiffError(f"{where} holds label {label}, outside the "
                                   f"{info.num_classes} classes of {INFO_FILE} (0..{info.num_classes - 1})")
    if rows != info.num_images(split):
        raise RaydiffError(f"{_join(dataset_dir, INFO_FILE)} lists {info.num_images(split)} "
                           f"{split} images but its shards hold {rows}")


def _label_range(meta, column: int) -> tuple[int | None, int | None]:
    low = high = None
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(column).statistics
        if meta.row_group(g).num_rows == 0:
            continue
        if stats is None or not stats.has_min_max:
            return None, None
        low = stats.min if low is None else min(low, stats.min)
        high = stats.max if high is None else max(high, stats.max)
    return low, high


def read_split(dataset_dir: str | Path, split: str, columns: list[str] | None = None) -> pa.Table:
    """One split as a single Arrow table (all of it in memory: for small splits and tests)."""
    _check_split(split)
    fs, base = _filesystem(dataset_dir)
    paths = [f"{base}/{rel}" for rel in load_info(dataset_dir).files[split]]
    if not paths:
        return SCHEMA.empty_table()
    return pq.read_table(paths, filesystem=fs, columns=columns, schema=SCHEMA)


def read_split_arrays(dataset_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split decoded to (uint8 NHWC images, int64 labels), in stored row order."""
    table = read_split(dataset_dir, split, columns=["image", "label"])
    images = decode_images(table.column("image").to_pylist())
    return images, table.column("label").to_numpy().astype(np.int64)


def decode_batch(batch: dict) -> dict:
    """A batch of rows with the ``image`` column decoded to uint8 NHWC; other columns kept.

    Made for ``ray.data.Dataset.map_batches(decode_batch, batch_format="numpy")``: it builds
    new arrays and never writes into the (read-only, zero-copy) input batch.
    """
    decoded = dict(batch)
    decoded["image"] = decode_images(list(batch["image"]))
    return decoded


def decode_training_batch(batch: dict) -> dict:
    """Ray Data batch function of the training pipeline: PNG bytes -> uint8 NHWC images, with
    their labels. It lives here, away from torch, so that the Ray Data tasks that run it never
    import torch."""
    return {"image": decode_images(list(batch["image"])), "label": np.asarray(batch["label"])}


@contextmanager
def encode_pool(workers: int) -> Iterator[Executor | None]:
    """Worker processes for decoding and encoding, or None to work in this process.

    Workers are spawned, not forked: the caller may hold threads (Ray, a torch pool) that a
    fork would copy half-initialised. On an error, queued work is cancelled rather than
    finished, so a bad image stops the run promptly.
    """
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _encode_job(chunk: SplitPlan) -> tuple[Callable, object]:
    """The function that encodes a chunk and its input: module-level, so workers can run it."""
    if chunk.images is not None:
        return encode_arrays, chunk.images
    return encode_files, chunk.files


def _encoded_chunks(
    plan: SplitPlan, resolution: int, pool: Executor | None, chunk_rows: int, in_flight: int
) -> Iterator[tuple[SplitPlan, list[bytes]]]:
    """Chunks of the plan with their PNG bytes, in order, at most ``in_flight`` queued at once.

    The bound keeps memory flat: a queued chunk holds a copy of its pixels.
    """
    if pool is None:
        for chunk in plan.chunks(chunk_rows):
            function, payload = _encode_job(chunk)
            yield chunk, function(payload, resolution)
        return
    pending: deque = deque()
    for chunk in plan.chunks(chunk_rows):
        pending.append((chunk, pool.submit(*_encode_job(chunk), resolution)))
        if len(pending) >= in_flight:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


class _ShardWriter:
    """Collects encoded rows and writes a ``part-NNNNN.parquet`` shard each time one is full."""

    def __init__(self, split_dir: Path, rows_per_shard: int) -> None:
        self.split_dir = split_dir
        self.rows_per_shard = rows_per_shard
        self.names: list[str] = []
        self.columns: tuple[list, list, list] = ([], [], [])

    def add(self, images: list[bytes], labels: list[int], sources: list[str]) -> None:
        for column, values in zip(self.columns, (images, labels, sources)):
            column.extend(values)
        while len(self.columns[0]) >= self.rows_per_shard:
            self._write(self.rows_per_shard)

    def close(self) -> list[str]:
        """Write what is left (an empty split still gets one shard, so readers see its schema)."""
        if self.columns[0] or not self.names:
            self._write(len(self.columns[0]))
        return self.names

    def _write(self, rows: int) -> None:
        name = f"part-{len(self.names):05d}.parquet"
        images, labels, sources = (column[:rows] for column in self.columns)
        table = pa.table(
            {
                "image": pa.array(images, pa.binary()),
                "label": pa.array(labels, pa.int64()),
                "source": pa.array(sources, pa.string()),
            },
            schema=SCHEMA,
        )
        pq.write_table(table, self.split_dir / name, compression=_COMPRESSION)
        for column in self.columns:
            del column[:rows]
        self.names.append(name)
        logger.info("%s: wrote %s (%d rows)", self.split_dir.name, name, rows)


def write_split(
    plan: SplitPlan,
    split_dir: Path,
    *,
    resolution: int,
    seed: int | tuple[int, ...],
    pool: Executor | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    in_flight: int = 4,
) -> list[str]:
    """Encode a split into ``split_dir/part-NNNNN.parquet`` shards; returns their file names.

    Rows are shuffled with ``numpy.random.default_rng(seed)`` first (see the module docstring).
    """
    if rows_per_shard < 1 or chunk_rows < 1:
        raise RaydiffError(f"rows per shard must be at least 1, got {rows_per_shard}")
    split_dir.mkdir(parents=True, exist_ok=False)
    plan = plan.take(np.random.default_rng(seed).permutation(len(plan)))
    writer = _ShardWriter(split_dir, rows_per_shard)
    for chunk, encoded in _encoded_chunks(plan, resolution, pool, chunk_rows, in_flight):
        writer.add(encoded, chunk.labels.tolist(), chunk.sources)
    return writer.close()


# --- latent columns (``raydiff prepare --latents``) -------------------------------------------

def _check_latent_field(schema: pa.Schema, latent: LatentInfo, where: str) -> None:
    size = int(np.prod(latent.row_shape))
    value_type = pa.from_numpy_dtype(np.dtype(latent.dtype))
    for name in LATENT_COLUMNS:
        index = schema.get_field_index(name)
        found = schema.field(index).type if index >= 0 else None
        if not (found is not None and pa.types.is_fixed_size_list(found)
                and found.list_size == size and found.value_type == value_type):
            raise RaydiffError(f"{where} has no {name} column of {latent.dtype} x "
                               f"{list(latent.row_shape)} as {INFO_FILE} says")


def latent_column(values: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """(N, *row_shape) latents as a fixed-size list column of ``dtype``."""
    flat = np.ascontiguousarray(values, dtype=np.dtype(dtype)).reshape(len(values), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


def latent_arrays(table: pa.Table, row_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The latent columns of a table as (N, *row_shape) arrays of their stored type."""
    out = {}
    for name in LATENT_COLUMNS:
        column = table.column(name).combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False)
        out[name] = values.reshape(len(column), *row_shape)
    return out


def write_latent_columns(shard: Path, mean: np.ndarray, std: np.ndarray, dtype: str) -> None:
    """Add ``latent_mean`` and ``latent_std`` (rows in the shard's order) to a local shard,
    replacing the file by a rename."""
    table = pq.read_table(shard)
    if len(mean) != table.num_rows or len(std) != table.num_rows:
        raise RuntimeError(f"{shard}: {len(mean)} latents for {table.num_rows} rows")
    table = table.append_column(LATENT_COLUMNS[0], latent_column(mean, dtype))
    table = table.append_column(LATENT_COLUMNS[1], latent_column(std, dtype))
    tmp = shard.with_name(f".{shard.name}.tmp")
    pq.write_table(table, tmp, compression={**_COMPRESSION, LATENT_COLUMNS[0]: "NONE",
                                            LATENT_COLUMNS[1]: "NONE"})
    tmp.rename(shard)


def read_latent_arrays(dataset_dir: str | Path, split: str = "train"
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A latent dataset's split as (latent_mean, latent_std, labels), in stored row order."""
    _check_split(split)
    info = load_info(dataset_dir)
    if info.latent is None:
        raise RaydiffError(f"{dataset_dir} holds images, not latents (prepare it with --latents)")
    fs, base = _filesystem(dataset_dir)
    paths = [f"{base}/{rel}" for rel in info.files[split]]
    table = pq.read_table(paths, filesystem=fs, columns=[*LATENT_COLUMNS, "label"])
    arrays = latent_arrays(table, info.latent.row_shape)
    return (arrays["latent_mean"], arrays["latent_std"],
            table.column("label").to_numpy().astype(np.int64))


class LatentTrainingBatch:
    """Ray Data batch function of a latent training pipeline (``batch_format="pyarrow"``):
    the latent columns as (N, *row_shape) arrays, with their labels. Away from torch, as
    ``decode_training_batch`` is."""

    def __init__(self, row_shape: tuple[int, ...]):
        self.row_shape = tuple(row_shape)

    def __call__(self, table: pa.Table) -> dict:
        return {**latent_arrays(table, self.row_shape),
                "label": table.column("label").to_numpy().astype(np.int64)}
