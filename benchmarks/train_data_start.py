"""A short training run fed from memory vs through Ray Data, side by side.

`raydiff train` holds a training split of up to ``train.in_memory_max_images`` images in Ray's
object store, decoded once by the driver, and every worker draws its epochs from the arrays
(``raydiff.distributed.train.in_memory``); a larger split streams through a Ray Data pipeline
(a coordinator actor, read and decode tasks, an execution per epoch). This fits the same run
both ways (``train.in_memory_max_images`` at its default and at 0), alternating, after one
warm-up of each, and prints the medians of the whole fit and of the steady-state images/s
(the last report's), and their ratios.

    python benchmarks/train_data_start.py --data runs/datasets/shapes-16px --steps 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from raydiff import config as config_lib
from raydiff.distributed import runtime
from raydiff.distributed.train import TrainJob, run_training


def fit(data: str, storage: str, name: str, steps: int, batch: int, streamed: bool) -> tuple:
    overrides = [f"optim.total_steps={steps}", f"optim.batch_size={batch}",
                 f"train.log_every={max(1, steps // 3)}", f"train.ckpt_every={steps}",
                 "train.preview_per_class=0"]
    if streamed:
        overrides.append("train.in_memory_max_images=0")
    cfg = config_lib.resolve("tiny", overrides=overrides)
    start = time.perf_counter()
    run_training(TrainJob(data=data, cfg=cfg, storage=storage, name=name, max_failures=0))
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in
            (Path(storage) / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    return seconds, rows[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared dataset")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    runtime.init_ray(1)
    ways = {"in memory": False, "Ray Data": True}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    speed: dict[str, list[float]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as storage:
        for round_ in range(args.repeat + 1):
            for name, streamed in ways.items():
                took, images_per_s = fit(args.data, storage, f"r{round_}-{int(streamed)}",
                                         args.steps, args.batch_size, streamed)
                if round_:  # round 0 warms up both
                    seconds[name].append(took)
                    speed[name].append(images_per_s)
    print(f"{args.data}: {args.steps} steps of batch {args.batch_size} (tiny preset, 1 worker),"
          f" median of {args.repeat}")
    for name in ways:
        print(f"{name:<10} fit {statistics.median(seconds[name]):6.2f} s   "
              f"{statistics.median(speed[name]):7.1f} images/s (last report)")
    fit_ratio = statistics.median(seconds["Ray Data"]) / statistics.median(seconds["in memory"])
    speed_ratio = statistics.median(speed["in memory"]) / statistics.median(speed["Ray Data"])
    print(f"fit time Ray Data / in memory: {fit_ratio:.2f}x; "
          f"images/s in memory / Ray Data: {speed_ratio:.2f}x")


if __name__ == "__main__":
    main()
