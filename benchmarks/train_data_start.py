"""Building a small training split into Ray's object store: a Ray Data pass vs the driver.

`raydiff train` decodes a training split of up to 50,000 images on the driver and hands the
arrays to Ray Data as blocks (``raydiff.distributed.train.build_dataset``); larger splits
that still fit in memory go through a Ray Data read -> decode -> repartition -> materialize
pass. This times both ways on the same prepared dataset, alternating, after one warm-up
of each (task workers started), and prints the medians and their ratio.

    python benchmarks/train_data_start.py --data runs/datasets/shapes-16px --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray

from raydiff.data import parquet
from raydiff.distributed import runtime


def ray_data_pass(data: str, blocks: int):
    ds = ray.data.read_parquet(parquet.split_paths(data, "train")).select_columns(
        ["image", "label"])
    return ds.map_batches(parquet.decode_training_batch,
                          batch_format="numpy").repartition(blocks).materialize()


def driver_decode(data: str, blocks: int):
    images, labels = parquet.read_split_arrays(data, "train")
    return ray.data.from_items([{"image": image, "label": int(label)}
                                for image, label in zip(images, labels)],
                               override_num_blocks=blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared dataset")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    rows = parquet.load_info(args.data).num_images("train")
    blocks = max(1, rows // (2 * args.batch_size))
    runtime.init_ray(2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ways = {"Ray Data pass": ray_data_pass, "driver decode": driver_decode}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(args.repeat + 1):
        for name, build in ways.items():
            start = time.perf_counter()
            ds = build(args.data, blocks)
            first = next(iter(ds.iter_batches(batch_size=args.batch_size)))
            assert len(first["label"]) == min(args.batch_size, rows)
            if round_:  # round 0 warms up both
                times[name].append(time.perf_counter() - start)
    print(f"{args.data}: {rows} training images, {blocks} blocks, median of {args.repeat}")
    for name, values in times.items():
        print(f"{name:<14} {statistics.median(values):7.3f} s  (to the first batch)")
    ratio = statistics.median(times["Ray Data pass"]) / statistics.median(times["driver decode"])
    print(f"Ray Data pass / driver decode: {ratio:.1f}x")


if __name__ == "__main__":
    main()
