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
import torch.distributed as dist
from torch import nn

from raydiff.checkpoint import Checkpoint, load_checkpoint, read_config, read_weights, save_checkpoint
from raydiff.config import Config, OptimConfig
from raydiff.diffusion import make_process
from raydiff.errors import RaydiffError
from raydiff.losses import compute_losses
from raydiff.networks import build_model


class NonFiniteLossError(RaydiffError):
    """A loss term or the gradient became NaN or infinite; the weights were not updated."""


class EMA:
    """Exponential moving average of a model's weights: ema <- decay ema + (1 - decay) w."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> None:
        """One EMA step. ``applied`` (a 0-d tensor, 1 or 0) scales it on the device: after a
        skipped training step the average stays exactly as it was, and the host is not asked
        (a tensor factor goes to ``_foreach_mul_`` as a tensor; a Python scalar would sync)."""
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        rate = 1.0 - self.decay
        if applied is None:
            torch._foreach_lerp_(ema_params, params, rate)
        else:
            steps = torch._foreach_sub(params, ema_params)
            torch._foreach_mul_(steps, applied * rate)
            torch._foreach_add_(ema_params, steps)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b if applied is None else torch.where(applied > 0, b, b_ema))


def build_optimizer(params, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def use_fused(optimizer: torch.optim.Optimizer) -> None:
    """The fused kernels (CPU and CUDA) are the ones that skip a step on the device when told
    ``found_inf``; a checkpoint's optimiser state may carry ``fused: None`` from before."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None


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
        self.model: nn.Module = model.to(self.device, memory_format=self.memory_format)
        self.ema = EMA(self.model, cfg.optim.ema_decay)
        self.net = wrap(self.model) if wrap is not None else self.model
        if cfg.train.compile:
            self.net = torch.compile(self.net)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim, fused=True)
        self.diffusion = make_process(cfg.diffusion)
        self.generator = torch.Generator(self.device)
        self.step = 0
        # device-side record of the steps since the last ``collect``
        self._names: list[str] | None = None
        self._sums = self._bad = None
        self._seen, self._lr_sum = 0, 0.0

    # -- training ----------------------------------------------------------------------------

    def _set_lr(self) -> float:
        lr = self.cfg.optim.lr * warmup_factor(self.step, self.cfg.optim.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, x0: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimiser step on a batch of images in [-1, 1] and labels.

        Returns the loss terms and the gradient norm as 0-d tensors on the device and never
        waits for the device: the host learns how the steps went in ``collect``, once per log
        interval. A step whose terms or gradient norm are not finite changes nothing: the fused
        optimiser skips it on the device (``found_inf``), the EMA moves by zero, and the step
        is recorded for ``collect`` to raise. Data-parallel workers agree on the skip (a
        minimum over the workers), so their replicas stay equal.
        """
        self.net.train()
        x0 = x0.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        y = y.to(self.device, non_blocking=True)
        self._lr_sum += self._set_lr()
        self.generator.manual_seed(step_seed(self.cfg.train.seed, self.rank, self.step))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16):
            terms = compute_losses(self.net, self.diffusion, x0, y, self.cfg.loss,
                                   self.class_prior, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   clip if clip > 0 else float("inf"))
        out = {name: v.detach() for name, v in terms.items()} | {"grad_norm": grad_norm.detach()}
        values = torch.stack([v.float() for v in out.values()])
        finite = torch.isfinite(values).all().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # queued, not waited for
        self._record(list(out), values, finite)
        self.optimizer.found_inf = 1.0 - finite  # read by the fused step, on the device
        self.optimizer.step()
        self.ema.update(self.model, applied=finite)
        self.step += 1
        return out

    def _record(self, names: list[str], values: torch.Tensor, finite: torch.Tensor) -> None:
        """Add a step's values to the device-side sums; remember the first non-finite step."""
        if self._names != names:
            if self._names is not None and self._seen:
                raise RuntimeError(f"loss terms changed from {self._names} to {names}")
            self._names = names
            self._sums = torch.zeros(len(names), dtype=torch.float64, device=self.device)
            self._bad = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)
        self._sums += values.double()
        # _bad = [step of the first non-finite step (0: none yet), its values...]
        first = (finite == 0) & (self._bad[0] == 0)
        here = torch.cat([torch.full((1,), self.step + 1.0, dtype=torch.float64,
                                     device=self.device), values.double()])
        self._bad = torch.where(first, here, self._bad)
        self._seen += 1

    def collect(self) -> dict[str, float]:
        """The means of the terms (and the learning rate) over the steps since the last
        collect, over every worker when data-parallel: one host synchronisation.

        Raises ``NonFiniteLossError`` naming the first non-finite step of any worker and the
        terms that were not finite there (the worker's own values if that step was its own),
        on every worker alike, so all stop at the same step.
        """
        if not self._seen:
            raise RuntimeError("collect() before any train_step()")
        packed = torch.cat([self._sums, torch.tensor([float(self._seen)], dtype=torch.float64,
                                                     device=self.device)])
        first = torch.where(self._bad[0] > 0, self._bad[0], torch.tensor(
            float("inf"), dtype=torch.float64, device=self.device)).reshape(1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        totals, first_step = packed.tolist(), first.item()
        bad = self._bad.tolist()
        names, lr_mean = self._names, self._lr_sum / self._seen
        self._sums.zero_()
        self._bad.zero_()
        self._seen, self._lr_sum = 0, 0.0
        if math.isfinite(first_step):
            if bad[0] == first_step:
                named = {n: v for n, v in zip(names, bad[1:]) if not math.isfinite(v)}
                detail = ", ".join(f"{n}={v}" for n, v in named.items())
            else:
                detail = "on another worker"
            raise NonFiniteLossError(f"non-finite loss at step {int(first_step)}: {detail}")
        means = {n: v / totals[-1] for n, v in zip(names, totals[:-1])}
        return {**means, "lr": lr_mean}

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
            use_fused(self.optimizer)
        self.step = ckpt.step


def load_for_sampling(path: str | Path, device: str | torch.device = "cpu",
                      use_ema: bool = True, sha256: str | None = None) -> tuple[nn.Module, Config]:
    """The (EMA) network of a checkpoint in eval mode, and the checkpoint's config. With
    ``sha256``, the weights file must still be the one that hashed to it."""
    model, cfg, _ = open_for_sampling(path, device, use_ema, sha256)
    return model, cfg


def open_for_sampling(path: str | Path, device: str | torch.device = "cpu",
                      use_ema: bool = True, sha256: str | None = None) -> tuple[nn.Module, Config, str]:
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
