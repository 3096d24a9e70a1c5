"""A study's sampling and evaluation: one Ray Data pass per run vs one pass for all runs,
side by side.

``raydiff study`` samples every run through one actor pool (``run_samplings``) and evaluates
every run's samples in one pass (``run_evaluations``), where it used to start a pool per run
and per stage. Both write the same sample shards and the same metrics. This script times the
two over the same ``--runs`` untrained checkpoints (sampling and feature extraction cost the
same as a trained one's): per run, ``run_sampling`` then ``run_evaluation`` for each; in one
pass, ``run_samplings`` then ``run_evaluations``. Ray is started once and an untimed run of
each warms it up (and fills the reference-feature cache both then read); the two designs
alternate over ``--repeats`` and the medians are printed, with the ratio. The features are
Inception's network with stand-in random weights unless ``--inception-weights`` is given:
the same cost as the real weights.

    python benchmarks/study_passes.py                          # 4 runs of the tiny preset
    python benchmarks/study_passes.py --runs 8 --per-class 8 --actors 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from raydiff import config as config_lib
from raydiff.data.prepare import PrepareOptions, prepare_dataset
from raydiff.distributed import runtime
from raydiff.distributed.evaluate import EvalJob, run_evaluation, run_evaluations
from raydiff.distributed.sample import SampleJob, run_sampling, run_samplings
from raydiff.engine import Engine
from raydiff.features import write_random_inception_weights


def checkpoints(preset: str, runs: int, folder: Path, num_classes: int) -> list[str]:
    """``runs`` untrained checkpoints of ``preset``, each with its own seed."""
    return [str(Engine(config_lib.resolve(preset, overrides=[
        f"train.seed={k}", f"model.num_classes={num_classes}"])).save(
            folder / f"run{k}" / "checkpoint_000000000")) for k in range(runs)]


def jobs(args, ckpts: list[str], data: Path, out: Path) -> tuple[list[SampleJob], list[EvalJob]]:
    samples = [SampleJob(checkpoint=c, out=str(out / f"samples{k}"), per_class=args.per_class,
                         actors=args.actors, forward_batch=8, shard_size=64)
               for k, c in enumerate(ckpts)]
    evals = [EvalJob(samples=s.out, reference=str(data), groups=True, features="inception",
                     inception_weights=args.inception_weights, download=False,
                     copying=False,
                     actors=args.actors, batch_size=32, cache_dir=str(out.parent / "cache"),
                     out=str(out / f"eval{k}")) for k, s in enumerate(samples)]
    return samples, evals


def per_run(samples: list[SampleJob], evals: list[EvalJob]) -> None:
    for job in samples:
        run_sampling(job)
    for job in evals:
        run_evaluation(job)


def one_pass(samples: list[SampleJob], evals: list[EvalJob]) -> None:
    run_samplings(samples)
    run_evaluations(evals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inception-weights", help="default: stand-in random weights")
    args = parser.parse_args()
    runtime.init_ray(max(2, args.actors))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "shapes16"
        prepare_dataset(PrepareOptions(source="shapes", out=data, resolution=16, num_classes=4,
                                       images_per_class=48, imbalance_ratio=4.0))
        ckpts = checkpoints(args.preset, args.runs, root / "ckpt", 4)
        if args.inception_weights is None:
            args.inception_weights = str(write_random_inception_weights(root / "inception.pth"))
        designs = {"per run": per_run, "one pass": one_pass}
        times: dict[str, list[float]] = {name: [] for name in designs}
        for repeat in range(args.repeats + 1):  # repeat 0 warms Ray, the cache and imports
            order = list(designs) if repeat % 2 == 0 else list(designs)[::-1]
            for name in order:
                out = root / f"{name.replace(' ', '-')}-{repeat}"
                samples, evals = jobs(args, ckpts, data, out)
                start = time.perf_counter()
                designs[name](samples, evals)
                if repeat:
                    times[name].append(time.perf_counter() - start)
        print(f"{args.runs} runs of {args.preset}, {args.per_class * 4} images each, "
              f"{args.actors} actor(s), Inception features, median of {args.repeats}")
        print(f"{'design':10} {'sample+evaluate s':>18} {'vs per run':>11}")
        base = statistics.median(times["per run"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:10} {median:18.2f} {base / median:10.2f}x")


if __name__ == "__main__":
    main()
