"""Run configuration: frozen dataclasses, named presets, typed dotted overrides.

A config is data: it is built from a preset, changed with ``section.key=value`` overrides
(``--set`` on the command line) and round-trips through JSON. Nothing in it is executed.
Every run folder and checkpoint stores the resolved config, so a run can be reproduced and
a checkpoint refuses to load into a network of another shape.

Presets, and where their values come from (the authors' released CCUA-DDPM code):

- ``cifar32``: the released CIFAR-10/100-LT recipe, i.e. the flag defaults of the released
  ``main.py`` (batch 64, 300k steps, no BRS). The dataclass defaults below are those flags.
- ``imagenet64``: the released TinyImageNet-LT script ``ccua-brs_200k.sh`` (64 px, batch 128,
  100k steps, BRS 0.1, attention at 32x32).
- ``tiny``: no paper recipe; a small network that trains on 2 CPU cores (tests).
- ``tiny-vpred``: no paper recipe; ``tiny`` with v-prediction, min-SNR weighting, batch 64,
  attention only in the middle block and guidance 5, the recipe with which ``raydiff demo`` draws its shapes.
- ``sit-s2-imagenet-lt-256``: the released CCUA-SiT script ``ccua_N-4_brs0_1_160epoch.sh``
  (SiT-S/2 on 32x32x4 SD-VAE latents of 256 px images, flow matching, CCUA 0.05 / 0.05).
- ``sit-tiny``: no paper recipe; a 2-block SiT on 16 px images that trains on 2 CPU cores.

Known differences from the released code are listed in ``docs/METHOD.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydiff.errors import RaydiffError

METHODS = ("ddpm", "cbdm", "ccua", "dispersive", "diffrop")
BACKBONES = ("unet", "sit")
PROCESSES = ("ddpm", "flow")
# samplers of each noise process (raydiff/samplers.py)
SAMPLERS = {"ddpm": ("ddim", "ddpm"), "flow": ("euler", "heun", "sde")}
FLOW_WEIGHT_ENDS = ("data", "noise")
DDIM_LAST_STEPS = ("x0", "identity")
PREDICTIONS = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


@dataclass(frozen=True)
class ModelConfig:
    """The network: the DDPM UNet of Ho et al. (pytorch-ddpm / CBDM / CCUA) or SiT (Ma et al.
    2024, the released CCUA-SiT ``models.py``), class-conditional.

    UNet defaults are the released ``main.py`` flags (``--ch 128 --ch_mult 1 2 2 2 --attn 1
    --num_res_blocks 2 --dropout 0.1``); ``--attn 1`` names level 1, the 16x16 maps at 32 px.
    SiT defaults are SiT-S/2 (B/2: 12, 768, 12; L/2: 24, 1024, 16; XL/2: 28, 1152, 16).
    Each backbone reads its own fields and ignores the other's.
    """

    backbone: str = "unet"  # unet | sit
    resolution: int = 32  # input side: pixels (main.py --img_size), or latent side for SiT
    in_channels: int = 3  # 3 for images, 4 for SD-VAE latents
    num_classes: int = 10  # real classes; index num_classes is the learned null label
    ch: int = 128  # base channels; the time embedding is 4 * ch wide
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)  # channel multiplier per resolution level
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sides that get self-attention
    num_res_blocks: int = 2  # residual blocks per level on the way down
    dropout: float = 0.1
    # SiT (backbone = sit)
    depth: int = 12  # transformer blocks
    hidden_size: int = 384  # token width
    num_heads: int = 6
    patch_size: int = 2  # tokens are patch_size x patch_size patches of the input
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise process. ``ddpm``: linear betas over T steps (main.py --T --beta_1 --beta_T),
    what the network predicts and how the denoising loss weighs timesteps; the released recipe
    is eps-prediction with uniform weighting, the others are options (docs/METHOD.md).
    ``flow``: SiT's linear interpolant x_t = t x1 + (1 - t) x0 (t = 1 data, t = 0 noise) with
    velocity prediction (raydiff/flow.py); the DDPM-only keys below do not apply to it."""

    process: str = "ddpm"  # ddpm | flow
    num_timesteps: int = 1000  # T
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"  # eps | x0 | v (v = sqrt(ab) eps - sqrt(1 - ab) x0)
    loss_weighting: str = "uniform"  # uniform | min_snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # the SNR cap of min_snr


@dataclass(frozen=True)
class LossConfig:
    """Which objective to train and its weights (docs/METHOD.md, "Losses").

    Weights 1.0 / 1.0 are the released TinyImageNet-LT script's ``--ccua_ucl 1.0 --ccua_al 1.0``
    (the only released CCUA command for the UNet); label dropout 0.1 and tau 0.1 are fixed in
    the released code, CBDM's tau_cb 1.0 is main.py's ``--cb_tau``.
    """

    method: str = "ccua"  # ddpm | cbdm | ccua
    label_dropout: float = 0.1  # per-sample probability of the null label (CFG training)
    ucl_weight: float = 1.0  # alpha: unsupervised contrastive loss
    al_weight: float = 1.0  # gamma: conditional-unconditional alignment loss
    temperature: float = 0.1  # UCL temperature tau
    weight_power: float = 1.0  # p in w(t) = (t/T)^p * [t >= t_align]
    t_align: int = 0  # 0 reproduces the released code
    # UCL negatives come from consecutive groups of this many rows of the global batch, on any
    # number of workers; 32 is the released script's per-GPU chunk (batch 128 on 4 GPUs).
    ucl_group_size: int = 32
    global_negatives: bool = False  # one UCL group: the whole global batch (overrides the above)
    cbdm_tau: float = 1.0  # CBDM regulariser weight tau_cb
    # Under the flow process the UCL/AL (and diffrop) weight is t^p or (1 - t)^p: "data" is
    # t^p, largest near the data end (t = 1), what the released CCUA-SiT transport.py
    # computes; "noise" is (1 - t)^p, largest at the noise end, the end the UNet's t/T favours.
    flow_weight_end: str = "data"  # data | noise
    # Dispersive Loss (Wang & He 2025), InfoNCE-L2 as released: 0.25 log mean_ij
    # exp(-|z_i - z_j|^2 / (D tau)) over all B^2 pairs of the batch (transport.py disp_loss).
    dispersive_weight: float = 0.25
    dispersive_temperature: float = 1.0  # tau; the released code divides by D only
    # diffrop: weight / (1 + d), d = mean_i w(t_i) [y_i != y_pi(i)] |out_i - out_pi(i)|^2 over
    # a random pairing pi (transport.py); 0.1 is the released train.py's --diffrop default.
    diffrop_weight: float = 0.1


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule of the released code: Adam, warm-up, clip, EMA.

    Defaults are main.py's flags, the released CIFAR-LT recipe (``--lr 2e-4 --warmup 5000
    --grad_clip 1 --ema_decay 0.9999 --batch_size 64 --total_steps 300001``).
    """

    optimizer: str = "adam"  # adam | adamw
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5000  # linear warm-up, then constant
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.9999
    batch_size: int = 64  # global batch, split across workers
    total_steps: int = 300_000


@dataclass(frozen=True)
class SampleConfig:
    """Sampler used for previews and evaluation (released: DDIM-100, w = 1.5; main.py's
    ``--ddim_skip_step 10 --omega 1.5``)."""

    sampler: str = "ddim"  # ddim | ddpm (process ddpm); euler | heun | sde (process flow)
    steps: int = 100  # sampling steps (flow: integration steps of the ODE or SDE)
    eta: float = 0.0
    guidance: float = 1.5  # CFG weight w in eps_c + w (eps_c - eps_u) (flow: v_c + w (v_c - v_u))
    clip_x0: bool = False  # clamp each step's x0 prediction to [-1, 1] (clip_denoised)
    # DDIM's step from t = 0: "x0" returns the clean x0 prediction; "identity" keeps x_0 with
    # its sqrt(1 - alpha_bar_0) eps = 0.01 eps of noise, as the released sampler does.
    ddim_last_step: str = "x0"
    # The flow SDE sampler integrates to t = 1 - sde_last_step and takes its last step without
    # noise (SiT's sample_ddp.py defaults: --last-step Mean --last-step-size 0.04).
    sde_last_step: float = 0.04
    # torch.compile the network in each `raydiff sample` actor (inductor; it compiles on the
    # first call, tens of seconds, then every call reuses it: the batch shape never changes).
    # Compiled kernels round differently from eager ones, so it is part of a sample run's
    # identity; previews during training and `raydiff tune` always run eagerly.
    compile: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run that is not the model, the objective or the optimiser."""

    seed: int = 0
    hflip: bool = True  # random horizontal flip
    resample_factor: float = 0.0  # BRS f in (0, 1]; 0 = off (sample as the data comes)
    # training splits of up to this many images are held in memory (Ray's object store, read
    # zero-copy by every worker); larger ones stream through Ray Data
    in_memory_max_images: int = 50_000
    log_every: int = 100  # steps between metric reports
    ckpt_every: int = 5000  # steps between checkpoints
    num_to_keep: int = 3  # checkpoints kept on storage
    preview_per_class: int = 8  # EMA samples per class in the grid saved with a checkpoint
    bf16: bool = False  # bf16 autocast (GPU)
    channels_last: bool = False  # channels_last memory format (GPU; also faster on CPU)
    compile: bool = False  # torch.compile the network (the DDP-wrapped one); for GPUs


@dataclass(frozen=True)
class LatentConfig:
    """The latent space a run trains in (docs/METHOD.md, "Latent datasets"); ``vae = ""`` is
    pixel space. A run on a latent dataset takes these from its dataset.json (``raydiff
    prepare --latents``); a value set here that differs from the dataset's is an error.
    Sampling decodes with this VAE, so sample folders hold images either way."""

    vae: str = ""  # a known name (sd-vae-ft-ema) or a VAE folder; "" = pixel space
    sha256: str = ""  # of the VAE's weights file; "" = whatever the dataset was encoded with
    scale: float = 0.18215  # latents = VAE posterior x scale (the released code's 0.18215)
    image_resolution: int = 0  # side of the decoded images; 0 in pixel space


@dataclass(frozen=True)
class Config:
    preset: str = "cifar32"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# --- presets -------------------------------------------------------------------------------

def _tiny() -> Config:
    # Not a paper recipe: trains on 16-32 px in minutes on 2 CPU cores, for the demo and tests.
    return Config(
        preset="tiny",
        model=ModelConfig(resolution=16, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(8,),
                          num_res_blocks=1, dropout=0.0),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, batch_size=32, total_steps=300,
                          ema_decay=0.99),
        # A few hundred steps leave x0 predictions that overshoot the data range at large t;
        # clamping them turns noisy previews into recognisable shapes.
        sample=SampleConfig(steps=20, clip_x0=True),
        train=TrainConfig(log_every=10, ckpt_every=100),
    )


def _tiny_vpred() -> Config:
    # Not a paper recipe: the tiny network with v-prediction and min-SNR-5 weighting, which
    # learns the 16 px shapes within a laptop's minutes where eps-prediction does not (its
    # samples stay saturated noise for thousands of steps). Used by `raydiff demo`. Self-attention
    # only in the 4x4 middle block and channels_last: a CCUA step of 64 on 2 CPU cores went from
    # 214 to 264 images/s, and the samples were recognised as well or better. In-process (CCUA,
    # 40 images a class, DDIM-20): the demo's reference classifier recognised 56%, 64% and 68% of
    # the samples with w = 5 (tail third 40%, 53%, 55%) after 1000, 1250 and 1500 steps; w = 3
    # gave 53%, 59%, 62% (tail 38%, 48%, 47%). docs/METHOD.md explains the choices.
    base = _tiny()
    return dataclasses.replace(
        base, preset="tiny-vpred",
        model=dataclasses.replace(base.model, attn_resolutions=()),
        diffusion=DiffusionConfig(prediction="v", loss_weighting="min_snr"),
        optim=OptimConfig(lr=2e-3, warmup_steps=50, batch_size=64, total_steps=1500,
                          ema_decay=0.995),
        sample=SampleConfig(steps=20, guidance=5.0),
        train=TrainConfig(log_every=50, ckpt_every=500, channels_last=True),
    )


def _cifar32() -> Config:
    # The released CIFAR-10/100-LT recipe: every value is a main.py default (batch 64, 300k
    # steps, no BRS), with the CCUA weights of the one released CCUA script. The paper's 32x32
    # network: 35.75 M parameters with 10 classes.
    return Config(preset="cifar32")


def _imagenet64() -> Config:
    # The released TinyImageNet-LT script (ccua-brs_200k.sh): 64 px, 200 classes, batch 128,
    # 100k steps, BRS 0.1, UCL in the 32-row chunks of 4-GPU DataParallel. Its --attn 1 is
    # level 1 of (1, 2, 2, 2), the 32x32 maps at 64 px. Also used for downsampled
    # ImageNet-LT / Places-LT.
    return Config(
        preset="imagenet64",
        model=ModelConfig(resolution=64, num_classes=200, ch_mult=(1, 2, 2, 2),
                          attn_resolutions=(32,)),
        optim=OptimConfig(batch_size=128, total_steps=100_000),
        loss=LossConfig(ucl_group_size=32),
        train=TrainConfig(resample_factor=0.1),
    )


# ImageNet-LT as the released CCUA-SiT code builds it (lt_dataset.py ImbalanceImageNet,
# --imb-factor 0.01): the exponential profile cut from ImageNet's 1,281,167 training images,
# 1281 ... 12 a class, 275,288 images; the standard list split has 115,846.
RELEASED_IMAGENET_LT_IMAGES = 275_288


def _sit_s2_imagenet_lt_256() -> Config:
    # The released CCUA-SiT run (ccua_N-4_brs0_1_160epoch.sh, train.py, models.py):
    # SiT-S/2 on the 32x32x4 SD-VAE latents of 256 px images, 1000 classes, linear-interpolant
    # flow matching with velocity prediction, AdamW lr 1e-4 without weight decay, no warm-up,
    # no gradient clipping, EMA 0.9999, label dropout 0.1 per row, BRS 0.1, CCUA 0.05 / 0.05
    # with the t weight of the released transport.py (the data end).
    # Batch: --global-batch-size 48 on 4 GPUs, so UCL saw the 12 rows of one GPU (group 12).
    # Steps: 160 epochs. The released data (275,288 images) make 5,735 steps an epoch per GPU
    # (DistributedSampler: ceil(275288 / 4) = 68,822 rows, 12 a step, drop_last), 917,600 in
    # all, the step in the released checkpoint's name. On the standard ImageNet-LT list
    # (115,846 images) 160 epochs at batch 48 are 386,154 steps (72,404 at SiT's batch 256):
    # set optim.total_steps for that data.
    # Sampling: the released sample_eval_pipe.sh integrates the ODE with dopri5 (adaptive,
    # torchdiffeq, 50 output times, atol 1e-6, rtol 1e-3) at --cfg-scale 7.5, i.e. v_u + 7.5
    # (v_c - v_u) = v_c + 6.5 (v_c - v_u). raydiff has no adaptive solver (its step sizes
    # would depend on the other images of a batch): Heun with 50 steps, w = 6.5.
    steps_per_epoch = -(-RELEASED_IMAGENET_LT_IMAGES // 4) // 12
    return Config(
        preset="sit-s2-imagenet-lt-256",
        model=ModelConfig(backbone="sit", resolution=32, in_channels=4, num_classes=1000,
                          depth=12, hidden_size=384, num_heads=6, patch_size=2),
        diffusion=DiffusionConfig(process="flow"),
        loss=LossConfig(method="ccua", ucl_weight=0.05, al_weight=0.05, ucl_group_size=12,
                        flow_weight_end="data"),
        optim=OptimConfig(optimizer="adamw", lr=1e-4, weight_decay=0.0, warmup_steps=0,
                          grad_clip=0.0, ema_decay=0.9999, batch_size=48,
                          total_steps=160 * steps_per_epoch),
        sample=SampleConfig(sampler="heun", steps=50, guidance=6.5),
        train=TrainConfig(resample_factor=0.1, ckpt_every=50_000),
        # the SD-VAE's latents (raydiff prepare --latents sd-vae-ft-ema); the dataset fills in
        # the weights' sha256 and the image side
        latent=LatentConfig(vae="sd-vae-ft-ema"),
    )


# SiT's larger networks (Ma et al. 2024, Table 1; patch 2): (depth, hidden size, heads).
SIT_SIZES = {"b2": (12, 768, 12), "l2": (24, 1024, 16), "xl2": (28, 1152, 16)}


def _sit_imagenet_lt_256(size: str) -> typing.Callable[[], Config]:
    # Not a released run: the released S/2 recipe above with one of SiT's larger networks;
    # everything else (data, objective, CCUA weights, optimiser, steps, sampler) unchanged.
    def build() -> Config:
        base = _sit_s2_imagenet_lt_256()
        depth, hidden, heads = SIT_SIZES[size]
        return dataclasses.replace(
            base, preset=f"sit-{size}-imagenet-lt-256",
            model=dataclasses.replace(base.model, depth=depth, hidden_size=hidden,
                                      num_heads=heads))
    return build


def _sit_tiny() -> Config:
    # Not a paper recipe: a 2-block SiT of width 64 (patch 2, 64 tokens at 16 px) with flow
    # matching and CCUA, small enough to train on 2 CPU cores (tests, benchmarks).
    return Config(
        preset="sit-tiny",
        model=ModelConfig(backbone="sit", resolution=16, depth=2, hidden_size=64, num_heads=2,
                          patch_size=2),
        diffusion=DiffusionConfig(process="flow"),
        optim=OptimConfig(optimizer="adamw", lr=1e-3, warmup_steps=20, batch_size=32,
                          total_steps=300, ema_decay=0.99),
        sample=SampleConfig(sampler="heun", steps=10, guidance=1.5),
        train=TrainConfig(log_every=10, ckpt_every=100),
    )


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "tiny": _tiny,
    "tiny-vpred": _tiny_vpred,
    "cifar32": _cifar32,
    "imagenet64": _imagenet64,
    "sit-s2-imagenet-lt-256": _sit_s2_imagenet_lt_256,
    **{f"sit-{size}-imagenet-lt-256": _sit_imagenet_lt_256(size) for size in SIT_SIZES},
    "sit-tiny": _sit_tiny,
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise RaydiffError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# --- validation ----------------------------------------------------------------------------

def validate(cfg: Config) -> None:
    """Reject values that no run could use, with the key and the value in the message."""
    m, d, lo, o, s, t = cfg.model, cfg.diffusion, cfg.loss, cfg.optim, cfg.sample, cfg.train
    flow = d.process == "flow"
    samplers = SAMPLERS.get(d.process, ())
    checks = [
        (m.backbone in BACKBONES, "model.backbone", m.backbone, " or ".join(BACKBONES)),
        (d.process in PROCESSES, "diffusion.process", d.process, " or ".join(PROCESSES)),
        (lo.method in METHODS, "loss.method", lo.method, f"one of {', '.join(METHODS)}"),
        (s.sampler in samplers, "sample.sampler", s.sampler,
         f"{' or '.join(samplers)} (the samplers of diffusion.process={d.process})"),
        (s.ddim_last_step in DDIM_LAST_STEPS, "sample.ddim_last_step", s.ddim_last_step,
         " or ".join(DDIM_LAST_STEPS)),
        (o.optimizer in ("adam", "adamw"), "optim.optimizer", o.optimizer, "adam or adamw"),
        (m.resolution >= 8, "model.resolution", m.resolution, ">= 8"),
        (m.backbone != "unet" or m.resolution % 2 ** (len(m.ch_mult) - 1) == 0,
         "model.resolution", m.resolution,
         f"divisible by 2^{len(m.ch_mult) - 1} (one halving per level of ch_mult)"),
        (m.patch_size >= 1, "model.patch_size", m.patch_size, ">= 1"),
        (m.backbone != "sit" or m.resolution % m.patch_size == 0, "model.resolution",
         m.resolution, f"divisible by model.patch_size={m.patch_size}"),
        (m.depth >= 1, "model.depth", m.depth, ">= 1"),
        (m.num_heads >= 1, "model.num_heads", m.num_heads, ">= 1"),
        (m.hidden_size >= 4 and m.hidden_size % 4 == 0 and m.hidden_size % m.num_heads == 0,
         "model.hidden_size", m.hidden_size,
         f"a multiple of 4 (2-D sin-cos positions) and of model.num_heads={m.num_heads}"),
        (m.mlp_ratio > 0, "model.mlp_ratio", m.mlp_ratio, "> 0"),
        (m.num_classes >= 1, "model.num_classes", m.num_classes, ">= 1"),
        (m.ch % 32 == 0, "model.ch", m.ch, "a multiple of 32 (GroupNorm with 32 groups)"),
        (len(m.ch_mult) >= 1, "model.ch_mult", m.ch_mult, "non-empty"),
        (0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "in [0, 1)"),
        (d.num_timesteps >= 2, "diffusion.num_timesteps", d.num_timesteps, ">= 2"),
        (d.prediction in PREDICTIONS, "diffusion.prediction", d.prediction,
         " or ".join(PREDICTIONS)),
        (d.loss_weighting in LOSS_WEIGHTINGS, "diffusion.loss_weighting", d.loss_weighting,
         " or ".join(LOSS_WEIGHTINGS)),
        (not flow or d.prediction == "eps", "diffusion.prediction", d.prediction,
         "eps, i.e. unset: under diffusion.process=flow the network predicts velocity"),
        (not flow or d.loss_weighting == "uniform", "diffusion.loss_weighting",
         d.loss_weighting, "uniform under diffusion.process=flow (SiT's velocity loss)"),
        (math.isfinite(d.min_snr_gamma) and d.min_snr_gamma > 0, "diffusion.min_snr_gamma",
         d.min_snr_gamma, "a finite number > 0"),
        (0 < d.beta_start < d.beta_end < 1, "diffusion.beta_end", d.beta_end,
         "above beta_start and below 1"),
        (0.0 <= lo.label_dropout < 1.0, "loss.label_dropout", lo.label_dropout, "in [0, 1)"),
        (lo.ucl_weight >= 0, "loss.ucl_weight", lo.ucl_weight, ">= 0"),
        (lo.al_weight >= 0, "loss.al_weight", lo.al_weight, ">= 0"),
        (lo.temperature > 0, "loss.temperature", lo.temperature, "> 0"),
        (lo.weight_power > 0, "loss.weight_power", lo.weight_power, "> 0"),
        (lo.cbdm_tau >= 0, "loss.cbdm_tau", lo.cbdm_tau, ">= 0"),
        (lo.ucl_group_size >= 2, "loss.ucl_group_size", lo.ucl_group_size,
         ">= 2 (a row's UCL negatives are the other rows of its group)"),
        (0 <= lo.t_align < d.num_timesteps, "loss.t_align", lo.t_align,
         "in [0, diffusion.num_timesteps)"),
        (not flow or lo.t_align == 0, "loss.t_align", lo.t_align,
         "0 under diffusion.process=flow (a threshold on DDPM's integer timesteps)"),
        (lo.flow_weight_end in FLOW_WEIGHT_ENDS, "loss.flow_weight_end", lo.flow_weight_end,
         " or ".join(FLOW_WEIGHT_ENDS)),
        (lo.dispersive_weight >= 0, "loss.dispersive_weight", lo.dispersive_weight, ">= 0"),
        (lo.dispersive_temperature > 0, "loss.dispersive_temperature",
         lo.dispersive_temperature, "> 0"),
        (lo.diffrop_weight >= 0, "loss.diffrop_weight", lo.diffrop_weight, ">= 0"),
        (o.lr > 0, "optim.lr", o.lr, "> 0"),
        (o.batch_size >= 2, "optim.batch_size", o.batch_size, ">= 2 (UCL needs negatives)"),
        (o.total_steps >= 1, "optim.total_steps", o.total_steps, ">= 1"),
        (0.0 <= o.ema_decay < 1.0, "optim.ema_decay", o.ema_decay, "in [0, 1)"),
        (o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0"),
        (o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, ">= 0 (0 = no clipping)"),
        (o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0"),
        (flow or 1 <= s.steps <= d.num_timesteps, "sample.steps", s.steps,
         "in [1, diffusion.num_timesteps]"),
        (not flow or s.steps >= (2 if s.sampler == "sde" and s.sde_last_step > 0 else 1),
         "sample.steps", s.steps, ">= 1 (sde with a last step: >= 2)"),
        (0.0 <= s.sde_last_step < 0.5, "sample.sde_last_step", s.sde_last_step, "in [0, 0.5)"),
        (s.guidance >= 0, "sample.guidance", s.guidance, ">= 0 (0 = no guidance)"),
        (0.0 <= s.eta <= 1.0, "sample.eta", s.eta, "in [0, 1] (0 = deterministic DDIM)"),
        (m.in_channels >= 1, "model.in_channels", m.in_channels, ">= 1"),
        (m.num_res_blocks >= 1, "model.num_res_blocks", m.num_res_blocks, ">= 1"),
        (all(c >= 1 for c in m.ch_mult), "model.ch_mult", m.ch_mult, "multipliers >= 1"),
        (t.seed >= 0, "train.seed", t.seed, ">= 0"),
        (0.0 <= t.resample_factor <= 1.0, "train.resample_factor", t.resample_factor,
         "in [0, 1] (0 = off)"),
        (t.in_memory_max_images >= 0, "train.in_memory_max_images", t.in_memory_max_images,
         ">= 0 (0 = always stream through Ray Data)"),
        (t.log_every >= 1, "train.log_every", t.log_every, ">= 1"),
        (t.ckpt_every >= 1, "train.ckpt_every", t.ckpt_every, ">= 1"),
        (t.num_to_keep >= 1, "train.num_to_keep", t.num_to_keep, ">= 1"),
        (t.preview_per_class >= 0, "train.preview_per_class", t.preview_per_class, ">= 0"),
    ]
    for name in _section_types():
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise RaydiffError(f"config {name}.{f.name}={value!r} is invalid: expected a "
                                   "finite number")
    checks += _latent_checks(cfg)
    for ok, key, value, expected in checks:
        if not ok:
            raise RaydiffError(f"config {key}={value!r} is invalid: expected {expected}")


def _latent_checks(cfg: Config) -> list[tuple[bool, str, Any, str]]:
    la = cfg.latent
    if not la.vae:
        return [(not la.sha256, "latent.sha256", la.sha256, "empty in pixel space (latent.vae "
                 "is empty)"),
                (la.image_resolution == 0, "latent.image_resolution", la.image_resolution,
                 "0 in pixel space (latent.vae is empty)")]
    return [
        (la.scale > 0, "latent.scale", la.scale, "> 0"),
        (la.image_resolution >= 0, "latent.image_resolution", la.image_resolution, ">= 0"),
        # latents are not confined to [-1, 1]: clamping their x0 predictions would cut them
        (not cfg.sample.clip_x0, "sample.clip_x0", cfg.sample.clip_x0,
         "false with latent.vae set (latents are not in [-1, 1])"),
    ]


# --- overrides and JSON --------------------------------------------------------------------

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str, strict: bool = False) -> Any:
    """Convert ``value`` to type ``tp`` or fail. An override string (``strict=False``) is
    parsed; a JSON value (``strict=True``) must already be of the JSON type of the field: a
    number for a number, ``true``/``false`` for a switch, a list for a tuple."""
    if strict and isinstance(value, str) and tp is not str:
        raise RaydiffError(f"config {key}={value!r} is invalid: expected "
                           f"{_JSON_TYPE_NAMES.get(tp, 'a list')}, not a string")
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip().strip("()[]")
            value = [v for v in (p.strip() for p in text.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise RaydiffError(f"config {key}={value!r} is invalid: expected a list")
        return tuple(_coerce(v, item_tp, key, strict) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise RaydiffError(f"config {key}={value!r} is invalid: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise RaydiffError(f"config {key}={value!r} is invalid: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise RaydiffError(f"config {key}={value!r} is invalid: expected an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise RaydiffError(f"config {key}={value!r} is invalid: expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RaydiffError(f"config {key}={value!r} is invalid: expected a number") from None
        if not math.isfinite(number):
            raise RaydiffError(f"config {key}={value!r} is invalid: expected a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise RaydiffError(f"config {key}={value!r} is invalid: expected a string")
        return value
    raise TypeError(f"unsupported config field type {tp} for {key}")  # a bug, not bad input


_JSON_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false"}


def _section_types() -> dict[str, type]:
    return {name: tp for name, tp in _field_types(Config).items() if dataclasses.is_dataclass(tp)}


def apply_overrides(cfg: Config, overrides: dict[str, Any], strict: bool = False) -> Config:
    """Return ``cfg`` with ``{"section.key": value}`` applied; unknown keys are errors.
    ``strict``: the values come from JSON and must have their field's JSON type."""
    sections = _section_types()
    changes: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise RaydiffError(
                f"unknown config key {key!r}: expected section.key with section one of "
                f"{', '.join(sections)}")
        types_ = _field_types(sections[section])
        if name not in types_:
            raise RaydiffError(
                f"unknown config key {key!r}: {section} has {', '.join(types_)}")
        changes.setdefault(section, {})[name] = _coerce(value, types_[name], key, strict)
    replaced = {s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in changes.items()}
    return dataclasses.replace(cfg, **replaced)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Parse ``["model.ch=64", ...]`` (``--set`` arguments) into a dict."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RaydiffError(f"override {item!r} is not of the form section.key=value")
        out[key.strip()] = value.strip()
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (JSON), rejecting unknown keys."""
    if not isinstance(data, dict):
        raise RaydiffError("config must be a JSON object")
    data = dict(data)
    base = preset(data.pop("preset", "cifar32"))
    flat: dict[str, Any] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise RaydiffError(f"unknown config key {section!r}")
        flat.update({f"{section}.{k}": v for k, v in values.items()})
    return apply_overrides(base, flat, strict=True)


def load_json(path: str | Path) -> Config:
    path = Path(path)
    try:
        data = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except FileNotFoundError:
        raise RaydiffError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise RaydiffError(f"config file {path} is a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise RaydiffError(f"config file {path} is not text (not UTF-8): not a JSON file") from None
    except OSError as err:
        raise RaydiffError(f"config file {path} cannot be read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise RaydiffError(f"config file {path} line {err.lineno}: {err.msg}") from None
    except ValueError as err:  # NaN / Infinity (_refuse_constant)
        raise RaydiffError(f"config file {path}: {err}") from None
    try:
        return from_dict(data)
    except RaydiffError as err:
        raise RaydiffError(f"config file {path}: {err}") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a finite number")


def resolve(preset_name: str | None = "cifar32", config_file: str | None = None,
            overrides: list[str] | None = None) -> Config:
    """Preset or config file, then ``--set`` overrides: the order the CLI applies them."""
    cfg = load_json(config_file) if config_file else preset(preset_name)
    return apply_overrides(cfg, parse_overrides(overrides or []))


# --- the downstream classifier (``raydiff classify``; the network is raydiff.classifier's) ------

CLASSIFIER_ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "wide_resnet50_2")
REFERENCE_BATCH = 128  # lr = 0.1 at this batch size (linear scaling)


@dataclass(frozen=True)
class ClassifierConfig:
    """A classifier run. ``fit_to_data`` fills in the fields that come from the dataset."""

    arch: str = "resnet18"
    width: int = 64  # stem channels; stages are width, 2, 4, 8 x width (torchvision: 64)
    num_classes: int = 10  # from the dataset
    resolution: int = 32  # from the dataset
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # per channel, in [0, 1]: of the real train split
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    epochs: int = 200
    batch_size: int = 128  # global, split across workers
    lr: float = 0.0  # 0: 0.1 * batch_size / 128
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_epochs: float = 5.0  # linear warm-up, then cosine decay towards 0
    crop_padding: int = -1  # random-crop zero padding in px; -1: resolution // 8 (4 at 32 px)
    hflip: bool = True
    seed: int = 0  # initial weights, epoch order, augmentation
    ckpt_every: int = 1  # epochs between checkpoints (the last epoch always gets one)
    num_to_keep: int = 2  # checkpoints kept on storage

    def __post_init__(self) -> None:
        checks = [
            (self.arch in CLASSIFIER_ARCHS, "arch", f"one of {', '.join(CLASSIFIER_ARCHS)}"),
            (self.width >= 1, "width", ">= 1"),
            (self.num_classes >= 2, "num_classes", ">= 2"),
            (self.resolution >= 8, "resolution", ">= 8"),
            (len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0, "std",
             "3 positive values (mean: 3 values)"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch_size >= 2, "batch_size", ">= 2 (BatchNorm needs two images)"),
            (self.lr >= 0, "lr", ">= 0 (0: 0.1 * batch_size / 128)"),
            (0 <= self.momentum < 1, "momentum", "in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
             f"in [0, epochs={self.epochs}) (pass --warmup-epochs)"),
            (self.crop_padding >= -1, "crop_padding", ">= 0, or -1 for resolution // 8"),
            (self.ckpt_every >= 1, "ckpt_every", ">= 1"),
            (self.num_to_keep >= 1, "num_to_keep", ">= 1"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise RaydiffError(f"classifier {key}={getattr(self, key)!r} is invalid: "
                                   f"expected {expected}")

    @property
    def base_lr(self) -> float:
        return self.lr or 0.1 * self.batch_size / REFERENCE_BATCH

    @property
    def padding(self) -> int:
        return self.resolution // 8 if self.crop_padding < 0 else self.crop_padding

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        """From ``to_dict`` output (JSON); unknown keys and wrong types are errors."""
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(data) - set(hints))
        if unknown:
            raise RaydiffError(f"unknown classifier config key {unknown[0]!r}: expected one of "
                               f"{', '.join(hints)}")
        return cls(**{k: _coerce(v, hints[k], f"classifier {k}") for k, v in data.items()})
