"""The driver's peak memory in ``raydiff evaluate`` at two sample counts, side by side.

``raydiff evaluate`` streams the generated images' features into bounded accumulators
(``raydiff.accumulate``): float64 statistics for FID, seeded subsets of ``--metric-subset``
rows for KID, P/R, copy rate and diversity, split sums for IS. Its peak should not grow with
the number of images once the subsets are full. This measures it at (by default) 2,000 and
20,000 generated images of the same 16 px dataset and, with ``--compare-with REV``, the same
for the raydiff of a git revision (run from a copy made with ``git archive``), e.g. the code
before streaming, which kept every feature row on the driver.

Each evaluation runs in a fresh Python process that starts its local Ray, evaluates a
100-image folder (which imports every module, starts Ray Data's machinery and, in the first
process, fills the reference-feature cache that every later evaluation reads), then resets
its RSS high-water mark (``/proc/self/clear_refs``, Linux), starts ``tracemalloc`` and runs
the measured evaluation. It reports three peaks above that starting point, all of the driver
process only (Ray's actors and object store are other processes):

- ``tracemalloc``: the peak of Python's and NumPy's heap allocations (the evaluation's own
  arrays; torch's allocator is not traced), exact;
- ``private RSS``: the peak of RssAnon (private memory, torch's tensors included), sampled
  every 10 ms, so a spike shorter than that can be missed;
- ``RSS``: VmHWM minus the RSS at the start, exact: everything the process touched, also the
  object-store pages it read Ray Data's blocks from (shared memory, freed by the store, not
  by the driver).

Sample sets of up to ``DRIVER_READ_MAX_BYTES`` (8 MiB) of Parquet are read by the driver
itself and handed to Ray Data as blocks, a start-up shortcut (``benchmarks/eval_start.py``)
whose memory grows with the set up to that size and no further; larger sets stream through
Ray Data's readers. The new code is measured with that default ("default": the set's Parquet
size, printed, says which way it went) and with every set through Ray Data
(``DRIVER_READ_MAX_BYTES = 0``), so what the accumulators cost shows apart from what the
shortcut costs.

Features: a ``raydiff classify`` ResNet-10 of width 64 with random weights (512-d features,
10 logits; seconds per thousand images on a CPU). Samples: reference images of their class
with seeded pixel noise, written as a ``raydiff sample`` folder (image i has label i % 10).

    python benchmarks/eval_memory.py --compare-with f2ff915
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from raydiff.data import parquet
from raydiff.data.images import encode_png_batch
from raydiff.data.prepare import PrepareOptions, prepare_dataset
from raydiff.data.samples import (
    FORMAT_VERSION,
    LABELS_RULE,
    MANIFEST,
    SamplePlan,
    write_shard,
)
from raydiff.storage import Folder

REPO = Path(__file__).resolve().parents[1]
MARK = "EVAL-MEMORY "
WARM_UP_IMAGES = 100

# Runs in a fresh interpreter with the raydiff under test first on PYTHONPATH.
CHILD = r"""
import dataclasses, json, sys, threading, time, tracemalloc
from raydiff.distributed import evaluate, runtime

spec, warm_up = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if "driver_read_max_bytes" in spec:
    evaluate.DRIVER_READ_MAX_BYTES = spec["driver_read_max_bytes"]
fields = {f.name for f in dataclasses.fields(evaluate.EvalJob)}
job = evaluate.EvalJob(**{k: v for k, v in spec.items() if k in fields})
runtime.init_ray(job.actors * job.cpus_per_actor)
# a first, small evaluation imports every module and starts Ray Data's machinery
evaluate.run_evaluation(dataclasses.replace(job, **warm_up))


def status():
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                if line.split(":")[0] in ("VmRSS", "VmHWM", "RssAnon")}


anon_peak, done = [0], threading.Event()


def sample_anon():  # Linux keeps no high-water mark of private memory alone
    while not done.is_set():
        anon_peak[0] = max(anon_peak[0], status()["RssAnon"])
        done.wait(0.01)


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
start = status()
sampler = threading.Thread(target=sample_anon, daemon=True)
sampler.start()
tracemalloc.start()
clock = time.monotonic()
result = evaluate.run_evaluation(job)
seconds = time.monotonic() - clock
_, traced_peak = tracemalloc.get_traced_memory()
done.set()
sampler.join()
overall = result["sets"]["overall"]
print("EVAL-MEMORY " + json.dumps({
    "traced_peak": traced_peak, "anon_peak": anon_peak[0] - start["RssAnon"],
    "rss_peak": status()["VmHWM"] - start["VmRSS"], "seconds": seconds,
    "num_generated": overall["num_generated"], "fid": overall.get("fid"),
    "has_metric_subset": "metric_subset" in fields}))
"""


def random_classifier(out: Path, width: int, num_classes: int, resolution: int) -> Path:
    import torch

    from raydiff.classifier import build_classifier, save_classifier
    from raydiff.config import ClassifierConfig

    torch.manual_seed(0)
    cfg = ClassifierConfig(arch="resnet10", width=width, num_classes=num_classes,
                           resolution=resolution)
    return save_classifier(out, cfg, 0, dict(build_classifier(cfg).eval().state_dict()))


def write_samples(out: Path, data: Path, num_images: int, shard_size: int = 4096) -> Path:
    """A sample folder of ``num_images``: reference images of image i's class (label
    i % classes, the labels rule of ``raydiff sample``) with seeded noise of +-16 levels."""
    info = parquet.load_info(data)
    images, labels = parquet.read_split_arrays(data, "reference")
    classes = tuple(range(info.num_classes))
    plan = SamplePlan(classes, num_images // len(classes), seed=0, shard_size=shard_size)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    folder = Folder(out)
    folder.makedirs("shards")
    rng = np.random.default_rng(0)
    for shard in range(plan.num_shards):
        start, stop = plan.shard_bounds(shard)
        index = np.arange(start, stop)
        label = plan.labels(index)
        pick = [by_class[c][(i // len(classes)) % len(by_class[c])] for i, c in zip(index, label)]
        noisy = images[pick].astype(np.int16) + rng.integers(-16, 17, images[pick].shape)
        write_shard(folder, shard, {
            "index": index, "label": label, "seed": plan.seeds(index),
            "image": np.array(encode_png_batch(np.clip(noisy, 0, 255).astype(np.uint8)),
                              dtype=object)}, start, stop)
    folder.write_json(MANIFEST, {
        "kind": "raydiff-samples", "format_version": FORMAT_VERSION,
        "identity": {"classes": list(classes), "per_class": plan.per_class,
                     "num_classes": info.num_classes, "resolution": info.resolution,
                     "shard_size": shard_size, "seed": 0},
        "labels_rule": LABELS_RULE, "num_images": plan.num_images,
        "num_shards": plan.num_shards,
        "class_counts": {str(c): plan.per_class for c in classes}, "formats": ["parquet"],
        "complete": True})
    return out


def measure(code: Path, job: dict, warm_up: dict, work: Path) -> dict:
    """One evaluation in a fresh process that imports raydiff from ``code`` (run in ``work``:
    with ``-c``, Python puts the working directory first on sys.path), after a ``warm_up``
    evaluation (the fields of the job it changes)."""
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job), json.dumps(warm_up)],
                          env=env, capture_output=True, text=True, cwd=work)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        raise RuntimeError(f"evaluation with {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def old_code(work: Path, revision: str) -> Path:
    """The raydiff package of ``revision``, copied out of this repository with git archive."""
    out = work / f"raydiff-{revision}"
    shutil.rmtree(out, ignore_errors=True)  # a kept --work folder: copied afresh
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "raydiff"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2_000, 20_000])
    parser.add_argument("--metric-subset", type=int, default=200,
                        help="small enough that the subsets are full at the smallest count")
    parser.add_argument("--width", type=int, default=64, help="classifier width (features: 8x)")
    parser.add_argument("--reference-per-class", type=int, default=100)
    parser.add_argument("--compare-with", metavar="REV",
                        help="also measure the raydiff of this git revision")
    parser.add_argument("--work", type=Path, help="keep the data here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "shapes16"
        if not (data / parquet.INFO_FILE).exists():
            prepare_dataset(PrepareOptions(source="shapes", out=data, resolution=16))
        info = parquet.load_info(data)
        classifier = work / "classifier"
        if not classifier.exists():
            random_classifier(classifier, args.width, info.num_classes, info.resolution)
        samples = {n: work / f"samples-{n}" for n in [WARM_UP_IMAGES, *args.images]}
        for n, out in samples.items():
            if not (out / MANIFEST).exists():
                write_samples(out, data, n)
        base = {"reference": str(data), "features": f"classifier:{classifier}", "groups": True,
                "actors": 1, "reference_per_class": args.reference_per_class,
                "metric_subset": args.metric_subset, "cache_dir": str(work / "cache")}
        runs = [("this tree", REPO, {}), ("this tree", REPO, {"driver_read_max_bytes": 0})]
        if args.compare_with:
            runs.append((args.compare_with, old_code(work, args.compare_with), {}))
        warm_up = {"samples": str(samples[WARM_UP_IMAGES]), "out": str(work / "warm-up")}
        rows = []
        for k, (name, code, extra) in enumerate(runs):
            for n in args.images:
                got = measure(code, {**base, **extra, "samples": str(samples[n]),
                                     "out": str(work / f"eval-{k}-{n}")}, warm_up, work)
                size = sum(f.stat().st_size for f in samples[n].rglob("*.parquet"))
                rows.append((name, "Ray Data" if extra else f"default {size / 2**20:.1f} MiB",
                             got))
    dim = 8 * args.width
    print(f"{info.num_classes} classes at {info.resolution} px: {info.num_images('train')} "
          f"training images, {args.reference_per_class} reference images per class; random "
          f"ResNet-10 features ({dim}-d), --groups, copy rate on; driver peaks above its state "
          f"after a warm-up evaluation")
    print(f"{'code':<10} {'samples read by':>18} {'images':>7} {'--metric-subset':>15} "
          f"{'tracemalloc MiB':>15} {'private RSS MiB':>15} {'RSS MiB':>8} {'seconds':>8} "
          f"{'FID':>7}")
    for name, reader, got in rows:
        subset = str(args.metric_subset) if got["has_metric_subset"] else "-"
        print(f"{name:<10} {reader:>18} {got['num_generated']:>7} {subset:>15} "
              f"{got['traced_peak'] / 2**20:>15.1f} {got['anon_peak'] / 2**20:>15.1f} "
              f"{got['rss_peak'] / 2**20:>8.1f} {got['seconds']:>8.1f} {got['fid']:>7.4f}")
    feature_mib = [n * dim * 4 / 2**20 for n in args.images]
    print("the generated set's feature rows alone: " + ", ".join(
        f"{mib:.1f} MiB at {n}" for n, mib in zip(args.images, feature_mib)))


if __name__ == "__main__":
    main()
