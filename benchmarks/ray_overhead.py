"""What Ray Train costs over a plain training loop, at steady state, in one run.

Both train the same preset on the same prepared dataset for the same number of steps with
the same number of torch threads:

- plain: the core ``Engine`` fed by a torch DataLoader over the Parquet split, in this process;
- ray:   ``raydiff train`` with one Ray Train worker, data streamed through Ray Data.

Steady-state images/s skip the first ``--warmup`` steps of each (start-up, first epoch).
The plain loop runs before and after the Ray run and its two figures are averaged, so that
drift of the machine during the run shows up as the spread printed next to it.

    python benchmarks/ray_overhead.py --steps 120
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from raydiff import config as config_lib
from raydiff.data.dataset import SplitDataset
from raydiff.data.prepare import PrepareOptions, prepare_dataset
from raydiff.distributed.train import TrainJob, run_training
from raydiff.engine import Engine


def plain_images_per_s(cfg: config_lib.Config, data: Path, warmup: int) -> float:
    engine = Engine(cfg)
    loader = torch.utils.data.DataLoader(SplitDataset(data, "train"), shuffle=True,
                                         batch_size=cfg.optim.batch_size, drop_last=True)
    start = None
    while engine.step < cfg.optim.total_steps:
        for x0, y in loader:
            if engine.step == warmup:
                start = time.perf_counter()
            engine.train_step(torch.where(torch.rand(len(x0), 1, 1, 1) < 0.5, x0.flip(3), x0), y)
            if engine.step == cfg.optim.total_steps:
                break
    steps = cfg.optim.total_steps - warmup
    return steps * cfg.optim.batch_size / (time.perf_counter() - start)


def ray_images_per_s(cfg: config_lib.Config, data: Path, storage: Path, warmup: int,
                     threads: int) -> float:
    run_training(TrainJob(data=str(data), cfg=cfg, storage=str(storage), name="overhead",
                          workers=1, cpus_per_worker=threads, max_failures=0))
    rows = [json.loads(line) for line in
            (storage / "overhead" / "logs" / "metrics.jsonl").read_text().splitlines()]
    # each row's images_per_s covers the log interval that ends at its step
    steady = [r for r in rows if r.get("step", 0) > warmup]
    interval = cfg.train.log_every
    seconds = sum(interval * cfg.optim.batch_size / r["images_per_s"] for r in steady)
    return len(steady) * interval * cfg.optim.batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shapes"
        prepare_dataset(PrepareOptions(source="shapes", out=data, resolution=args.resolution))
        cfg = config_lib.resolve(args.preset, overrides=[
            f"optim.batch_size={args.batch_size}", f"optim.total_steps={args.steps}",
            f"model.resolution={args.resolution}", "model.num_classes=10",
            "train.log_every=10", f"train.ckpt_every={args.steps}",
            "train.preview_per_class=0"])
        before = plain_images_per_s(cfg, data, args.warmup)
        ray = ray_images_per_s(cfg, data, Path(tmp) / "runs", args.warmup, args.threads)
        after = plain_images_per_s(cfg, data, args.warmup)
    plain = (before + after) / 2
    print(f"preset={args.preset} {args.resolution}px batch={args.batch_size} "
          f"steps={args.steps} (steady state after {args.warmup}) threads={args.threads} "
          f"cpus={os.cpu_count()}")
    print(f"plain loop   {plain:8.1f} img/s  (before {before:.1f}, after {after:.1f})")
    print(f"Ray Train x1 {ray:8.1f} img/s")
    print(f"Ray / plain  {ray / plain:8.3f}  (overhead {100 * (1 - ray / plain):+.1f}%)")


if __name__ == "__main__":
    main()
