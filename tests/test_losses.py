"""Loss terms on small inputs whose values can be worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydiff import losses
from raydiff.config import DiffusionConfig, LossConfig
from raydiff.diffusion import GaussianDiffusion
from raydiff.losses import (
    alignment_loss,
    cbdm_loss,
    compute_losses,
    denoising_loss,
    drop_labels,
    timestep_weight,
    ucl_loss,
)

T = 1000


def test_timestep_weight_is_linear_ramp_cut_at_threshold():
    t = torch.tensor([0, 249, 250, 500, 999])
    assert torch.allclose(timestep_weight(t, T), t / T)
    assert timestep_weight(t, T, t_align=250).tolist() == pytest.approx([0, 0, 0.25, 0.5, 0.999])
    assert timestep_weight(t, T, power=2.0).tolist() == pytest.approx((t / T).pow(2).tolist())


def test_ucl_hand_values():
    tau = 0.1
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # s_12 = 0: l_i = log(1 + exp((0 - 1) / tau))
    assert ucl_loss(orthogonal, torch.ones(2), tau).item() == pytest.approx(math.log1p(math.exp(-10)))
    same = torch.tensor([[1.0, 1.0], [3.0, 3.0]])  # s_12 = 1: l_i = log 2
    assert ucl_loss(same, torch.ones(2), tau).item() == pytest.approx(math.log(2))
    # Three unit vectors 120 degrees apart: s_ij = -1/2, l_i = log(1 + 2 exp(-1.5 / tau)).
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    star = torch.stack([angles.cos(), angles.sin()], dim=1)
    w = torch.tensor([1.0, 0.5, 0.5])
    expected = math.log1p(2 * math.exp(-15)) * w.mean().item()
    assert ucl_loss(star, w, tau).item() == pytest.approx(expected, rel=1e-5)
    # A row of weight 0 is neither an anchor nor a negative: the other two keep one negative
    # each, l = log(1 + exp(-1.5 / tau)), and the sum is divided by all 3 rows.
    w = torch.tensor([1.0, 0.5, 0.0])
    expected = math.log1p(math.exp(-15)) * 1.5 / 3
    assert ucl_loss(star, w, tau).item() == pytest.approx(expected, rel=1e-5)


def test_ucl_equals_cross_entropy_with_self_as_target():
    z = torch.randn(6, 4, 2, 2)
    zn = F.normalize(z.flatten(1), dim=1)
    ce = F.cross_entropy(zn @ zn.T / 0.2, torch.arange(6))
    assert ucl_loss(z, torch.ones(6), 0.2).item() == pytest.approx(ce.item(), rel=1e-5)


def test_ucl_is_invariant_to_permuting_the_batch():
    z, w = torch.randn(8, 16), torch.rand(8)
    perm = torch.randperm(8)
    assert ucl_loss(z[perm], w[perm]).item() == pytest.approx(ucl_loss(z, w).item(), rel=1e-6)


def test_ucl_gradient_pushes_features_apart():
    z = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.0, 0.1], [0.0, 0.0, 1.0]], requires_grad=True)
    ucl_loss(z, torch.ones(3)).backward()
    moved = z.detach() - 0.05 * z.grad
    cos = lambda a: F.cosine_similarity(a[0], a[1], dim=0).item()  # noqa: E731
    assert cos(moved) < cos(z.detach()) - 1e-3


def test_ucl_weight_zero_gives_zero_and_empty_batch_is_zero():
    assert ucl_loss(torch.randn(4, 3), torch.zeros(4)).item() == 0.0
    assert ucl_loss(torch.randn(0, 3), torch.zeros(0)).item() == 0.0


def test_alignment_loss_hand_values_and_zero_for_identical():
    eps_c, eps_u = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    assert alignment_loss(eps_c, eps_u, torch.tensor([0.5, 1.0])).item() == pytest.approx(0.75)
    same = torch.randn(2, 3, 4, 4)
    assert alignment_loss(same, same.clone(), torch.ones(2)).item() == 0.0


def test_denoising_loss_is_mean_squared_error():
    a, b = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 3.0)
    assert denoising_loss(a, b).item() == pytest.approx(9.0)


def test_cbdm_loss_value_and_stop_gradients():
    eps_y = torch.zeros(2, 1, 1, 2, requires_grad=True)
    eps_yp = torch.ones(2, 1, 1, 2, requires_grad=True)
    w = torch.tensor([1.0, 0.5])
    loss = cbdm_loss(eps_y, eps_yp, w)
    # per sample: |0-1|^2 + 1/4 |0-1|^2 = 1.25; mean of w * 1.25 = 0.9375
    assert loss.item() == pytest.approx(0.9375)
    loss.backward()
    # d/d eps_y of w_i * mean(eps_y - sg(eps_y'))^2 / B = w_i * 2 (eps_y - eps_y') / (P B)
    assert torch.allclose(eps_y.grad[:, 0, 0, 0], w * 2 * -1 / (2 * 2))
    # the push term is a quarter as strong and acts on eps_y' only
    assert torch.allclose(eps_yp.grad[:, 0, 0, 0], 0.25 * w * 2 * 1 / (2 * 2))


def test_drop_labels_rate_and_null():
    y = torch.zeros(20000, dtype=torch.long)
    y_in, dropped = drop_labels(y, null_label=10, p=0.1, generator=torch.Generator().manual_seed(0))
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert (y_in[dropped] == 10).all() and (y_in[~dropped] == 0).all()


class SpyModel(nn.Module):
    """eps = a per-label constant; records every forward batch."""

    null_label = 4

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[torch.Tensor] = []

    def features(self, x, y):
        return torch.cat([x.flatten(1), y.float()[:, None]], dim=1)

    def forward(self, x, t, y, return_features=False):
        self.calls.append(y.clone())
        eps = self.scale * y.float().reshape(-1, 1, 1, 1).expand_as(x)
        return (eps, self.features(x, y)) if return_features else eps


def _losses(cfg: LossConfig, B: int = 16, seed: int = 0):
    model = SpyModel()
    diffusion = GaussianDiffusion(DiffusionConfig())
    x0 = torch.randn(B, 1, 2, 2)
    y = torch.arange(B) % 4
    terms = compute_losses(model, diffusion, x0, y, cfg, generator=torch.Generator().manual_seed(seed))
    return model, terms


def test_ccua_runs_one_forward_and_skips_rows_that_need_no_unconditional_pass(monkeypatch):
    cfg = LossConfig(t_align=500, label_dropout=0.3)
    B = 64
    torch.manual_seed(0)  # x0
    model, terms = _losses(cfg, B=B)
    assert len(model.calls) == 1, "conditional and unconditional rows share one forward"
    labels = model.calls[0]
    # replay the draws of compute_losses to know t and the dropped rows
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, T, (B,), generator=g)
    torch.randn((B, 1, 2, 2), generator=g)
    dropped = torch.rand(B, generator=g) < 0.3
    needed = int(((t >= 500) & ~dropped).sum())
    multiple = losses.UNCOND_ROW_MULTIPLE
    assert needed % multiple, "the draw should need padding for this test to mean anything"
    assert labels.shape[0] == B + min(B, -(-needed // multiple) * multiple)
    assert (labels[B:] == SpyModel.null_label).all()
    assert set(terms) == {"loss", "ddpm", "ucl", "al"}
    total = terms["ddpm"] + cfg.ucl_weight * terms["ucl"] + cfg.al_weight * terms["al"]
    assert terms["loss"].item() == pytest.approx(total.item())
    # the padding rows (weight 0) change no term: the same draw without padding
    monkeypatch.setattr(losses, "UNCOND_ROW_MULTIPLE", 1)
    torch.manual_seed(0)
    unpadded_model, unpadded = _losses(cfg, B=B)
    assert unpadded_model.calls[0].shape[0] == B + needed
    for name in terms:
        assert terms[name].item() == pytest.approx(unpadded[name].item(), rel=1e-6, abs=1e-9), name


def test_alignment_is_zero_when_every_label_is_dropped():
    model, terms = _losses(LossConfig(label_dropout=0.99999))
    assert terms["al"].item() == 0.0
    assert model.calls[0].shape[0] == 16  # no unconditional rows were run at all


def test_alignment_matches_hand_value_for_label_dependent_model():
    # eps_c = y, eps_u = null (4) for every pixel: AL = mean_i w(t_i) (y_i - 4)^2 over all rows.
    cfg = LossConfig(label_dropout=0.0)
    _, terms = _losses(cfg)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, T, (16,), generator=g)
    y = torch.arange(16) % 4
    expected = (t.float() / T * (y.float() - 4) ** 2).mean()
    assert terms["al"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_ddpm_and_cbdm_methods_report_their_terms():
    _, ddpm = _losses(LossConfig(method="ddpm"))
    assert set(ddpm) == {"loss", "ddpm"}
    model, cbdm = _losses(LossConfig(method="cbdm", label_dropout=0.0))
    assert set(cbdm) == {"loss", "ddpm", "cbdm"}
    assert model.calls[0].shape[0] == 32  # y and y' in one batch of 2B
    assert cbdm["cbdm"].item() > 0


def test_cbdm_skips_rows_whose_label_was_dropped():
    """Released CBDM adds its regulariser only when the labels were kept (y_l is not None)."""
    model, terms = _losses(LossConfig(method="cbdm", label_dropout=0.99999))
    assert (model.calls[0][:16] == SpyModel.null_label).all()
    assert terms["cbdm"].item() == 0.0 and terms["ddpm"].item() > 0
    # Some rows dropped: the term is the mean over all rows of the kept rows' regulariser.
    cfg = LossConfig(method="cbdm", label_dropout=0.5)
    model, terms = _losses(cfg)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, T, (16,), generator=g)
    torch.randn((16, 1, 2, 2), generator=g)
    dropped = torch.rand(16, generator=g) < 0.5
    assert 0 < int(dropped.sum()) < 16
    y_in, y_prime = model.calls[0][:16].float(), model.calls[0][16:].float()
    per_row = 1.25 * (y_in - y_prime) ** 2  # SpyModel: eps = label everywhere
    expected = (t.float() / T * per_row * (~dropped).float()).mean()
    assert terms["cbdm"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_alpha_and_gamma_zero_is_plain_ddpm():
    model, terms = _losses(LossConfig(ucl_weight=0.0, al_weight=0.0))
    assert set(terms) == {"loss", "ddpm"} and model.calls[0].shape[0] == 16
