"""raydiff's DDIM and DDPM steps against diffusers' schedulers configured the same way.

The linear schedule of DDPM (T = 1000, betas 1e-4 .. 0.02) in both; an analytic model (the
exact eps-prediction for Gaussian data) drives both loops, and both draw their noise from the
same per-image generators (diffusers accepts one generator per image). diffusers keeps its
tables in float32 and raydiff in float64, hence the tolerances.

Which diffusers settings match:
- DDIM: ``timestep_spacing="leading"`` with ``steps_offset=0`` gives raydiff's timesteps
  (``i * T // steps``, 900, 800, ..., 0 for 10 steps); ``set_alpha_to_one=True`` is raydiff's
  default last step (``sample.ddim_last_step="x0"``) and ``set_alpha_to_one=False`` is the
  released CCUA sampler's identity last step (``"identity"``).
- DDPM: ``variance_type="fixed_large"`` is pytorch-ddpm's "fixedlarge" (beta_t; the entry at
  t = 0 differs but no noise is added there).
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from raydiff.config import DiffusionConfig
from raydiff.diffusion import GaussianDiffusion
from raydiff.samplers import ImageNoise, ddim_sample, ddim_timesteps, ddpm_sample

DIFFUSION = GaussianDiffusion(DiffusionConfig())
SHAPE = (3, 4, 4)
SEEDS = [11, 12]
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                beta_end=0.02, clip_sample=False, prediction_type="epsilon")
DATA_STD = 0.3  # samples stay inside [-1, 1], where raydiff clamps


def gaussian_oracle(x_t: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
    """E[eps | x_t] when x0 ~ N(0, DATA_STD^2): sqrt(1 - ab) x_t / (ab s^2 + 1 - ab)."""
    ab = DIFFUSION.alpha_bar.to(x_t.dtype)[t].view(-1, 1, 1, 1)
    return (1 - ab).sqrt() * x_t / (ab * DATA_STD ** 2 + 1 - ab)


def _generators():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def _diffusers_loop(scheduler, steps: int, **step_kwargs) -> torch.Tensor:
    generators = _generators()
    x = torch.cat([torch.randn((1, *SHAPE), generator=g) for g in generators])
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps = gaussian_oracle(x, torch.full((len(SEEDS),), int(t)))
        x = scheduler.step(eps, t, x, generator=generators, **step_kwargs).prev_sample
    return x


def _raydiff(sampler, **kwargs) -> torch.Tensor:
    labels = torch.zeros(len(SEEDS), dtype=torch.long)
    return sampler(gaussian_oracle, DIFFUSION, labels, ImageNoise(SEEDS), SHAPE, **kwargs)


def test_ddim_timesteps_are_diffusers_leading_spacing():
    scheduler = DDIMScheduler(**SCHEDULE, timestep_spacing="leading", steps_offset=0)
    for steps in (10, 50, 100, 1000):
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == ddim_timesteps(1000, steps)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("last_step,alpha_to_one", [("x0", True), ("identity", False)])
def test_ddim_matches_diffusers(eta, last_step, alpha_to_one):
    scheduler = DDIMScheduler(**SCHEDULE, timestep_spacing="leading", steps_offset=0,
                              set_alpha_to_one=alpha_to_one)
    expected = _diffusers_loop(scheduler, 10, eta=eta)
    got = _raydiff(ddim_sample, steps=10, eta=eta, last_step=last_step)
    assert expected.abs().max() < 1  # inside the range raydiff clamps to
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()


def test_ddim_identity_last_step_keeps_a_hundredth_of_the_noise():
    """With the exact model of a single data point x0*, DDIM (eta = 0) keeps the noise
    direction e of x_T at every step: x_t = sqrt(ab_t) x0* + sqrt(1 - ab_t) e. The identity
    last step returns x_0 = sqrt(ab_0) x0* + 0.01 e (sqrt(1 - ab_0) = sqrt(beta_0)), the x0
    step returns x0* itself."""
    x0_star = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.8

    def delta_oracle(x_t, t, y):
        return DIFFUSION.predict_eps(x_t, t, x0_star.expand_as(x_t))

    labels = torch.zeros(len(SEEDS), dtype=torch.long)
    clean, kept = (ddim_sample(delta_oracle, DIFFUSION, labels, ImageNoise(SEEDS), SHAPE,
                               steps=10, last_step=last) for last in ("x0", "identity"))
    x_T = ImageNoise(SEEDS).randn(SHAPE)
    t_first = torch.full((len(SEEDS),), ddim_timesteps(1000, 10)[0])
    e = DIFFUSION.predict_eps(x_T, t_first, x0_star.expand_as(x_T))
    assert torch.allclose(clean, x0_star.expand_as(clean), atol=1e-5)
    sqrt_ab0 = DIFFUSION.alpha_bar[0].sqrt().item()
    assert torch.allclose(kept, sqrt_ab0 * x0_star + 0.01 * e, atol=1e-5)
    assert (kept - clean).abs().max() > 5e-3


def test_ddpm_matches_diffusers_fixed_large():
    scheduler = DDPMScheduler(**SCHEDULE, variance_type="fixed_large", timestep_spacing="leading")
    expected = _diffusers_loop(scheduler, 1000)
    got = _raydiff(ddpm_sample)
    assert expected.abs().max() < 1
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
