"""The feature pass of a cache-missing ``raydiff evaluate``: one Ray Data execution with
driver-read sets vs one execution per set through Ray Data's readers, side by side.

An evaluation whose reference features are not cached extracts three image sets: the generated
images, the reference images and the training images (for the copy rate). ``raydiff evaluate``
sends them through one union and one actor pool, and reads sets of up to
``DRIVER_READ_MAX_BYTES`` in the driver (``raydiff.distributed.evaluate.image_rows``). This
times that against one execution per set with every set read by Ray Data's Parquet readers
(``DRIVER_READ_MAX_BYTES = 0``), alternating, after one warm-up of each, with the cheap pixel
features so that what is timed is the pipeline, not a network.

    raydiff demo --steps 10 --per-class 2   # or any dataset and sample folder of it
    python benchmarks/eval_start.py --data runs/datasets/shapes-16px --samples runs/demo/samples
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from raydiff.accumulate import FeatureStream, GeneratedStream, class_cells, eval_sets
from raydiff.data import parquet
from raydiff.data.samples import load_manifest
from raydiff.distributed import evaluate, runtime
from raydiff.features import pixel_extractor
from raydiff.metrics import class_groups, shot_groups


def passes(job: evaluate.EvalJob, extractor) -> tuple[list[evaluate.FeaturePass], list]:
    """The three sets' passes (a fresh cache: both splits miss) and the cache entries they
    fill."""
    manifest = load_manifest(job.samples)
    info = parquet.load_info(job.reference)
    train_counts = info.counts("train")
    classes = manifest["identity"]["classes"]
    groups, shots = class_groups(train_counts), shot_groups(train_counts)
    cells = class_cells(info.num_classes, classes, groups, shots)
    generated = GeneratedStream(FeatureStream(cells, extractor.feature_dim, job.metric_subset, 0),
                                classes, manifest["identity"]["per_class"],
                                eval_sets(classes, groups, shots, True))
    cached = [evaluate.cached_split(job, extractor, split) for split in ("reference", "train")]
    return [c.pass_ for c in cached] + [evaluate.sample_pass(job, manifest, generated)], cached


def _images(todo: list[evaluate.FeaturePass], cached: list) -> int:
    for entry in cached:
        entry.discard()  # the next round extracts them again
    return sum(p.received for p in todo)


def one_execution(job, extractor) -> int:
    todo, cached = passes(job, extractor)
    evaluate.extract(job, extractor, todo)
    return _images(todo, cached)


def execution_per_set(job, extractor) -> int:
    todo, cached = passes(job, extractor)
    saved, evaluate.DRIVER_READ_MAX_BYTES = evaluate.DRIVER_READ_MAX_BYTES, 0
    try:
        for p in todo:
            evaluate.extract(job, extractor, [p])
    finally:
        evaluate.DRIVER_READ_MAX_BYTES = saved
    return _images(todo, cached)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared dataset")
    parser.add_argument("--samples", required=True, help="a sample folder of a model of it")
    parser.add_argument("--reference-per-class", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runtime.init_ray(1)
    extractor = pixel_extractor()
    ways = {"one execution, driver reads": one_execution,
            "an execution per set, Ray Data reads": execution_per_set}
    times: dict[str, list[float]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as cache:
        job = evaluate.EvalJob(samples=args.samples, reference=args.data, cache_dir=cache,
                               reference_per_class=args.reference_per_class)
        for round_ in range(args.repeat + 1):
            for name, way in ways.items():
                start = time.perf_counter()
                images = way(job, extractor)
                if round_:  # round 0 warms up both
                    times[name].append(time.perf_counter() - start)
    print(f"{args.data} + {args.samples}: {images} images in three sets, pixel features, "
          f"median of {args.repeat}")
    for name, values in times.items():
        print(f"{name:<38} {statistics.median(values):7.2f} s")
    medians = [statistics.median(v) for v in times.values()]
    print(f"per set / one execution: {medians[1] / medians[0]:.1f}x")


if __name__ == "__main__":
    main()
