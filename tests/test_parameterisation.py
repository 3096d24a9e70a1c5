"""eps, x0 and v prediction, and the min-SNR weighting, against their definitions."""

import pytest
import torch

from raydiff import config as config_lib
from raydiff.config import DiffusionConfig, LossConfig
from raydiff.diffusion import GaussianDiffusion
from raydiff.errors import RaydiffError
from raydiff.losses import compute_losses
from raydiff.samplers import ImageNoise, ddim_sample, ddpm_sample

SHAPE = (3, 8, 8)
PREDICTIONS = ("eps", "x0", "v")


def diffusion(prediction: str, weighting: str = "uniform") -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(prediction=prediction, loss_weighting=weighting))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_output_converts_back_to_the_noise_it_was_made_from(prediction):
    d = diffusion(prediction)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, *SHAPE, generator=g) * 2 - 1, torch.randn(4, *SHAPE, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, eps)
    target = d.target(x0, eps, t)
    # x0 -> eps divides by sqrt(1 - ab_0) = 0.01 at t = 0: float32 rounding grows 100-fold
    atol = 2e-3 if prediction == "x0" else 1e-5
    assert torch.allclose(d.eps_from_output(x_t, t, target), eps, atol=atol)
    expected = {"eps": eps, "x0": x0,
                "v": d.alpha_bar[t].sqrt().view(-1, 1, 1, 1).float() * eps
                - (1 - d.alpha_bar[t]).sqrt().view(-1, 1, 1, 1).float() * x0}[prediction]
    assert torch.allclose(target, expected, atol=1e-6)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sampler,kw", [(ddim_sample, {"steps": 10}), (ddpm_sample, {})])
def test_samplers_recover_the_data_point_from_an_exact_model_of_any_output(prediction, sampler,
                                                                          kw):
    """The exact model of a one-image data set, written as each parameterisation's output."""
    d = diffusion(prediction)
    x0_star = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8

    def exact_output(x_t, t, y):
        x0 = x0_star.expand_as(x_t)
        return d.target(x0, d.predict_eps(x_t, t, x0), t)

    def model_fn(x_t, t, y):
        return d.eps_from_output(x_t, t, exact_output(x_t, t, y))

    x = sampler(model_fn, d, torch.zeros(2, dtype=torch.long), ImageNoise([3, 4]), SHAPE, **kw)
    assert torch.allclose(x, x0_star.expand_as(x), atol=1e-3)


def test_min_snr_gives_every_output_the_same_weight_on_an_x0_error():
    """An x0 error delta at fixed x_t is an eps error of sqrt(SNR) delta and a v error of
    sqrt(SNR + 1) delta; min-SNR weights make all three losses min(SNR, gamma) |delta|^2."""
    t = torch.tensor([0, 100, 400, 999])
    delta = 0.1
    losses = {}
    for prediction in PREDICTIONS:
        d = diffusion(prediction, "min_snr")
        snr = d.alpha_bar[t] / (1 - d.alpha_bar[t])
        scale = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[prediction]
        losses[prediction] = d.loss_weight(t).double() * scale * delta ** 2
    snr = diffusion("eps").alpha_bar[t] / (1 - diffusion("eps").alpha_bar[t])
    for prediction in PREDICTIONS:
        assert torch.allclose(losses[prediction], snr.clamp(max=5.0) * delta ** 2, rtol=1e-5)
    assert diffusion("v").loss_weight(t) is None  # uniform: plain mean squared error


class LinearModel(torch.nn.Module):
    """out = a * x_t + b_y, features = x_t: enough to check which space each term uses."""

    null_label = 4

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 5))

    def forward(self, x, t, y, return_features=False):
        out = self.a * x + self.b[y].view(-1, 1, 1, 1)
        return (out, x.flatten(1)) if return_features else out


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ccua_alignment_compares_the_implied_eps_and_ddpm_the_configured_target(prediction):
    d = diffusion(prediction)
    cfg = LossConfig(label_dropout=0.0, ucl_weight=0.0)
    model = LinearModel()
    g = torch.Generator().manual_seed(0)
    x0, y = torch.rand(8, *SHAPE, generator=g) * 2 - 1, torch.arange(8) % 4
    terms = compute_losses(model, d, x0, y, cfg, generator=torch.Generator().manual_seed(5))
    # replay compute_losses' draws
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = d.q_sample(x0, t, eps)
    with torch.no_grad():
        out_c, out_u = model(x_t, t, y), model(x_t, t, torch.full_like(y, 4))
        ddpm = (out_c - d.target(x0, eps, t)).pow(2).flatten(1).mean(1).mean()
        gap = d.eps_from_output(x_t, t, out_c) - d.eps_from_output(x_t, t, out_u)
        al = (t.float() / 1000 * gap.pow(2).flatten(1).mean(1)).mean()
    assert terms["ddpm"].item() == pytest.approx(ddpm.item(), rel=1e-5)
    assert terms["al"].item() == pytest.approx(al.item(), rel=1e-4)


def test_bad_prediction_and_weighting_are_refused():
    for override, message in [("diffusion.prediction=score", "expected eps or x0 or v"),
                              ("diffusion.loss_weighting=snr", "expected uniform or min_snr"),
                              ("diffusion.min_snr_gamma=nan", "expected a finite number"),
                              ("diffusion.min_snr_gamma=0", "expected a finite number > 0")]:
        with pytest.raises(RaydiffError, match=message):
            config_lib.resolve("tiny", overrides=[override])
