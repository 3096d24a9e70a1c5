"""Images/s of the Ray Data sampling pipeline vs a plain in-process loop, side by side.

Same checkpoint, sampler settings, forward batch and image count. The loop runs
``sample_aligned`` over consecutive blocks of ``--forward-batch`` images and PNG-encodes them
(the work an actor does) in this process with all threads; the pipeline is ``run_sampling``
from the request to the finished manifest: actors starting and loading the model, sampling,
the driver writing Parquet shards. Ray itself is started once, before any timing. Runs
alternate (loop, pipeline, loop, ...) so that drift of a shared machine hits both alike; the
median of each is reported.

    python benchmarks/sample_throughput.py                 # tiny preset; pipelines 1x2 and 2x1 CPUs
    python benchmarks/sample_throughput.py --preset cifar32 --images 256 --steps 10
    python benchmarks/sample_throughput.py --checkpoint runs/demo --pipelines 4x1 --gpus-per-actor 1

``--pipelines 1x2,2x1`` times one actor with 2 CPUs (the loop's resources: what Ray costs) and
two actors with 1 CPU each (how a pool would be used).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raydiff import config as config_lib
from raydiff.data.images import encode_png_batch
from raydiff.diffusion import GaussianDiffusion
from raydiff.distributed.sample import SampleJob, prepare_run, resolve_checkpoint, run_sampling
from raydiff.engine import Engine, load_for_sampling
from raydiff.samplers import sample_aligned


def fresh_checkpoint(preset: str, folder: Path) -> str:
    """An untrained checkpoint of ``preset``: sampling costs the same as a trained one's."""
    return str(Engine(config_lib.resolve(preset)).save(folder / "checkpoint_000000000"))


def run_loop(job: SampleJob, device: str) -> float:
    """Seconds for the plain loop over the same images."""
    start = time.perf_counter()
    run = prepare_run(job)
    model, _ = load_for_sampling(run.checkpoint, device=device)
    diffusion = GaussianDiffusion(run.cfg.diffusion)
    plan = run.plan
    for first in range(0, plan.num_images, job.forward_batch):
        indices = np.arange(first, min(first + job.forward_batch, plan.num_images))
        images = sample_aligned(model, diffusion, run.cfg.sample, indices, plan.labels(indices),
                                plan.seeds(indices), job.forward_batch)
        encode_png_batch(images)
    return time.perf_counter() - start


def run_pipeline(job: SampleJob) -> float:
    start = time.perf_counter()
    run_sampling(job)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a checkpoint or run folder (default: a fresh one)")
    parser.add_argument("--preset", default="tiny", help="preset of the fresh checkpoint")
    parser.add_argument("--images", type=int, default=2000, help="images per run (balanced)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--forward-batch", type=int, default=32)
    parser.add_argument("--pipelines", default="1x2,2x1",
                        help="comma-separated ACTORSxCPUS_PER_ACTOR configurations")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating")
    args = parser.parse_args()

    import ray

    device = "cuda" if args.gpus_per_actor > 0 else "cpu"
    pipelines = [tuple(float(v) for v in p.split("x")) for p in args.pipelines.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or fresh_checkpoint(args.preset, Path(tmp))
        num_classes = config_lib.load_json(
            Path(resolve_checkpoint(checkpoint)) / "config.json").model.num_classes
        per_class = max(1, args.images // num_classes)
        ray.init(num_cpus=max([os.cpu_count() or 1] + [int(a * c) + 1 for a, c in pipelines]))
        times: dict[str, list[float]] = {"loop": []}
        for repeat in range(args.repeats):
            job = SampleJob(checkpoint=checkpoint, out="", per_class=per_class, steps=args.steps,
                            gpus_per_actor=args.gpus_per_actor,
                            forward_batch=args.forward_batch, shard_size=4 * args.forward_batch)
            times["loop"].append(run_loop(job, device))
            for actors, cpus in pipelines:
                name = f"pipeline {actors:g}x{cpus:g}"
                out = str(Path(tmp) / f"{name.replace(' ', '-')}-{repeat}")
                times.setdefault(name, []).append(run_pipeline(dataclasses.replace(
                    job, out=out, actors=int(actors), cpus_per_actor=cpus)))
        ray.shutdown()

    n = per_class * num_classes
    where = torch.cuda.get_device_name() if device == "cuda" else (
        f"CPU, loop with {torch.get_num_threads()} threads")
    print(f"checkpoint={args.checkpoint or 'fresh ' + args.preset} images={n} "
          f"ddim_steps={args.steps} forward_batch={args.forward_batch} "
          f"gpus_per_actor={args.gpus_per_actor:g}; {where}; repeats={args.repeats}")
    loop = statistics.median(times["loop"])
    print(f"{'(actors x CPUs)':<16} {'median s':>9} {'images/s':>9} {'vs loop':>8}   runs (s)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<16} {med:>9.2f} {n / med:>9.2f} {loop / med:>7.2f}x   "
              + " ".join(f"{t:.1f}" for t in ts))


if __name__ == "__main__":
    main()
