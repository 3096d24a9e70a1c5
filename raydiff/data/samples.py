"""The sample-folder format: what ``raydiff sample`` writes and every later stage reads.

::

    OUT/manifest.json                  checkpoint identity, sampler, seeds rule, counts
    OUT/shards/shard-00000.parquet     index, label, seed, image (PNG bytes), index order
    OUT/images/<label>/<index>.png     --format imagefolder (torchvision ImageFolder reads it)
    OUT/samples_NxHxWx3.npz            --format npz: arr_0 uint8 NHWC, arr_1 labels (ADM's)

What an image is (``SamplePlan``): image ``i`` has label ``classes[i % len(classes)]`` (labels
interleave, so counts per class are exact and any prefix of shards is balanced) and seed
``seed * 2**32 + i``, from which it draws all of its noise (``raydiff.samplers``).

A shard file exists only once complete (``Folder`` writes whole: a hidden temporary name
renamed, or an object that appears when its upload completes), so the shards on storage with
the expected row count are the finished part of a run, whichever process wrote them (the
sampling actors do, each shard whole). The Parquet shards are the record
of the run; ``imagefolder`` and ``npz`` are exports made from them once every shard exists,
and the manifest lists a format once its export is complete. OUT may be a path or a URI.
Nothing here imports Ray.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydiff.data.images import decode_images
from raydiff.errors import RaydiffError
from raydiff.storage import Folder, atomic_path, to_buffer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
IMAGES_DIR = "images"
FORMATS = ("parquet", "imagefolder", "npz")
SEED_STRIDE = 2 ** 32  # seed of image i = seed * SEED_STRIDE + i
SEEDS_RULE = "seed of image i = seed * 2**32 + i"
LABELS_RULE = "label of image i = classes[i % len(classes)]"
SHARD_SCHEMA = pa.schema([pa.field("index", pa.int64(), nullable=False),
                          pa.field("label", pa.int64(), nullable=False),
                          pa.field("seed", pa.int64(), nullable=False),
                          pa.field("image", pa.binary(), nullable=False)])
COLUMNS = tuple(SHARD_SCHEMA.names)


@dataclass(frozen=True)
class SamplePlan:
    """Which image every index is: label, seed and shard."""

    classes: tuple[int, ...]
    per_class: int
    seed: int
    shard_size: int

    @property
    def num_images(self) -> int:
        return self.per_class * len(self.classes)

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def labels(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes, np.int64)[np.asarray(indices) % len(self.classes)]

    def seeds(self, indices: np.ndarray) -> np.ndarray:
        return self.seed * SEED_STRIDE + np.asarray(indices, np.int64)


def load_manifest(out: str | Path) -> dict:
    folder = Folder(out)
    where = folder.uri(MANIFEST)
    try:
        data = folder.read_json(MANIFEST)
    except FileNotFoundError:
        raise RaydiffError(f"{where} does not exist: not a 'raydiff sample' folder") from None
    except json.JSONDecodeError as err:
        raise RaydiffError(f"{where} line {err.lineno}: {err.msg}") from None
    if data.get("kind") != "raydiff-samples" or "identity" not in data:
        raise RaydiffError(f"{where} is not a raydiff sample manifest")
    return data


def shard_name(shard: int) -> str:
    return f"{SHARDS_DIR}/shard-{shard:05d}.parquet"


def _footer_rows(folder: Folder, name: str) -> tuple[int | None, str | None]:
    """A shard's row count from its Parquet footer, or None and why it cannot be read."""
    try:
        with folder.open_input_file(name) as f:
            return pq.read_metadata(f).num_rows, None
    except (pa.ArrowInvalid, OSError) as err:
        return None, str(err).splitlines()[0]


def finished_shards(out: str | Path, plan: SamplePlan) -> set[int]:
    """Shards on storage with the expected row count; stale temporary files are removed."""
    folder = Folder(out)
    for stale in folder.names(SHARDS_DIR, ".shard-*.tmp-*"):  # left by a killed run
        folder.delete(f"{SHARDS_DIR}/{stale}")
    present = set(folder.names(SHARDS_DIR, "shard-*.parquet"))
    done = set()
    for shard in range(plan.num_shards):
        name = shard_name(shard)
        start, stop = plan.shard_bounds(shard)
        if name.split("/")[1] in present:
            rows, damage = _footer_rows(folder, name)
            if damage:
                logger.warning("%s is damaged (%s): sampling it again", folder.uri(name), damage)
            if rows == stop - start:
                done.add(shard)
            else:
                folder.delete(name)  # short or unreadable: written again by this run
    return done


def write_shard(out: Folder, shard: int, columns: dict[str, np.ndarray], start: int,
                stop: int) -> int:
    """Shard ``shard`` from the columns of its rows (any order): indices ``start .. stop-1``.
    Written whole (``Folder.write_bytes``), by whichever process holds the rows; the bytes
    depend only on the rows. Returns the file's size in bytes."""
    order = np.argsort(columns["index"], kind="stable")
    if not np.array_equal(columns["index"][order], np.arange(start, stop)):
        raise RuntimeError(f"shard {shard}: rows do not cover indices {start}..{stop - 1}")
    table = pa.table({name: pa.array(columns[name][order], SHARD_SCHEMA.field(name).type)
                      for name in COLUMNS}, schema=SHARD_SCHEMA)
    data = to_buffer(lambda f: pq.write_table(table, f, compression="NONE"))
    out.write_bytes(shard_name(shard), data)
    return len(data)


def shard_paths(out: str | Path) -> list[str]:
    """The shard files (paths or URIs) of a complete sample folder, in index order."""
    folder, manifest = Folder(out), load_manifest(out)
    present = set(folder.names(SHARDS_DIR, "shard-*.parquet"))
    names = [shard_name(k) for k in range(manifest["num_shards"])]
    missing = [n for n in names if n.split("/")[1] not in present]
    if missing:
        raise RaydiffError(f"{out} is incomplete: {len(missing)} of {len(names)} shards missing "
                           f"(first: {missing[0]}); rerun the same 'raydiff sample' command")
    size, total = manifest["identity"]["shard_size"], manifest["num_images"]
    for k, name in enumerate(names):
        rows, damage = _footer_rows(folder, name)
        if damage:
            raise RaydiffError(f"{folder.uri(name)} is damaged ({damage}); rerun the same "
                               "'raydiff sample' command to sample it again")
        if rows != min(size, total - k * size):
            raise RaydiffError(f"{folder.uri(name)} holds {rows} images, not "
                               f"{min(size, total - k * size)}; rerun the same 'raydiff sample' "
                               "command to sample it again")
    return [folder.uri(n) for n in names]


def read_samples(out: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A complete sample folder as (uint8 NHWC images, labels, seeds), in index order."""
    folder = Folder(out)
    paths = [folder.path(shard_name(k)) for k in range(len(shard_paths(out)))]
    table = pq.read_table(paths, columns=["image", "label", "seed"], filesystem=folder.fs)
    return (decode_images(table.column("image").to_pylist()),
            table.column("label").to_numpy(), table.column("seed").to_numpy())


def label_folder(label: int, num_classes: int) -> str:
    """Zero-padded, so ImageFolder's sorted folder order is label order."""
    return f"{label:0{len(str(max(num_classes - 1, 0)))}d}"


def shard_rows(out: str | Path):
    """(index, label, PNG bytes) of every image, shard by shard."""
    folder = Folder(out)
    for k in range(len(shard_paths(out))):
        with folder.open_input_file(shard_name(k)) as f:
            table = pq.read_table(f, columns=["index", "label", "image"])
        yield from zip(*(table.column(c).to_pylist() for c in ("index", "label", "image")))


def export_imagefolder(out: Folder, manifest: dict) -> None:
    """images/<label>/<index>.png. Locally the folder appears whole (one rename); on an object
    store each file does, and the manifest lists the format once all are there."""
    num_classes = manifest["identity"]["num_classes"]
    if out.local is None:
        for index, label, data in shard_rows(out.location):
            out.write_bytes(f"{IMAGES_DIR}/{label_folder(label, num_classes)}/{index:08d}.png",
                            data)
        return
    if (out.local / IMAGES_DIR).is_dir():
        return
    with atomic_path(out.local / IMAGES_DIR) as tmp:
        for index, label, data in shard_rows(out.location):
            folder = tmp / label_folder(label, num_classes)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:08d}.png").write_bytes(data)


def npz_name(manifest: dict) -> str:
    res = manifest["identity"]["resolution"]
    return f"samples_{manifest['num_images']}x{res}x{res}x3.npz"


def export_npz(out: Folder, manifest: dict) -> None:
    if out.is_file(npz_name(manifest)):
        return
    images, labels, _ = read_samples(out.location)
    with out.writing_file(npz_name(manifest)) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images, arr_1=labels)  # a file object: numpy adds no second ".npz"


EXPORTS = {"imagefolder": export_imagefolder, "npz": export_npz}
