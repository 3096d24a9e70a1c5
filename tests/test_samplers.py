"""Noise process and samplers, checked against analytic oracle models."""

import pytest
import torch

from raydiff.config import DiffusionConfig, ModelConfig, SampleConfig
from raydiff.diffusion import GaussianDiffusion
from raydiff.samplers import (
    ImageNoise,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    guided_model_fn,
    sample_images,
    to_uint8,
)
from raydiff.unet import UNet

DIFFUSION = GaussianDiffusion(DiffusionConfig())
SHAPE = (3, 8, 8)


def delta_oracle(x0_star: torch.Tensor):
    """The exact eps-prediction when the data distribution is a single image x0_star."""
    def model_fn(x_t, t, y):
        return DIFFUSION.predict_eps(x_t, t, x0_star.expand_as(x_t))
    return model_fn


def test_schedule_matches_ddpm_definitions():
    d = DIFFUSION
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(d.alpha_bar, torch.cumprod(1 - d.betas, 0))
    # fixedlarge: beta_t, except index 0 which is the posterior variance at index 1
    assert d.fixedlarge_std[5].item() ** 2 == pytest.approx(d.betas[5].item())
    assert d.fixedlarge_std[0].item() ** 2 == pytest.approx(d.posterior_var[1].item())


def test_q_sample_and_predict_x0_invert_each_other():
    x0, eps = torch.rand(4, *SHAPE) * 2 - 1, torch.randn(4, *SHAPE)
    t = torch.tensor([0, 10, 500, 999])
    x_t = DIFFUSION.q_sample(x0, t, eps)
    assert torch.allclose(DIFFUSION.predict_x0(x_t, t, eps), x0, atol=1e-3)
    assert torch.allclose(DIFFUSION.predict_eps(x_t, t, x0), eps, atol=1e-4)


def test_ddim_timesteps_are_every_tenth_for_100_of_1000():
    seq = ddim_timesteps(1000, 100)
    assert seq[0] == 990 and seq[-1] == 0 and len(seq) == 100
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


@pytest.mark.parametrize("steps,eta", [(10, 0.0), (50, 0.0), (25, 1.0)])
def test_ddim_with_oracle_recovers_the_data_point(steps, eta):
    x0_star = torch.rand(1, *SHAPE) * 1.6 - 0.8
    noise = ImageNoise([0, 1, 2], "cpu")
    x = ddim_sample(delta_oracle(x0_star), DIFFUSION, torch.zeros(3, dtype=torch.long), noise,
                    SHAPE, steps=steps, eta=eta)
    assert torch.allclose(x, x0_star.expand_as(x), atol=1e-4)


def test_ddpm_with_oracle_recovers_the_data_point():
    x0_star = torch.rand(1, *SHAPE) * 1.6 - 0.8
    x = ddpm_sample(delta_oracle(x0_star), DIFFUSION, torch.zeros(2, dtype=torch.long),
                    ImageNoise([5, 6]), SHAPE)
    assert torch.allclose(x, x0_star.expand_as(x), atol=1e-4)


def test_ddpm_with_gaussian_oracle_matches_data_spread():
    # Data N(0, s^2 I): the exact eps-prediction is sqrt(1-ab) x_t / (ab s^2 + 1 - ab).
    s = 0.3

    def oracle(x_t, t, y):
        ab = DIFFUSION.at(DIFFUSION.alpha_bar, t, x_t)
        return (1 - ab).sqrt() * x_t / (ab * s ** 2 + 1 - ab)

    x = ddpm_sample(oracle, DIFFUSION, torch.zeros(16, dtype=torch.long),
                    ImageNoise(range(16)), SHAPE)
    assert x.std().item() == pytest.approx(s, rel=0.1)
    assert abs(x.mean().item()) < 0.05


def _clip_reference(model_fn):
    """guided-diffusion's clip_denoised written as a model: eps re-derived from clamped x0."""
    def clipped(x_t, t, y):
        x0 = DIFFUSION.predict_x0(x_t, t, model_fn(x_t, t, y)).clamp(-1, 1)
        return DIFFUSION.predict_eps(x_t, t, x0)
    return clipped


@pytest.mark.parametrize("sampler,kw", [(ddim_sample, {"steps": 10}),
                                        (ddim_sample, {"steps": 10, "eta": 1.0}),
                                        (ddpm_sample, {})])
def test_clip_x0_clamps_each_prediction_and_leaves_an_exact_oracle_alone(sampler, kw):
    # A model whose x0 predictions leave [-1, 1] and couple neighbouring pixels, so that a
    # clamped pixel changes the later predictions of the others.
    def overshoot(x_t, t, y):
        ab = DIFFUSION.at(DIFFUSION.alpha_bar, t, x_t)
        x0 = 1.5 * ab.sqrt() * (x_t + x_t.roll(1, -1)) / 2
        return DIFFUSION.predict_eps(x_t, t, x0)

    x0_star = torch.rand(1, *SHAPE) * 1.6 - 0.8
    labels = torch.zeros(2, dtype=torch.long)
    clipped = sampler(overshoot, DIFFUSION, labels, ImageNoise([3, 4]), SHAPE, clip_x0=True, **kw)
    reference = sampler(_clip_reference(overshoot), DIFFUSION, labels, ImageNoise([3, 4]), SHAPE,
                        **kw)
    plain = sampler(overshoot, DIFFUSION, labels, ImageNoise([3, 4]), SHAPE, **kw)
    assert torch.allclose(clipped, reference, atol=1e-5)
    assert (clipped - plain).abs().max() > 1e-2, "clip_x0 changed nothing"
    # An exact model of data inside [-1, 1] never predicts out of range late in sampling.
    exact = sampler(delta_oracle(x0_star), DIFFUSION, labels, ImageNoise([3, 4]), SHAPE,
                    clip_x0=True, **kw)
    assert torch.allclose(exact, x0_star.expand_as(exact), atol=1e-4)


def _random_unet() -> UNet:
    torch.manual_seed(0)
    model = UNet(ModelConfig(resolution=8, ch=32, ch_mult=(1, 2), attn_resolutions=(4,),
                             num_res_blocks=1, num_classes=5))
    with torch.no_grad():  # trained-looking weights: the zero-initialised output would hide bugs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def test_sample_depends_only_on_seed_and_label_not_on_batch():
    model = _random_unet()
    cfg = SampleConfig(steps=5, guidance=1.5)
    alone = sample_images(model, DIFFUSION, [3], [42], cfg)
    batch = sample_images(model, DIFFUSION, [0, 1, 3, 4], [7, 8, 42, 9], cfg)
    # Equal up to float rounding: CPU kernels pick other algorithms for other batch sizes
    # (about 1e-6 per forward), which the 5 steps amplify to about 1e-5.
    assert torch.allclose(alone[0], batch[2], atol=1e-4)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)


def test_guidance_zero_is_conditional_sampling():
    model = _random_unet()
    plain = sample_images(model, DIFFUSION, [1, 2], [3, 4], SampleConfig(steps=5, guidance=0.0))
    # an infinitesimal w runs the batched cond/uncond path: it must agree with w = 0
    tiny_w = sample_images(model, DIFFUSION, [1, 2], [3, 4], SampleConfig(steps=5, guidance=1e-9))
    assert torch.allclose(plain, tiny_w, atol=1e-5)


def test_guided_eps_equals_separate_forwards():
    model = _random_unet()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([0, 2, 4])
    with torch.no_grad():
        eps_c = model(x, t, y)
        eps_u = model(x, t, torch.full_like(y, model.null_label))
        guided = guided_model_fn(model, model.null_label, 1.5)(x, t, y)
    assert torch.allclose(guided, eps_c + 1.5 * (eps_c - eps_u), atol=1e-5)


def test_ddpm_sampler_runs_through_sample_images():
    x = sample_images(_random_unet(), GaussianDiffusion(DiffusionConfig(num_timesteps=20)),
                      [0, 1], [0, 1], SampleConfig(sampler="ddpm", steps=20, guidance=0.0))
    assert x.shape == (2, 3, 8, 8) and x.abs().max() <= 1


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    assert to_uint8(x).reshape(-1).tolist() == [0, 128, 255, 255]
