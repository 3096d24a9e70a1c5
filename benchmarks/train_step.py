"""Cost of a CCUA training step relative to a plain DDPM step, measured side by side.

Same preset, same batch, same device, in one process; the configurations are timed in
round-robin order so that drift of the machine affects them alike. Prints the median step
time of each and its ratio to DDPM. The unpadded case runs CCUA with its unconditional rows
not padded to a multiple of ``losses.UNCOND_ROW_MULTIPLE`` (a new batch shape every step).

    python benchmarks/train_step.py                      # cifar32, CPU: batch 8
    python benchmarks/train_step.py --preset tiny-vpred --batch-size 64   # the demo's step
    python benchmarks/train_step.py --device cuda --batch-size 128 --bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raydiff import config as config_lib
from raydiff import losses
from raydiff.engine import Engine

CASES = {
    "ddpm": ["loss.method=ddpm"],
    "ccua t_align=0": ["loss.method=ccua", "loss.ucl_weight=1", "loss.al_weight=1",
                       "loss.t_align=0"],
    "ccua t_align=T/2": ["loss.method=ccua", "loss.ucl_weight=1", "loss.al_weight=1",
                         "loss.t_align=500"],
}
UNPADDED = "ccua unpadded"  # t_align=0, one unconditional row count per step
CASES[UNPADDED] = CASES["ccua t_align=0"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    common = [f"optim.batch_size={args.batch_size}", "optim.warmup_steps=0",
              f"train.bf16={args.bf16}", f"train.channels_last={args.channels_last}"]
    engines = {name: Engine(config_lib.resolve(args.preset, overrides=common + extra), device)
               for name, extra in CASES.items()}
    res = engines["ddpm"].cfg.model.resolution
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(args.batch_size, 3, res, res, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, engines["ddpm"].cfg.model.num_classes, (args.batch_size,),
                      generator=g).to(device)

    times: dict[str, list[float]] = {name: [] for name in CASES}
    padded = losses.UNCOND_ROW_MULTIPLE
    for i in range(args.warmup + args.steps):
        for name, engine in engines.items():
            losses.UNCOND_ROW_MULTIPLE = 1 if name == UNPADDED else padded
            _sync(device)
            start = time.perf_counter()
            engine.train_step(x0, y)
            _sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads")
    print(f"preset={args.preset} batch={args.batch_size} device={name} bf16={args.bf16} "
          f"channels_last={args.channels_last} steps={args.steps}")
    base = statistics.median(times["ddpm"])
    print(f"{'configuration':<18} {'median s/step':>14} {'images/s':>10} {'vs ddpm':>8}")
    for case, ts in times.items():
        med = statistics.median(ts)
        print(f"{case:<18} {med:>14.4f} {args.batch_size / med:>10.1f} {med / base:>7.2f}x")


if __name__ == "__main__":
    main()
