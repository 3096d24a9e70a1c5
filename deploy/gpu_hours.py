"""GPU-hours of the paper-scale runs, computed from counted FLOPs (an estimate, not a measurement).

    python deploy/gpu_hours.py                  # the table in the README ("On a cluster")
    python deploy/gpu_hours.py --mfu 0.2        # other assumed utilisations

What is counted: torch's FlopCounterMode, on the CPU, over one ``Engine.train_step`` (forward
and backward of the loss, exactly as training runs it), over one sampler network call and,
for the latent-space SiT run, over the SD-VAE's encoder (``raydiff prepare --latents``: every
training image and its mirror, once) and decoder (every generated image).
It counts matrix multiplies and convolutions (2 FLOPs per multiply-add), not elementwise work.
What is assumed: the GPU sustains ``--mfu`` of its dense bf16 peak on those FLOPs; the
elementwise work, the optimiser, EMA, data loading and gradient all-reduce fit in the rest
(DDP over N GPUs divides the wall-clock time by about N and leaves GPU-hours unchanged).
FLOPs are linear in the number of rows through the network, so a small batch is counted and
scaled; the class count changes only the label embedding, so one count serves each resolution.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from raydiff import config as config_lib
from raydiff.engine import Engine
from raydiff.losses import UNCOND_ROW_MULTIPLE

PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0}  # dense (no sparsity), SXM, NVIDIA datasheets
# (dataset, preset, the methods a study compares): steps and global batch are the preset's,
# i.e. the released recipes.
UNET_METHODS, SIT_METHODS = ("ddpm", "cbdm", "ccua"), ("ddpm", "dispersive", "ccua")
RUNS = [("CIFAR-10-LT / CIFAR-100-LT", "cifar32", UNET_METHODS),
        ("TinyImageNet-LT / ImageNet-LT 64 px", "imagenet64", UNET_METHODS),
        ("ImageNet-LT 256 px, SiT-S/2 on SD-VAE latents", "sit-s2-imagenet-lt-256", SIT_METHODS)]
EVAL_SAMPLES = 50_000  # images generated for FID etc.
STUDY_SEEDS = 3  # the default `raydiff study`
IMAGENET_LT_TRAIN = 115_846  # images of the standard ImageNet-LT training list
# The SD-VAE of stabilityai/sd-vae-ft-ema (its config.json): counted with random weights.
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
          "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32,
          "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4}
INCEPTION_SIDE = 299  # FID's feature extractor resizes every image to this


def train_flops_per_row(preset: str, method: str, rows: int) -> float:
    """FLOPs of one training step divided by the rows that went through the network."""
    cfg = config_lib.resolve(preset, overrides=[f"loss.method={method}",
                                                f"optim.batch_size={rows}"])
    engine = Engine(cfg, "cpu")
    seen: list[int] = []
    engine.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    side = cfg.model.resolution
    x0 = torch.rand(rows, cfg.model.in_channels, side, side) * 2 - 1
    y = torch.randint(0, cfg.model.num_classes, (rows,))
    with FlopCounterMode(display=False) as counter:
        engine.train_step(x0, y)
    return counter.get_total_flops() / sum(seen)


def rows_per_image(cfg: config_lib.Config, worker_batch: int) -> float:
    """Expected network rows per training image: CCUA adds an unconditional row for every
    image with w(t) > 0, i.e. t >= max(1, t_align), whose label was not dropped already, and
    pads their count on each worker up to a multiple of ``UNCOND_ROW_MULTIPLE`` (at most the
    worker's batch)."""
    if cfg.loss.method in ("ddpm", "dispersive", "diffrop"):  # the regulariser: no extra pass
        return 1.0
    if cfg.loss.method == "cbdm":
        return 2.0
    b, m = worker_batch, UNCOND_ROW_MULTIPLE
    if cfg.diffusion.process == "flow":  # w(t) = t^p or (1 - t)^p: > 0 for almost every t
        q = 1.0 - cfg.loss.label_dropout
    else:
        T = cfg.diffusion.num_timesteps
        q = (T - max(1, cfg.loss.t_align)) / T * (1.0 - cfg.loss.label_dropout)
    expected = sum(math.comb(b, n) * q ** n * (1 - q) ** (b - n) * min(b, -(-n // m) * m)
                   for n in range(b + 1))  # padded rows, n ~ Binomial(b, q)
    return 1.0 + expected / b


def sample_flops_per_image(preset: str) -> float:
    """FLOPs to generate one image with the configured sampler and guidance."""
    cfg = config_lib.resolve(preset)
    model = Engine(cfg, "cpu").ema.model
    side, rows = cfg.model.resolution, 4
    x = torch.randn(rows, cfg.model.in_channels, side, side)
    flow = cfg.diffusion.process == "flow"
    t = torch.full((rows,), 0.5) if flow else torch.full((rows,), cfg.diffusion.num_timesteps - 1)
    y = torch.zeros(rows, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    calls = 2 if cfg.sample.guidance else 1  # conditional and unconditional prediction
    per_step = 2 if cfg.sample.sampler == "heun" else 1  # Heun evaluates twice a step
    return counter.get_total_flops() / rows * calls * per_step * cfg.sample.steps


def vae_flops_per_image(image_side: int) -> tuple[float, float]:
    """FLOPs of the SD-VAE's encoder (image -> posterior moments) and decoder, per image."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**SD_VAE).eval()
    x = torch.zeros(1, 3, image_side, image_side)
    with torch.no_grad(), FlopCounterMode(display=False) as encode:
        z = vae.encode(x).latent_dist.mean
    with torch.no_grad(), FlopCounterMode(display=False) as decode:
        vae.decode(z)
    return encode.get_total_flops(), decode.get_total_flops()


def inception_flops_per_image() -> float:
    """FLOPs of the Inception-v3 features FID uses, per image (torchvision's network)."""
    import torchvision

    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(2, 3, INCEPTION_SIDE, INCEPTION_SIDE))
    return counter.get_total_flops() / 2


def gpu_hours(flops: float, mfus: list[float]) -> list[str]:
    seconds = [flops / (peak * 1e12 * mfu) for peak in PEAK_BF16_TFLOPS.values() for mfu in mfus]
    return [f"{s / 3600:.1f}" if s >= 360 else f"{s:.0f} s" for s in seconds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.1],
                        help="assumed fractions of the bf16 peak sustained (default 0.3 0.1)")
    parser.add_argument("--rows", type=int, default=16, help="batch counted on the CPU")
    parser.add_argument("--workers", type=int, default=8,
                        help="data-parallel workers (CCUA pads its rows per worker; default 8)")
    args = parser.parse_args()
    torch.manual_seed(0)
    columns = [f"{gpu} GPU-h at {mfu:.0%}" for gpu in PEAK_BF16_TFLOPS for mfu in args.mfu]
    print("| run | method | steps x batch | TFLOP per step | " + " | ".join(columns) + " |")
    print("|---" * (4 + len(columns)) + "|")
    for label, preset, methods in RUNS:
        base = config_lib.preset(preset)
        steps, batch = base.optim.total_steps, base.optim.batch_size
        study, decode = 0.0, 0.0
        if base.latent.vae:
            image_side = base.model.resolution * 8  # the SD-VAE downsamples 8x
            encode, decode = vae_flops_per_image(image_side)
            print(f"| {label} | `prepare --latents`: SD-VAE encoder, {IMAGENET_LT_TRAIN:,} "
                  f"images and their mirrors at {image_side} px | | | "
                  + " | ".join(gpu_hours(encode * 2 * IMAGENET_LT_TRAIN, args.mfu)) + " |")
        for method in methods:
            cfg = config_lib.resolve(preset, overrides=[f"loss.method={method}"])
            rows = rows_per_image(cfg, batch // args.workers)
            step = train_flops_per_row(preset, method, args.rows) * batch * rows
            study += step * steps * STUDY_SEEDS
            print(f"| {label} | {method} | {steps // 1000}k x {batch} | {step / 1e12:.2f} | "
                  + " | ".join(gpu_hours(step * steps, args.mfu)) + " |")
        sample = (sample_flops_per_image(preset) + decode) * EVAL_SAMPLES
        study += sample * len(methods) * STUDY_SEEDS
        decoded = ", SD-VAE decoding" if base.latent.vae else ""
        print(f"| {label} | sampling {EVAL_SAMPLES // 1000}k images, {base.sample.sampler}-"
              f"{base.sample.steps} with guidance{decoded} | | | "
              + " | ".join(gpu_hours(sample, args.mfu)) + " |")
        print(f"| {label} | `raydiff study`: {', '.join(methods)} x {STUDY_SEEDS} seeds, "
              f"each sampling {EVAL_SAMPLES // 1000}k images | | | "
              + " | ".join(gpu_hours(study, args.mfu)) + " |")
    features = inception_flops_per_image() * 2 * EVAL_SAMPLES
    print(f"| any | Inception features of {EVAL_SAMPLES // 1000}k samples + "
          f"{EVAL_SAMPLES // 1000}k reference images | | | "
          + " | ".join(gpu_hours(features, args.mfu)) + " |")


if __name__ == "__main__":
    main()
