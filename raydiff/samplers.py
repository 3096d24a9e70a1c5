"""DDPM and DDIM loops, flow-matching ODE/SDE integrators, classifier-free guidance, one
random stream per image.

Samplers are plain functions with one signature per process (k-diffusion style):
``sampler(model_fn, diffusion, labels, noise, shape, steps=..., eta=..., clip_x0=...,
last_step=...) -> x0 in [-1, 1]`` for DDPM (``model_fn(x_t, t, y) -> eps``), and
``sampler(model_fn, flow, labels, noise, shape, steps=..., last_step_size=...) -> x1`` for
flow matching (``model_fn(x_t, t, y) -> velocity``, t from 0 = noise to 1 = data).
``noise`` draws every random number of image i from image i's own generator (EDM's
StackedRandomGenerator). A sample therefore depends only on (seed, label, settings), never on
the batch size or the position in the batch, which is what lets Ray split sampling across any
number of actors and still give the same images. ``sample_images`` picks the sampler family
from the process it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from raydiff.config import SAMPLERS as PROCESS_SAMPLERS
from raydiff.config import SampleConfig
from raydiff.diffusion import GaussianDiffusion
from raydiff.flow import FlowMatching

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ImageNoise:
    """One ``torch.Generator`` per image, seeded with that image's seed."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """A (len(seeds), *shape) standard normal tensor, row i from generator i."""
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device)
                            for g in self.generators])


def guided_model_fn(model: nn.Module, null_label: int, guidance: float) -> ModelFn:
    """Classifier-free guidance, CBDM/CCUA convention: eps = eps_c + w (eps_c - eps_u), and
    the same on velocities under flow matching (SiT's ``--cfg-scale s``, v_u + s (v_c - v_u),
    is w = s - 1).

    The conditional and unconditional predictions come from one forward pass over a batch
    of 2B. ``w = 0`` is plain conditional sampling, and skips the unconditional half.
    """
    if guidance == 0:
        return model

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        null = torch.full_like(y, null_label)
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return eps_c + guidance * (eps_c - eps_u)

    return model_fn


def denoised(diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
             clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The x0 and eps a step uses. With ``clip_x0`` the x0 prediction is clamped to the data
    range and eps recomputed from it, as guided-diffusion's samplers do (``clip_denoised``): an
    under-trained model's x0 overshoots [-1, 1] at large t, and the clamp keeps the trajectory
    on the data range."""
    x0 = diffusion.predict_x0(x, t, eps)
    if not clip_x0:
        return x0, eps
    x0 = x0.clamp(-1, 1)
    return x0, diffusion.predict_eps(x, t, x0)


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced subsequence, descending: 100 of 1000 steps = 990, 980, ..., 0."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps} must be in [1, {num_timesteps}]")
    return [i * num_timesteps // steps for i in range(steps)][::-1]


def ddim_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, labels: torch.Tensor,
                noise: ImageNoise, shape: Sequence[int], steps: int = 100,
                eta: float = 0.0, clip_x0: bool = False, last_step: str = "x0",
                clamp: bool = True) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12); eta = 0 is deterministic given x_T.

    The timesteps are diffusers' ``timestep_spacing="leading"`` (``ddim_timesteps``). The last
    step starts at t = 0: ``last_step="x0"`` steps to alpha_bar = 1 and returns the clean x0
    prediction (diffusers' ``set_alpha_to_one=True``); ``"identity"`` stays at alpha_bar_0 and
    so returns x_0 itself, sqrt(1 - alpha_bar_0) eps = 0.01 eps of noise included, which is
    what the released CCUA sampler does (diffusers' ``set_alpha_to_one=False``).
    ``clamp=False`` returns x0 unclamped: latents are not confined to [-1, 1].
    """
    if last_step not in ("x0", "identity"):
        raise ValueError(f"last_step={last_step!r} must be 'x0' or 'identity'")
    x = noise.randn(shape)
    seq = ddim_timesteps(diffusion.num_timesteps, steps)
    # The identity step changes nothing (x0 and eps are consistent with x at alpha_bar_0):
    # it is skipped, not computed.
    prevs = seq[1:] + [-1] if last_step == "x0" else seq[1:]
    for t_cur, t_prev in zip(seq, prevs):
        t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=torch.long)
        x0, eps = denoised(diffusion, x, t, model_fn(x, t, labels), clip_x0)
        ab_t = diffusion.alpha_bar_at(t, x)
        ab_prev = diffusion.alpha_bar_at(torch.full_like(t, t_prev), x)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev >= 0:
            x = x + sigma * noise.randn(shape)
    return x.clamp(-1, 1) if clamp else x


def ddpm_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, labels: torch.Tensor,
                noise: ImageNoise, shape: Sequence[int], steps: int | None = None,
                eta: float = 1.0, clip_x0: bool = False, last_step: str = "x0",
                clamp: bool = True) -> torch.Tensor:
    """Ancestral sampling over all T steps with the "fixedlarge" variance (pytorch-ddpm).

    ``steps``, ``eta`` and ``last_step`` exist only to share the sampler signature; ancestral
    sampling always walks every timestep and ends on the posterior mean at t = 0.
    """
    del steps, eta, last_step
    x = noise.randn(shape)
    for t_cur in reversed(range(diffusion.num_timesteps)):
        t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=torch.long)
        x0, _ = denoised(diffusion, x, t, model_fn(x, t, labels), clip_x0)
        mean = diffusion.posterior_mean(x0, x, t)
        if t_cur > 0:
            x = mean + diffusion.at(diffusion.fixedlarge_std, t, x) * noise.randn(shape)
        else:
            x = mean
    return x.clamp(-1, 1) if clamp else x


SAMPLERS = {"ddim": ddim_sample, "ddpm": ddpm_sample}


# -- flow matching (SiT's transport.Sampler, fixed-step) -------------------------------------

def _t(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=x.dtype)


def euler_sample(model_fn: ModelFn, flow: FlowMatching, labels: torch.Tensor,
                 noise: ImageNoise, shape: Sequence[int], steps: int = 50,
                 last_step_size: float = 0.0) -> torch.Tensor:
    """Euler's method on dx/dt = v(x, t) from t = 0 (noise) to 1, ``steps`` equal steps.
    (SiT's ``--num-sampling-steps N`` with a fixed-step ODE solver takes N - 1 steps.)
    ``last_step_size`` only shares the signature."""
    del last_step_size
    x = noise.randn(shape)
    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t_cur) * model_fn(x, _t(t_cur, x), labels)
    return x


def heun_sample(model_fn: ModelFn, flow: FlowMatching, labels: torch.Tensor,
                noise: ImageNoise, shape: Sequence[int], steps: int = 50,
                last_step_size: float = 0.0) -> torch.Tensor:
    """Heun's method (explicit trapezoid, 2 evaluations a step) on dx/dt = v from 0 to 1;
    v is finite at t = 1 on the linear path, so the last step needs no special case."""
    del last_step_size
    x = noise.randn(shape)
    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t_cur
        k1 = model_fn(x, _t(t_cur, x), labels)
        k2 = model_fn(x + h * k1, _t(t_next, x), labels)
        x = x + h / 2 * (k1 + k2)
    return x


def sde_sample(model_fn: ModelFn, flow: FlowMatching, labels: torch.Tensor,
               noise: ImageNoise, shape: Sequence[int], steps: int = 250,
               last_step_size: float = 0.04) -> torch.Tensor:
    """Euler-Maruyama on dx = [v + w(t) s(x, t)] dt + sqrt(2 w(t)) dW, which has the ODE's
    marginals (SiT's ``sample_sde`` with its defaults: diffusion form "sigma", w(t) = 1 - t,
    and s the score implied by v). As SiT: ``steps - 1`` noisy steps on an even grid from 0
    to 1 - ``last_step_size``, then one noise-free step of that size ("Mean": x + drift h);
    ``steps`` network evaluations in all, SiT's ``--num-sampling-steps``. With
    ``last_step_size = 0``: ``steps`` noisy steps from 0 to 1."""
    x = noise.randn(shape)
    end = 1.0 - last_step_size
    count = steps if last_step_size == 0 else steps - 1
    grid = torch.linspace(0, end, count + 1, dtype=torch.float64).tolist()

    def drift(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = model_fn(x, t, labels)
        return v + flow.sde_diffusion(t, x) * flow.score(x, t, v)

    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        t, h = _t(t_cur, x), t_next - t_cur
        x = x + drift(x, t) * h + (2 * flow.sde_diffusion(t, x) * h).sqrt() * noise.randn(shape)
    if last_step_size > 0:
        x = x + drift(x, _t(end, x)) * last_step_size
    return x


FLOW_SAMPLERS = {"euler": euler_sample, "heun": heun_sample, "sde": sde_sample}


@torch.inference_mode()
def sample_images(model: nn.Module, diffusion: GaussianDiffusion | FlowMatching,
                  labels: Sequence[int], seeds: Sequence[int], cfg: SampleConfig,
                  clamp: bool = True) -> torch.Tensor:
    """Samples (B, C, H, W) for the given labels and per-image seeds: images in [-1, 1]
    under DDPM (with ``clamp=False``, the network's data space unclamped: latents, which a
    VAE decodes); under flow matching the integrator's end point x1, never clamped (it may
    be a latent, whose range is not [-1, 1]).

    ``model`` must be in eval mode (dropout off); EMA weights are what one samples from.
    """
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    if cfg.sampler not in PROCESS_SAMPLERS[diffusion.process]:
        raise ValueError(f"sampler {cfg.sampler!r} is not a sampler of the {diffusion.process} "
                         f"process ({', '.join(PROCESS_SAMPLERS[diffusion.process])})")
    device = next(model.parameters()).device
    mcfg = model.cfg
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    guided = guided_model_fn(model, mcfg.num_classes, cfg.guidance)
    shape = (mcfg.in_channels, mcfg.resolution, mcfg.resolution)
    if isinstance(diffusion, FlowMatching):
        return FLOW_SAMPLERS[cfg.sampler](guided, diffusion, y, ImageNoise(seeds, device), shape,
                                          steps=cfg.steps, last_step_size=cfg.sde_last_step)

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Guidance is an affine combination (weights 1 + w and -w), so guiding the network's
        # output and then converting it to eps equals guiding the eps it implies.
        return diffusion.eps_from_output(x, t, guided(x, t, y))
    return SAMPLERS[cfg.sampler](model_fn, diffusion, y, ImageNoise(seeds, device), shape,
                                steps=cfg.steps, eta=cfg.eta, clip_x0=cfg.clip_x0,
                                last_step=cfg.ddim_last_step, clamp=clamp)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), rounding as torchvision's save_image does."""
    x = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def sample_aligned(model: torch.nn.Module, diffusion: GaussianDiffusion | FlowMatching,
                   cfg: SampleConfig, indices: np.ndarray, labels: np.ndarray,
                   seeds: np.ndarray, forward_batch: int, decode=None) -> np.ndarray:
    """uint8 NHWC images of the given indices, each computed at its fixed block position.

    Block b of ``forward_batch`` rows holds indices [b M, (b+1) M); a row whose index is not
    requested is padding (a copy of a requested row), so the network always sees M rows and
    image i always sits at row i % M. ``decode`` (a latent codec's: unclamped latents ->
    uint8 NHWC) turns each whole block into images, so its bytes are fixed by the block too;
    None: pixel space (``to_uint8``).
    """
    indices, labels, seeds = (np.asarray(a, np.int64) for a in (indices, labels, seeds))
    out = None
    blocks = indices // forward_batch
    for block in np.unique(blocks):
        rows = np.flatnonzero(blocks == block)
        slots = indices[rows] % forward_batch
        block_labels = np.full(forward_batch, labels[rows[0]])
        block_seeds = np.full(forward_batch, seeds[rows[0]])
        block_labels[slots], block_seeds[slots] = labels[rows], seeds[rows]
        x = sample_images(model, diffusion, block_labels.tolist(), block_seeds.tolist(), cfg,
                          clamp=decode is None)
        images = (to_uint8(x) if decode is None else decode(x))[slots]
        if out is None:
            out = np.empty((len(indices), *images.shape[1:]), np.uint8)
        out[rows] = images
    return out if out is not None else np.zeros((0, 0, 0, 3), np.uint8)
