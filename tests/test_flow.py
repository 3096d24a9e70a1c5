"""Flow matching: the path, the loss and the samplers against Gaussian data, where the exact
velocity field is known in closed form; CCUA, Dispersive Loss and diffrop on it against hand
values and against transcriptions of the released CCUA-SiT code."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.integrate import quad
from test_losses import SpyModel
from test_sit import random_sit

from raydiff.config import LossConfig, SampleConfig
from raydiff.flow import FlowMatching
from raydiff.losses import compute_losses, denoising_loss, diffrop_loss, dispersive_loss
from raydiff.samplers import (
    ImageNoise,
    euler_sample,
    guided_model_fn,
    heun_sample,
    sample_aligned,
    sample_images,
    sde_sample,
)

FLOW = FlowMatching()
MU, S = 0.3, 0.5  # data N(MU, S^2 I)
SHAPE = (1, 32, 32)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x1 - x0 | x_t = x] for x1 ~ N(MU, S^2), x0 ~ N(0, 1), x_t = t x1 + (1 - t) x0:
    mu + Cov(x1 - x0, x_t) / Var(x_t) (x - t mu), Var(x_t) = t^2 S^2 + (1 - t)^2."""
    t = t.double().reshape(-1, *([1] * (x.dim() - 1)))
    var = t ** 2 * S ** 2 + (1 - t) ** 2
    return (MU + (t * S ** 2 - (1 - t)) / var * (x.double() - t * MU)).to(x.dtype)


def oracle(x, t, y):
    return gaussian_velocity(x, t)


def test_path_ends_and_target():
    x1, x0 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(FLOW.interpolate(x1, x0, torch.ones(2)), x1)  # t = 1 is data
    assert torch.equal(FLOW.interpolate(x1, x0, torch.zeros(2)), x0)  # t = 0 is noise
    t, x_t, target = FLOW.draw(x1, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(t, torch.rand(2, generator=g)) and ((0 <= t) & (t < 1)).all()
    noise = torch.randn(x1.shape, generator=g)
    assert torch.allclose(x_t, FLOW.interpolate(x1, noise, t)) and torch.equal(target, x1 - noise)


def test_score_from_velocity_is_the_gaussian_score():
    x, t = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.tensor([0.0, 0.3, 0.6, 0.9])
    var = (t ** 2 * S ** 2 + (1 - t) ** 2).double().reshape(-1, 1, 1, 1)
    exact = -(x - t.double().reshape(-1, 1, 1, 1) * MU) / var
    assert torch.allclose(FLOW.score(x, t, gaussian_velocity(x, t)), exact)


def test_loss_at_the_exact_velocity_is_its_analytic_minimum():
    """E |x1 - x0 - v*(x_t, t)|^2 per value = E_t[(S^2 + 1) - (t S^2 - (1 - t))^2 / Var(x_t)],
    the conditional variance of the target; any other field scores higher."""
    minimum, _ = quad(lambda t: (S ** 2 + 1) - (t * S ** 2 - (1 - t)) ** 2
                      / (t ** 2 * S ** 2 + (1 - t) ** 2), 0, 1)
    g = torch.Generator().manual_seed(0)
    x1 = MU + S * torch.randn(20_000, 1, 4, 4, generator=g, dtype=torch.float64)
    t, x_t, target = FLOW.draw(x1, g)
    at_exact = denoising_loss(gaussian_velocity(x_t, t), target).item()
    assert at_exact == pytest.approx(minimum, rel=0.01)
    assert denoising_loss(1.1 * gaussian_velocity(x_t, t), target).item() > at_exact + 0.005


def _exact_end(seeds) -> torch.Tensor:
    """The exact flow map of Gaussian data: x1 = MU + S x0 for the initial noise x0."""
    return MU + S * ImageNoise(seeds).randn(SHAPE)


def test_heun_is_second_order_euler_first_order():
    """Against the exact end point: Heun's error at least 4x smaller than Euler's at equal
    steps; doubling the steps halves Euler's error and, once past the first coarse grids,
    quarters Heun's."""
    seeds, labels = list(range(4)), torch.zeros(4, dtype=torch.long)
    exact = _exact_end(seeds)
    errors = {"euler": [], "heun": []}
    for steps in (4, 8, 16, 32):
        for name, sampler in (("euler", euler_sample), ("heun", heun_sample)):
            x = sampler(oracle, FLOW, labels, ImageNoise(seeds), SHAPE, steps=steps)
            errors[name].append((x - exact).abs().max().item())
    assert all(h < 0.25 * e for h, e in zip(errors["heun"], errors["euler"])), errors
    for a, b in zip(errors["euler"], errors["euler"][1:]):
        assert 1.6 < a / b < 2.4, errors
    assert 3.5 < errors["heun"][-2] / errors["heun"][-1] < 4.5, errors
    fine = heun_sample(oracle, FLOW, labels, ImageNoise(seeds), SHAPE, steps=50)
    assert torch.allclose(fine, exact, atol=1e-3)
    assert fine.mean().item() == pytest.approx(MU, abs=0.02)
    assert fine.std().item() == pytest.approx(S, rel=0.02)


@pytest.mark.parametrize("last_step_size", [0.04, 0.0])
def test_sde_sampler_reaches_the_data_distribution(last_step_size):
    seeds = list(range(32))
    x = sde_sample(oracle, FLOW, torch.zeros(32, dtype=torch.long), ImageNoise(seeds), SHAPE,
                   steps=250, last_step_size=last_step_size)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(S, rel=0.03)
    # a stochastic sampler: not the ODE's deterministic end point
    assert (x - _exact_end(seeds)).abs().mean().item() > 0.05


def test_guidance_is_the_released_cfg_scale_minus_one():
    model = random_sit()
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        v_c = model(x, t, y)
        v_u = model(x, t, torch.full_like(y, model.null_label))
        guided = guided_model_fn(model, model.null_label, 6.5)(x, t, y)
    assert torch.allclose(guided, v_u + 7.5 * (v_c - v_u), atol=1e-5)  # --cfg-scale 7.5


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_sample_depends_only_on_seed_and_label_not_on_batch(sampler):
    model = random_sit()
    cfg = SampleConfig(sampler=sampler, steps=4, guidance=1.5)
    alone = sample_images(model, FLOW, [3], [42], cfg)
    batch = sample_images(model, FLOW, [0, 1, 3, 4], [7, 8, 42, 9], cfg)
    assert torch.allclose(alone[0], batch[2], atol=1e-4)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)
    # fixed-shape blocks: image 5 of a 4-row block grid is the same requested alone or not
    images = sample_aligned(model, FLOW, cfg, np.array([4, 5]), np.array([1, 2]),
                            np.array([11, 12]), forward_batch=4)
    single = sample_aligned(model, FLOW, cfg, np.array([5]), np.array([2]), np.array([12]),
                            forward_batch=4)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images[1], single[0])


def test_a_ddpm_sampler_is_refused_for_the_flow():
    with pytest.raises(ValueError, match="'ddim' is not a sampler of the flow process"):
        sample_images(random_sit(), FLOW, [0], [0], SampleConfig(sampler="ddim", steps=2))


# -- losses ---------------------------------------------------------------------------------

def _released_info_nce(h: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """uncond_info_nce_1d(h, h, reduction='none') of the released clr.py with the info_nce
    package's math: normalised queries and keys, positive key = the row itself, negatives =
    the other rows, cross-entropy over [positive, negatives] / tau with target 0."""
    q = F.normalize(h.flatten(1), dim=1)
    rows = []
    for i in range(q.shape[0]):
        negatives = torch.cat([q[:i], q[i + 1:]])
        logits = torch.cat([(q[i] * q[i]).sum()[None], negatives @ q[i]]) / temperature
        rows.append(-torch.log_softmax(logits, dim=0)[0])
    return torch.stack(rows)


def _released_ccua(out_c, out_u, h_u, t):
    """transport.py's ccua_ucl_loss and ccua_al_loss, transcribed."""
    ucl = (t * _released_info_nce(h_u)).mean()
    al = (t[:, None, None, None] * F.mse_loss(out_u, out_c, reduction="none")).mean()
    return ucl, al


def test_ccua_on_sit_equals_the_released_formula():
    """label dropout 0 (the released network drops labels inside its forward, which a test
    cannot replay): the terms equal the released code's on the same forward pass."""
    model = random_sit().train()
    B = 16
    g = torch.Generator().manual_seed(3)
    x1, y = torch.randn(B, 3, 16, 16, generator=g), torch.arange(B) % 10
    cfg = LossConfig(method="ccua", ucl_weight=0.05, al_weight=0.05, label_dropout=0.0)
    terms = compute_losses(model, FLOW, x1, y, cfg, generator=torch.Generator().manual_seed(0))
    # replay the draws: t, noise (FlowMatching.draw), then the label dropout
    t, x_t, target = FLOW.draw(x1, torch.Generator().manual_seed(0))
    null = torch.full_like(y, model.null_label)
    out, h = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]),
                   return_features=True)
    out_c, out_u = out.chunk(2)
    ucl, al = _released_ccua(out_c, out_u, h[B:], t)
    assert terms["ucl"].item() == pytest.approx(ucl.item(), rel=1e-4)
    assert terms["al"].item() == pytest.approx(al.item(), rel=1e-4)
    flow = F.mse_loss(out_c, target)
    assert terms["flow"].item() == pytest.approx(flow.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx((flow + 0.05 * ucl + 0.05 * al).item(), rel=1e-5)
    assert set(terms) == {"loss", "flow", "ucl", "al"}


class LabelVelocity(SpyModel):
    """v = the label, everywhere; features = the label one-hot (so every unconditional row
    has the same features). Records every forward."""

    def features(self, x, y):
        return F.one_hot(y, 5).float()


@pytest.mark.parametrize("end", ["data", "noise"])
def test_alignment_weight_follows_the_configured_end(end):
    """v_c = y, v_u = 4: AL = mean_i w(t_i) (y_i - 4)^2 with w = t (data, released) or 1 - t;
    the unconditional features all equal, so s_ij = 1 and UCL = mean_i w(t_i) log B."""
    model, B = LabelVelocity(), 16
    y = torch.arange(B) % 4
    cfg = LossConfig(label_dropout=0.0, flow_weight_end=end)
    terms = compute_losses(model, FLOW, torch.randn(B, 1, 2, 2), y, cfg,
                           generator=torch.Generator().manual_seed(0))
    t = torch.rand(B, generator=torch.Generator().manual_seed(0))
    w = t if end == "data" else 1 - t
    assert terms["al"].item() == pytest.approx((w * (y.float() - 4) ** 2).mean().item(), rel=1e-5)
    assert terms["ucl"].item() == pytest.approx(w.mean().item() * math.log(B), rel=1e-5)


def _released_disp(z: torch.Tensor) -> torch.Tensor:
    """disp_loss of the released transport.py (its .cuda() dropped)."""
    z = z.reshape((z.shape[0], -1))
    diff = F.pdist(z).pow(2) / z.shape[1]
    diff = torch.cat((diff, diff, torch.zeros(z.shape[0])))
    return torch.log(torch.exp(-diff).mean())


def test_dispersive_loss_equals_the_double_loop_and_the_released_code():
    z = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(0))
    flat, D = z.flatten(1), 12
    total = sum(math.exp(-((flat[i] - flat[j]) ** 2).sum().item() / (D * 2.0))
                for i in range(6) for j in range(6))
    assert dispersive_loss(z, temperature=2.0).item() == pytest.approx(math.log(total / 36), rel=1e-5)
    assert dispersive_loss(z).item() == pytest.approx(_released_disp(z).item(), rel=1e-5)
    # identical rows: every exp is 1, the loss its maximum 0; spreading them lowers it
    assert dispersive_loss(torch.ones(4, 5)).item() == pytest.approx(0.0, abs=1e-7)
    zg = z.clone().requires_grad_(True)
    dispersive_loss(zg).backward()
    moved = (z - 0.5 * zg.grad).flatten(1)
    assert F.pdist(moved).min() > F.pdist(flat).min()


def test_diffrop_equals_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    out, y = torch.randn(6, 2, 3, 3, generator=g), torch.tensor([0, 0, 1, 2, 2, 3])
    partner, w = torch.tensor([1, 0, 3, 4, 2, 5]), torch.rand(6, generator=g)
    d = 0.0
    for i in range(6):
        j = int(partner[i])
        if y[i] != y[j]:
            d += w[i].item() * ((out[i] - out[j]) ** 2).mean().item()
    assert diffrop_loss(out, y, partner, w).item() == pytest.approx(1 / (1 + d / 6), rel=1e-5)


def test_dispersive_and_diffrop_methods_on_the_flow():
    B, y = 16, torch.arange(16) % 4
    x1 = torch.randn(B, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    model = LabelVelocity()
    terms = compute_losses(model, FLOW, x1, y, LossConfig(method="diffrop", label_dropout=0.0),
                           generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = torch.rand(B, generator=g)
    torch.randn((B, 1, 2, 2), generator=g)  # noise
    torch.rand(B, generator=g)  # label dropout
    partner = torch.randperm(B, generator=g)
    d = (t * (y[partner] != y).float() * (y - y[partner]).float() ** 2).mean()
    assert terms["diffrop"].item() == pytest.approx(1 / (1 + d.item()), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(
        (terms["flow"] + 0.1 * terms["diffrop"]).item(), rel=1e-6)
    assert len(model.calls) == 1
    model = random_sit().train()
    terms = compute_losses(model, FLOW, torch.randn(8, 3, 16, 16), torch.arange(8),
                           LossConfig(method="dispersive"),
                           generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"loss", "flow", "dispersive"} and terms["dispersive"].item() < 0
    assert terms["loss"].item() == pytest.approx(
        (terms["flow"] + 0.25 * terms["dispersive"]).item(), rel=1e-6)
