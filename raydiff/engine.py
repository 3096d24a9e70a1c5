"""One training step, EMA and checkpoint state, without Ray.

``Engine`` owns the model, its EMA copy, the optimiser and the warm-up schedule. The Ray
layer hands it a ``wrap`` function (DDP via ``ray.train.torch.prepare_model``); the EMA copy is
always taken from the unwrapped module, outside any DDP wrapper, so it is never synchronised
or hooked by DDP.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from raydiff.checkpoint import Checkpoint, load_checkpoint, read_config, read_weights, save_checkpoint
from raydiff.config import Config, OptimConfig
from raydiff.diffusion import GaussianDiffusion
from raydiff.errors import RaydiffError
from raydiff.losses import compute_losses
from raydiff.unet import UNet, build_model


class NonFiniteLossError(RaydiffError):
    """A loss term or the gradient became NaN or infinite; the weights were not updated."""


class EMA:
    """Exponential moving average of a model's weights: ema <- decay ema + (1 - decay) w."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def build_optimizer(params, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up then constant, as pytorch-ddpm's ``min(step, warmup) / warmup``."""
    return 1.0 if warmup_steps == 0 else min(step, warmup_steps) / warmup_steps


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the noise, timesteps and label dropout of one step on one worker.

    A function of (seed, rank, step) alone, so a resumed run draws the same numbers as an
    uninterrupted one.
    """
    return (seed * 1_000_003 + rank) * 1_000_000_007 + step


class Engine:
    """Model, EMA, optimiser and the step counter of one (data-parallel) worker."""

    def __init__(self, cfg: Config, device: str | torch.device = "cpu", rank: int = 0,
                 wrap: Callable[[nn.Module], nn.Module] | None = None,
                 class_prior: torch.Tensor | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.rank = rank
        self.class_prior = class_prior
        self.memory_format = (torch.channels_last if cfg.train.channels_last
                              else torch.contiguous_format)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
            model = build_model(cfg.model)
        self.model: UNet = model.to(self.device, memory_format=self.memory_format)
        self.ema = EMA(self.model, cfg.optim.ema_decay)
        self.net = wrap(self.model) if wrap is not None else self.model
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim,
                                         fused=self.device.type == "cuda")
        self.diffusion = GaussianDiffusion(cfg.diffusion)
        self.generator = torch.Generator(self.device)
        self.step = 0

    # -- training ----------------------------------------------------------------------------

    def _set_lr(self) -> float:
        lr = self.cfg.optim.lr * warmup_factor(self.step, self.cfg.optim.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, x0: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One optimiser step on a batch of images in [-1, 1] and labels; returns the terms."""
        self.net.train()
        x0 = x0.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        y = y.to(self.device, non_blocking=True)
        lr = self._set_lr()
        self.generator.manual_seed(step_seed(self.cfg.train.seed, self.rank, self.step))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16):
            terms = compute_losses(self.net, self.diffusion, x0, y, self.cfg.loss,
                                   self.class_prior, self.generator)
        values = {name: float(v.detach()) for name, v in terms.items()}
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        clip = self.cfg.optim.grad_clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                         clip if clip > 0 else float("inf")))
        # The gradients are already averaged over workers, so a NaN on any one of them shows
        # in every worker's grad_norm and all stop at the same step, weights untouched.
        bad = {name: v for name, v in values.items() if not math.isfinite(v)}
        if bad or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            named = bad or {"grad_norm": grad_norm}
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1}: " + ", ".join(
                f"{name}={value}" for name, value in named.items()))
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        return {**values, "lr": lr, "grad_norm": grad_norm}

    # -- checkpoints -------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(path, self.cfg, self.step, self.model.state_dict(),
                               self.ema.model.state_dict(), self.optimizer.state_dict())

    def load(self, path: str | Path) -> None:
        """Resume model, EMA, optimiser and step; refuses a checkpoint of another network."""
        self.restore(load_checkpoint(path, expected=self.cfg.model, device=self.device))

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.load_state_dict(ckpt.model)
        self.ema.model.load_state_dict(ckpt.ema)
        if ckpt.optimizer is not None:
            self.optimizer.load_state_dict(ckpt.optimizer)
        self.step = ckpt.step


def load_for_sampling(path: str | Path, device: str | torch.device = "cpu",
                      use_ema: bool = True, sha256: str | None = None) -> tuple[UNet, Config]:
    """The (EMA) network of a checkpoint in eval mode, and the checkpoint's config. With
    ``sha256``, the weights file must still be the one that hashed to it."""
    model, cfg, _ = open_for_sampling(path, device, use_ema, sha256)
    return model, cfg


def open_for_sampling(path: str | Path, device: str | torch.device = "cpu",
                      use_ema: bool = True, sha256: str | None = None) -> tuple[UNet, Config, str]:
    """``load_for_sampling`` plus the sha256 of the weight bytes it loaded; the config and the
    weights are read and checked (tensor names and shapes against the config's network)."""
    path = Path(path)
    cfg = read_config(path)
    weights, digest = read_weights(path, "ema.safetensors" if use_ema else "model.safetensors",
                                   sha256, device)
    model = build_model(cfg.model).to(device)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise RaydiffError(f"checkpoint {path} does not fit its own config.json: "
                           f"{' '.join(str(err).split())[:300]}") from None
    return model.eval().requires_grad_(False), cfg, digest
