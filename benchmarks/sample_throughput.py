"""Images/s of ``raydiff sample`` with the shards written by the actors vs by the driver, with
1 and 2 actors, side by side.

``raydiff sample`` has each actor write the shards it samples (``SampleJob(write_in_actors=
True)``, the default); before, the actors returned PNG rows and the driver assembled and wrote
every shard (``write_in_actors=False``, kept for this comparison). Both write the same bytes.
Every configuration runs ``run_sampling`` from the request to the finished manifest over the
same checkpoint (an untrained one by default: sampling costs the same), sampler settings and
images, into a fresh folder. Ray is started once, and one small untimed run of each
writer warms it up; configurations alternate, in reverse order on every other repeat, and the
median of each is reported. Every actor call is one shard in both designs.

Columns: the end-to-end time and images/s (actors starting and loading the network included);
the steady images/s once every actor has written its first shard (from the shard files'
modification times: start-up excluded); the driver process's CPU seconds (its Ray Data
executor, and with driver-side writes the rows it receives, assembles and writes).

    python benchmarks/sample_throughput.py                 # tiny preset, 1x1 and 2x1 actors
    python benchmarks/sample_throughput.py --loop          # also a plain in-process loop
    python benchmarks/sample_throughput.py --checkpoint runs/demo --pipelines 4x1 --gpus-per-actor 1

``--loop`` adds a plain loop in this process doing an actor's work (``sample_aligned`` over
consecutive blocks of ``--forward-batch`` images, PNG encoding) with all threads: what the
pipeline costs over no Ray at all.
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
import pyarrow.parquet as pq
import torch

from raydiff import config as config_lib
from raydiff.data.images import encode_png_batch
from raydiff.diffusion import make_process
from raydiff.distributed import runtime
from raydiff.distributed.sample import SampleJob, prepare_run, resolve_checkpoint, run_sampling
from raydiff.engine import Engine, load_for_sampling
from raydiff.samplers import sample_aligned

WRITES = {"driver": False, "actors": True}  # --writes name -> SampleJob.write_in_actors


def fresh_checkpoint(preset: str, folder: Path) -> str:
    """An untrained checkpoint of ``preset``: sampling costs the same as a trained one's."""
    return str(Engine(config_lib.resolve(preset)).save(folder / "checkpoint_000000000"))


def run_loop(job: SampleJob, device: str) -> dict[str, float]:
    """The plain loop over the same images, in this process."""
    start, cpu = time.perf_counter(), time.process_time()
    run = prepare_run(job)
    model, _ = load_for_sampling(run.checkpoint, device=device)
    diffusion = make_process(run.cfg.diffusion)
    plan = run.plan
    for first in range(0, plan.num_images, job.forward_batch):
        indices = np.arange(first, min(first + job.forward_batch, plan.num_images))
        images = sample_aligned(model, diffusion, run.cfg.sample, indices, plan.labels(indices),
                                plan.seeds(indices), job.forward_batch)
        encode_png_batch(images)
    return {"seconds": time.perf_counter() - start, "steady": float("nan"),
            "driver_cpu": time.process_time() - cpu}


def steady_images_per_s(out: str, actors: int) -> float:
    """Images/s once every actor has written its first shard: the images of the later shards
    over the time from the ``actors``-th shard file to the last (their modification times,
    when each was written whole)."""
    shards = sorted(Path(out, "shards").glob("shard-*.parquet"), key=lambda p: p.stat().st_mtime)
    if len(shards) <= actors:
        return float("nan")
    images = sum(pq.read_metadata(p).num_rows for p in shards[actors:])
    return images / (shards[-1].stat().st_mtime - shards[actors - 1].stat().st_mtime)


def run_pipeline(job: SampleJob) -> dict[str, float]:
    start, cpu = time.perf_counter(), time.process_time()
    run_sampling(job)
    return {"seconds": time.perf_counter() - start,
            "steady": steady_images_per_s(job.out, job.actors),
            "driver_cpu": time.process_time() - cpu}


def report(times: dict[str, list[dict[str, float]]], n: int) -> None:
    print(f"{'writes  actors x CPUs':<22} {'median s':>9} {'images/s':>9} {'steady/s':>9} "
          f"{'driver CPU s':>13} {'vs driver':>10}   runs (s)")
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in times.items()}
    for name, m in medians.items():
        writes, _, shape = name.partition(" ")
        base = medians.get(f"driver {shape}")
        ratio = f"{base['seconds'] / m['seconds']:9.2f}x" if base and writes != "loop" else ""
        print(f"{name:<22} {m['seconds']:>9.2f} {n / m['seconds']:>9.2f} {m['steady']:>9.2f} "
              f"{m['driver_cpu']:>13.2f} {ratio:>10}   "
              + " ".join(f"{r['seconds']:.1f}" for r in times[name]))
    shapes = sorted({name.partition(" ")[2] for name in medians if not name.startswith("loop")})
    if len(shapes) == 2:
        for writes in WRITES:
            one, two = (medians.get(f"{writes} {shape}") for shape in shapes)
            if one and two:
                print(f"shards written by the {writes}, {shapes[1]} vs {shapes[0]}: "
                      f"{one['seconds'] / two['seconds']:.2f}x images/s end to end, "
                      f"{two['steady'] / one['steady']:.2f}x steady")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a checkpoint or run folder (default: a fresh one)")
    parser.add_argument("--preset", default="tiny", help="preset of the fresh checkpoint")
    parser.add_argument("--images", type=int, default=1024, help="images per run (balanced)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--forward-batch", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--pipelines", default="1x1,2x1",
                        help="comma-separated ACTORSxCPUS_PER_ACTOR configurations")
    parser.add_argument("--writes", default="driver,actors",
                        help="who writes the shards: comma-separated driver, actors")
    parser.add_argument("--loop", action="store_true", help="also time a plain loop")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating")
    args = parser.parse_args()

    import ray

    device = "cuda" if args.gpus_per_actor > 0 else "cpu"
    pipelines = [tuple(float(v) for v in p.split("x")) for p in args.pipelines.split(",")]
    writes = args.writes.split(",")
    if set(writes) - set(WRITES):
        parser.error(f"--writes takes {', '.join(WRITES)}, got {args.writes!r}")
    configs = [(w, a, c) for a, c in pipelines for w in writes]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or fresh_checkpoint(args.preset, Path(tmp))
        num_classes = config_lib.load_json(
            Path(resolve_checkpoint(checkpoint)) / "config.json").model.num_classes
        per_class = max(1, args.images // num_classes)
        runtime.init_ray(max(a * c for a, c in pipelines))  # a CPU over for the driver
        times: dict[str, list[dict[str, float]]] = {}
        # one shard per actor call either way (the driver-side writer's batches, too)
        job = SampleJob(checkpoint=checkpoint, out="", per_class=per_class, steps=args.steps,
                        gpus_per_actor=args.gpus_per_actor, forward_batch=args.forward_batch,
                        shard_size=args.shard_size, batch_size=args.shard_size)
        for w in writes:  # warm-up, untimed: Ray Data's first execution, files in page cache
            run_pipeline(dataclasses.replace(job, out=str(Path(tmp) / f"warm-up-{w}"),
                                             per_class=max(1, args.shard_size // num_classes),
                                             write_in_actors=WRITES[w]))
        for repeat in range(args.repeats):
            if args.loop:
                times.setdefault("loop", []).append(run_loop(job, device))
            for w, actors, cpus in configs if repeat % 2 == 0 else configs[::-1]:
                name = f"{w} {actors:g}x{cpus:g}"
                out = str(Path(tmp) / f"{name.replace(' ', '-')}-{repeat}")
                times.setdefault(name, []).append(run_pipeline(dataclasses.replace(
                    job, out=out, actors=int(actors), cpus_per_actor=cpus,
                    write_in_actors=WRITES[w])))
        ray.shutdown()

    n = per_class * num_classes
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"checkpoint={args.checkpoint or 'fresh ' + args.preset} images={n} "
          f"ddim_steps={args.steps} forward_batch={args.forward_batch} "
          f"shard_size={args.shard_size} gpus_per_actor={args.gpus_per_actor:g}; {where}; "
          f"torch {torch.__version__}, ray {ray.__version__}; repeats={args.repeats}")
    report(times, n)


if __name__ == "__main__":
    main()
