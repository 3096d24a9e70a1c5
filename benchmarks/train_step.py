"""Cost of a CCUA training step relative to a plain DDPM step, and of host synchronisation
and ``torch.compile``, measured side by side.

Same preset, same batch, same device, in one process; the configurations are timed in
round-robin order so that drift of the machine affects them alike. The first table gives the
median step time of each method and its ratio to DDPM. The unpadded case runs CCUA with its
unconditional rows not padded to a multiple of ``losses.UNCOND_ROW_MULTIPLE`` (a new batch
shape every step).

The second table times windows of ``--window`` consecutive steps (one device sync at the end of
each window) for DDPM and CCUA three ways: reading every term and the gradient norm as a
Python float after every step (what a training loop that logs each step does: a host
synchronisation per value), leaving them on the device until ``Engine.collect`` at the end
of the window (what raydiff does), and the same with ``train.compile=true`` (skipped with
``--no-compile``; ``--warmup`` untimed windows of every configuration first, which hold the
compiles).

Under a flow-matching preset (SiT) the cases are plain flow matching, CCUA (its unconditional
rows padded and unpadded), Dispersive Loss and diffrop, and the ratio is to plain flow matching.

    python benchmarks/train_step.py                      # cifar32, CPU: batch 8
    python benchmarks/train_step.py --preset tiny-vpred --batch-size 64   # the demo's step
    python benchmarks/train_step.py --device cuda --batch-size 128 --bf16
    python benchmarks/train_step.py --preset sit-s2-imagenet-lt-256 --batch-size 8 --no-compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raydiff import config as config_lib
from raydiff import losses
from raydiff.engine import Engine

UNPADDED = "ccua unpadded"  # t_align=0, one unconditional row count per step
# The first case of a process is the baseline of its ratios; COMPARED is the CCUA case the
# second table times against it.
CASES = {
    "ddpm": {
        "ddpm": ["loss.method=ddpm"],
        "ccua t_align=0": ["loss.method=ccua", "loss.ucl_weight=1", "loss.al_weight=1",
                           "loss.t_align=0"],
        "ccua t_align=T/2": ["loss.method=ccua", "loss.ucl_weight=1", "loss.al_weight=1",
                             "loss.t_align=500"],
        UNPADDED: ["loss.method=ccua", "loss.ucl_weight=1", "loss.al_weight=1",
                   "loss.t_align=0"],
    },
    "flow": {
        "flow": ["loss.method=ddpm"],
        "ccua": ["loss.method=ccua"],  # the preset's weights; the cost does not depend on them
        UNPADDED: ["loss.method=ccua"],
        "dispersive": ["loss.method=dispersive"],
        "diffrop": ["loss.method=diffrop"],
    },
}
COMPARED = {"ddpm": "ccua t_align=T/2", "flow": "ccua"}


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
    parser.add_argument("--window", type=int, default=5, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per configuration")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    common = [f"optim.batch_size={args.batch_size}", "optim.warmup_steps=0",
              f"train.bf16={args.bf16}", f"train.channels_last={args.channels_last}"]
    process = config_lib.preset(args.preset).diffusion.process
    cases = CASES[process]
    engines = {name: Engine(config_lib.resolve(args.preset, overrides=common + extra), device)
               for name, extra in cases.items()}
    base_name = next(iter(cases))
    model_cfg = engines[base_name].cfg.model
    res = model_cfg.resolution
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(args.batch_size, model_cfg.in_channels, res, res, generator=g) * 2 - 1
          ).to(device)
    y = torch.randint(0, model_cfg.num_classes, (args.batch_size,), generator=g).to(device)

    times: dict[str, list[float]] = {name: [] for name in cases}
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
    print(f"preset={args.preset} ({model_cfg.backbone}, {process}) batch={args.batch_size} "
          f"device={name} bf16={args.bf16} channels_last={args.channels_last} "
          f"steps={args.steps}")
    base = statistics.median(times[base_name])
    print(f"{'configuration':<18} {'median s/step':>14} {'images/s':>10} {'vs ' + base_name:>8}")
    for case, ts in times.items():
        med = statistics.median(ts)
        print(f"{case:<18} {med:>14.4f} {args.batch_size / med:>10.1f} {med / base:>7.2f}x")
    print()
    sync_and_compile(args, device, common, x0, y, process)


def sync_and_compile(args, device: torch.device, common: list[str], x0: torch.Tensor,
                     y: torch.Tensor, process: str) -> None:
    """Windows of steps: per-step host reads vs one collect per window, eager vs compiled."""
    cases = CASES[process]
    methods = {"plain": next(iter(cases.values())), "ccua": cases[COMPARED[process]]}
    variants = [("per-step sync", False, True), ("no per-step sync", False, False)]
    if not args.no_compile:
        variants.append(("compiled, no sync", True, False))
    engines = {(m, label): (Engine(config_lib.resolve(
        args.preset, overrides=common + extra + [f"train.compile={compiled}"]), device), per_step)
        for m, extra in methods.items() for label, compiled, per_step in variants}

    def window(engine: Engine, per_step: bool, steps: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            out = engine.train_step(x0, y)
            if per_step:
                {name: float(v) for name, v in out.items()}  # noqa: B018 - the reads timed
        engine.collect()
        _sync(device)
        return (time.perf_counter() - start) / steps

    # warm-up: compiles (CCUA's unconditional row counts vary, so its first windows recompile
    # for a dynamic shape), allocator, caches
    for _ in range(args.warmup):
        for engine, per_step in engines.values():
            window(engine, per_step, args.window)
    times: dict[tuple, list[float]] = {key: [] for key in engines}
    for _ in range(args.windows):
        for key, (engine, per_step) in engines.items():
            times[key].append(window(engine, per_step, args.window))
    print(f"windows of {args.window} steps, {args.windows} windows per configuration (median)")
    print(f"{'method':<6} {'configuration':<20} {'s/step':>8} {'images/s':>10} "
          f"{'vs per-step sync':>17}")
    for (method, label), ts in times.items():
        med, base = statistics.median(ts), statistics.median(times[(method, "per-step sync")])
        print(f"{method:<6} {label:<20} {med:>8.4f} {args.batch_size / med:>10.1f} "
              f"{base / med:>16.2f}x")


if __name__ == "__main__":
    main()
