"""The GPU device check: training, sampling and feature throughput on one GPU, in one table.

    bash benchmarks/gpu_check.sh                 # on a GPU machine, under 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick   # the same code paths on a CPU

Rows:
- training, ``cifar32`` (the paper's 35.75 M-parameter UNet) at ``--batch`` images a step,
  bf16 autocast and channels_last, DDPM and CCUA (released weights 1 / 1, t_align = T/2),
  ``torch.compile`` off and on: images/s, achieved TFLOP/s and the fraction of the GPU's dense
  bf16 peak. A step's FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over
  ``Engine.train_step`` itself (forward and backward; matrix multiplies and convolutions),
  averaged over a few steps because CCUA's unconditional row count varies. Each configuration
  runs ``--train-steps`` steps after ``--warmup`` untimed ones (which hold the compile), one
  device synchronisation at each end: the steps never wait for the host in between.
- sampling, DDIM-100 with classifier-free guidance (w = 1.5, two network rows per image) from
  the EMA network, in raydiff's fixed forward blocks (``sample_aligned``), eager and compiled.
- Inception features (torch-fidelity's ``inception-v3-compat``, 32 px images resized to 299
  inside the network), the evaluation's extractor. Its speed does not depend on the weights, so
  a random-weights file stands in where the real ones cannot be downloaded.

Goals for an H100/H200-class GPU: training at 40% of the bf16 peak or more, sampling at 150
images/s or more. The peak is looked up from the device name (``PEAK_BF16_TFLOPS``) or given
with ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from raydiff import config as config_lib
from raydiff.diffusion import make_process
from raydiff.engine import Engine
from raydiff.samplers import sample_aligned

# Dense bf16 tensor-core peaks (no sparsity), NVIDIA datasheets; first match of the name wins.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0)]
TRAIN_GOAL, SAMPLE_GOAL = 0.40, 150.0
METHODS = {"ddpm": ["loss.method=ddpm"],
           "ccua": ["loss.method=ccua", "loss.ucl_weight=1", "loss.al_weight=1",
                    "loss.t_align=500"]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def batch_of(cfg: config_lib.Config, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side = cfg.model.resolution
    x0 = torch.rand(batch, cfg.model.in_channels, side, side, generator=g) * 2 - 1
    y = torch.randint(0, cfg.model.num_classes, (batch,), generator=g)
    return x0.to(device), y.to(device)


def step_flops(cfg: config_lib.Config, batch: int, device: torch.device, steps: int = 3) -> float:
    """Mean FLOPs of one training step of an eager fp32 engine: compile and bf16 change the
    speed, not the count (and the counter cannot follow every bf16 op)."""
    cfg = config_lib.apply_overrides(cfg, {"train.compile": False, "train.bf16": False})
    engine = Engine(cfg, device)
    x0, y = batch_of(cfg, batch, device)
    with FlopCounterMode(display=False) as counter:
        for _ in range(steps):
            engine.train_step(x0, y)
    return counter.get_total_flops() / steps


def train_row(method: str, compiled: bool, args, device: torch.device) -> dict:
    overrides = METHODS[method] + [
        f"optim.batch_size={args.batch}", "optim.warmup_steps=0", "train.bf16=true",
        "train.channels_last=true", f"train.compile={compiled}"]
    cfg = config_lib.resolve(args.preset, overrides=overrides)
    flops = step_flops(cfg, args.batch, device)
    engine = Engine(cfg, device)
    x0, y = batch_of(cfg, args.batch, device)
    for _ in range(args.warmup):
        engine.train_step(x0, y)
    engine.collect()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.train_steps):
        engine.train_step(x0, y)
    sync(device)
    seconds = time.perf_counter() - start
    engine.collect()
    return {"images_per_s": args.train_steps * args.batch / seconds,
            "tflops": flops * args.train_steps / seconds / 1e12}


def sample_row(compiled: bool, args, device: torch.device) -> dict:
    cfg = config_lib.resolve(args.preset, overrides=[
        "sample.sampler=ddim", f"sample.steps={args.sample_steps}", "sample.guidance=1.5"])
    model = Engine(cfg, device).ema.model.eval()
    net = torch.compile(model) if compiled else model  # attributes reach the module
    diffusion = make_process(cfg.diffusion)

    def run(n: int, offset: int) -> None:
        index = np.arange(offset, offset + n, dtype=np.int64)
        sample_aligned(net, diffusion, cfg.sample, index, index % cfg.model.num_classes,
                       index, args.sample_batch)

    run(args.sample_batch, 0)  # warm-up (and compile)
    sync(device)
    start = time.perf_counter()
    n = args.sample_batch * args.sample_blocks
    run(n, args.sample_batch)
    sync(device)
    return {"images_per_s": n / (time.perf_counter() - start)}


def inception_row(args, device: torch.device, weights: Path | None) -> dict:
    from raydiff.features import InceptionFeatures, write_random_inception_weights

    with tempfile.TemporaryDirectory() as tmp:
        # the real weights are a download; the speed does not depend on them
        weights = weights or write_random_inception_weights(Path(tmp) / "inception-random.pth")
        extractor = InceptionFeatures(weights, device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.feature_batch, 32, 32, 3), dtype=np.uint8)
    extractor(images)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(args.feature_blocks):
        extractor(images)  # returns host arrays: every block is synchronised
    return {"images_per_s": args.feature_batch * args.feature_blocks
            / (time.perf_counter() - start)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="cifar32")
    parser.add_argument("--batch", type=int, default=128, help="training images a step")
    parser.add_argument("--train-steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--sample-steps", type=int, default=100)
    parser.add_argument("--sample-batch", type=int, default=256)
    parser.add_argument("--sample-blocks", type=int, default=4)
    parser.add_argument("--feature-batch", type=int, default=256)
    parser.add_argument("--feature-blocks", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device")
    parser.add_argument("--inception-weights", type=Path, help="the real weights, if at hand")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: check the script itself (e.g. on a CPU)")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.batch, args.train_steps, args.warmup = "tiny", 8, 2, 1
        args.sample_steps, args.sample_batch, args.sample_blocks = 4, 8, 1
        args.feature_batch, args.feature_blocks = 4, 1
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    compiles = (False,) if args.no_compile else (False, True)

    print(f"device: {name}; bf16 peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown'}; "
          f"torch {torch.__version__}")
    print("| check | configuration | images/s | TFLOP/s | of bf16 peak | goal | met | s |")
    print("|---|---|---:|---:|---:|---|---|---:|", flush=True)

    def row(check, conf, measure, goal="", met=None):
        # printed as measured: a run cut short by the time limit still shows what it measured
        started = time.perf_counter()
        r = measure()
        tflops = r.get("tflops")
        frac = tflops / peak if tflops is not None and peak else None
        if met is not None:
            met = met(r, frac)
        print(f"| {check} | {conf} | {r['images_per_s']:.1f} | "
              f"{'' if tflops is None else f'{tflops:.1f}'} | "
              f"{'' if frac is None else f'{frac:.1%}'} | {goal} | "
              f"{'' if met is None else ('yes' if met else 'NO')} | "
              f"{time.perf_counter() - started:.0f} |", flush=True)

    def train_goal(r, frac):
        return None if frac is None else frac >= TRAIN_GOAL

    def sample_goal(r, frac):
        return r["images_per_s"] >= SAMPLE_GOAL

    # eager rows first: the compiled ones spend most of the time limit compiling
    for compiled in compiles:
        for method in METHODS:
            row(f"train {args.preset} {method}", f"bf16 cl compile={compiled}",
                partial(train_row, method, compiled, args, device), f">= {TRAIN_GOAL:.0%} peak",
                train_goal)
        row(f"sample {args.preset}", f"ddim-{args.sample_steps} cfg compile={compiled}",
            partial(sample_row, compiled, args, device), f">= {SAMPLE_GOAL:.0f} img/s",
            sample_goal)
        if not compiled:
            row("inception features", f"batch {args.feature_batch}",
                partial(inception_row, args, device, args.inception_weights))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
