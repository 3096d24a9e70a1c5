"""How long ``raydiff prepare cifar10`` takes on a CIFAR-10-sized input.

Writes a synthetic CIFAR-10 folder in the exact torchvision layout (5 x 10,000 training images,
10,000 test images, smooth image-like pixels so PNG has something to compress), then times the
full prepare (CIFAR-10-LT at IR 100 plus the 50,000-image balanced reference) for each
``--workers`` value. Run: ``python benchmarks/prepare_speed.py [--workers 1 2]``.
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from raydiff.data.prepare import PrepareOptions, default_workers, prepare_dataset

TRAIN_PER_BATCH = 10_000
NUM_CLASSES = 10


def _pixels(n: int, rng: np.random.Generator) -> np.ndarray:
    """Blocky colour fields plus noise, as uint8 rows of 3072 (CHW) like CIFAR's ``data``."""
    coarse = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    fine = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3).astype(np.int16)
    noisy = fine + rng.integers(-8, 9, fine.shape, dtype=np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8).reshape(n, -1)


def write_synthetic_cifar10(root: Path, seed: int = 0) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in batches:
        labels = rng.permutation(np.repeat(np.arange(NUM_CLASSES), TRAIN_PER_BATCH // NUM_CLASSES))
        batch = {b"data": _pixels(TRAIN_PER_BATCH, rng), b"labels": labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{c}".encode() for c in range(NUM_CLASSES)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, default_workers()}))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="raydiff-bench-"))
    try:
        write_synthetic_cifar10(scratch / "src")
        for workers in args.workers:
            out = scratch / f"out-{workers}"
            start = time.perf_counter()
            info = prepare_dataset(
                PrepareOptions(source="cifar10", out=out, root=scratch / "src", workers=workers)
            )
            seconds = time.perf_counter() - start
            images = info.num_images("train") + info.num_images("reference")
            size_mb = sum(p.stat().st_size for p in out.rglob("*.parquet")) / 2**20
            print(
                f"workers={workers}: {seconds:.2f} s for {images} images "
                f"({images / seconds:,.0f} images/s, {size_mb:.0f} MiB of Parquet)"
            )
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
