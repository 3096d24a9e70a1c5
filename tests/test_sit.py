"""SiT: shapes, the null label, the features the regularisers read, the released layout;
the engine training, saving and sampling it."""

import copy

import numpy as np
import pytest
import torch

from raydiff import config as config_lib
from raydiff.diffusion import make_process
from raydiff.engine import Engine, load_for_sampling
from raydiff.errors import RaydiffError
from raydiff.networks import build_model, count_parameters
from raydiff.samplers import sample_images
from raydiff.sit import SiT, sincos_pos_embed
from raydiff.unet import UNet
from raydiff.unet import build_model as build_model_from_unet


def sit_tiny(*overrides: str) -> config_lib.Config:
    return config_lib.resolve("sit-tiny", overrides=list(overrides))


def random_sit(cfg: config_lib.ModelConfig | None = None) -> SiT:
    """A SiT whose zero-initialised gates and output are perturbed: a fresh one outputs 0."""
    torch.manual_seed(0)
    model = build_model(cfg or sit_tiny().model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_backbone_dispatch_from_both_entry_points():
    cfg = sit_tiny().model
    assert isinstance(build_model(cfg), SiT) and isinstance(build_model_from_unet(cfg), SiT)
    assert isinstance(build_model(config_lib.preset("tiny").model), UNet)


def test_shapes_null_label_and_zero_initial_output():
    cfg = sit_tiny().model
    model = build_model(cfg)
    assert model.null_label == cfg.num_classes == 10 and model.cfg is cfg
    assert model.y_embedder.num_embeddings == cfg.num_classes + 1
    x = torch.randn(3, cfg.in_channels, cfg.resolution, cfg.resolution)
    t, y = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0, 9, cfg.num_classes])
    out = model(x, t, y)
    assert out.shape == x.shape
    # adaLN-Zero: every gate and the output layer start at 0, so the network outputs 0
    assert out.abs().max().item() == 0.0


def test_features_are_the_released_blocks():
    """UCL reads act[len(act) // 4] (the tokens after block depth // 4, 0-based), Dispersive
    act[-1] (the last block's tokens), as the released training_losses indexes them."""
    cfg = sit_tiny("model.depth=8").model
    model = random_sit(cfg)
    acts = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, inp, out: acts.append(out))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.7]), torch.tensor([1, 10])
    out, z_ucl = model(x, t, y, return_features=True)
    assert len(acts) == 8 and torch.equal(z_ucl, acts[len(acts) // 4])  # block index 2
    acts.clear()
    out2, z_last = model(x, t, y, return_features="dispersive")
    assert torch.equal(z_last, acts[-1]) and torch.equal(out, out2)
    tokens = (cfg.resolution // cfg.patch_size) ** 2
    assert z_ucl.shape == z_last.shape == (2, tokens, cfg.hidden_size)
    with pytest.raises(ValueError, match="return_features"):
        model(x, t, y, return_features="bottleneck")


def test_label_and_null_label_change_the_output():
    model = random_sit()
    x, t = torch.randn(1, 3, 16, 16).expand(3, -1, -1, -1), torch.full((3,), 0.4)
    out = model(x, t, torch.tensor([2, 5, model.null_label]))
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[0] - out[2]).abs().max() > 1e-3


def _dit_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """The released get_2d_sincos_pos_embed (MAE / DiT), transcribed."""
    def from_grid_1d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([from_grid_1d(embed_dim // 2, grid[0]),
                           from_grid_1d(embed_dim // 2, grid[1])], axis=1)


def test_positions_and_unpatchify_match_the_released_layout():
    assert np.array_equal(sincos_pos_embed(16, 4), _dit_pos_embed(16, 4))
    model = build_model(sit_tiny().model)
    assert torch.allclose(model.pos_embed[0], torch.from_numpy(_dit_pos_embed(64, 8)).float())
    # DiT's patchify order (tokens row-major, each token p x p x C) inverted by unpatchify
    x = torch.randn(2, 3, 16, 16)
    p, g = 2, 8
    tokens = torch.einsum("nchpwq->nhwpqc", x.reshape(2, 3, g, p, g, p)).reshape(2, g * g, p * p * 3)
    assert torch.equal(model.unpatchify(tokens), x)


def test_sit_s2_has_the_released_size():
    """SiT-S/2 on 32x32x4 latents with 1000 classes: 12 blocks of 18 D^2 + 15 D parameters,
    embeddings and the final layer. The released network also has learn_sigma's unused
    second half of the output layer (D p^2 C + p^2 C = 6,160): with it, DiT's 33.0 M."""
    cfg = config_lib.preset("sit-s2-imagenet-lt-256").model
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (12, 384, 6, 2)
    D, p, C, K = 384, 2, 4, 1000
    expected = (C * p * p * D + D) + (256 * D + D + D * D + D) + (K + 1) * D \
        + 12 * (18 * D * D + 15 * D) + (2 * D * D + 2 * D + D * p * p * C + p * p * C)
    n = count_parameters(build_model(cfg))
    assert n == expected
    assert abs(n + D * p * p * C + p * p * C - 33.0e6) / 33.0e6 < 0.005


@pytest.mark.parametrize("preset,depth,hidden,heads,millions", [
    ("sit-b2-imagenet-lt-256", 12, 768, 12, 130),
    ("sit-l2-imagenet-lt-256", 24, 1024, 16, 458),
    ("sit-xl2-imagenet-lt-256", 28, 1152, 16, 675)])
def test_larger_sit_presets_have_dits_sizes_and_the_released_recipe(preset, depth, hidden, heads,
                                                                    millions):
    """B/2, L/2 and XL/2 (DiT's Table 1, SiT's networks): their parameter counts, with
    learn_sigma's unused output half, are the published ones (in millions, as rounded there;
    S/2's 33 M is checked above); every other setting is the released S/2 run's."""
    cfg, s2 = config_lib.preset(preset), config_lib.preset("sit-s2-imagenet-lt-256")
    m = cfg.model
    assert (m.depth, m.hidden_size, m.num_heads, m.patch_size) == (depth, hidden, heads, 2)
    with torch.device("meta"):  # shapes only: XL/2's 675 M weights are never allocated
        n = count_parameters(build_model(m)) + hidden * 2 * 2 * 4 + 2 * 2 * 4
    assert round(n / 1e6) == millions, n
    assert cfg.preset == preset
    same = ("depth", "hidden_size", "num_heads")
    assert {k: v for k, v in cfg.model.__dict__.items() if k not in same} == {
        k: v for k, v in s2.model.__dict__.items() if k not in same}
    assert (cfg.diffusion, cfg.loss, cfg.optim, cfg.sample, cfg.train, cfg.latent) == (
        s2.diffusion, s2.loss, s2.optim, s2.sample, s2.train, s2.latent)


def test_sit_s2_preset_is_the_released_run():
    """ccua_N-4_brs0_1_160epoch.sh + train.py: SiT-S/2 on 32x32x4 latents, batch 48 on 4
    GPUs (UCL over one GPU's 12 rows), CCUA 0.05 / 0.05 with the data-end weight, BRS 0.1,
    AdamW 1e-4 without decay, EMA 0.9999; 160 epochs of the released ImageNet-LT come to the
    step in the released checkpoint's name (..._0160_917600.pt)."""
    cfg = config_lib.preset("sit-s2-imagenet-lt-256")
    m, lo, o = cfg.model, cfg.loss, cfg.optim
    assert (m.backbone, m.in_channels, m.resolution, m.num_classes) == ("sit", 4, 32, 1000)
    assert cfg.diffusion.process == "flow"
    assert (lo.method, lo.ucl_weight, lo.al_weight, lo.flow_weight_end) == ("ccua", 0.05, 0.05,
                                                                              "data")
    assert (lo.ucl_group_size, lo.label_dropout, lo.temperature) == (12, 0.1, 0.1)
    assert (o.optimizer, o.lr, o.weight_decay, o.ema_decay) == ("adamw", 1e-4, 0.0, 0.9999)
    assert (o.warmup_steps, o.grad_clip, o.batch_size) == (0, 0.0, 48)
    assert o.total_steps == 917_600 and cfg.train.resample_factor == 0.1
    # the released sample script's --cfg-scale 7.5 in raydiff's convention
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance) == ("heun", 50, 6.5)


@pytest.mark.parametrize("override,key", [
    (["model.hidden_size=66"], "model.hidden_size"),
    (["model.resolution=15"], "model.resolution"),
    (["sample.sampler=ddim"], "sample.sampler"),
    (["loss.t_align=10"], "loss.t_align"),
    (["loss.flow_weight_end=middle"], "loss.flow_weight_end"),
    (["diffusion.prediction=v"], "diffusion.prediction"),
    (["loss.dispersive_temperature=0"], "loss.dispersive_temperature"),
    (["model.backbone=vit"], "model.backbone"),
    (["diffusion.process=edm"], "diffusion.process"),
])
def test_bad_sit_and_flow_settings_name_key_and_value(override, key):
    with pytest.raises(RaydiffError, match=rf"config {key}=.* is invalid"):
        sit_tiny(*override)


def test_ddpm_samplers_are_refused_under_flow_and_flow_samplers_under_ddpm():
    with pytest.raises(RaydiffError, match=r"sample.sampler='heun' is invalid: expected ddim or ddpm"):
        config_lib.resolve("tiny", overrides=["sample.sampler=heun"])
    cfg = config_lib.resolve("tiny", overrides=["diffusion.process=flow", "sample.sampler=sde"])
    assert cfg.model.backbone == "unet"  # a UNet under flow matching is allowed


# -- the engine on SiT ---------------------------------------------------------------------

def _batch(n=8, res=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, res, res, generator=g) * 2 - 1, torch.arange(n) % 4


TERMS = {"ddpm": set(), "ccua": {"ucl", "al"}, "cbdm": {"cbdm"}, "dispersive": {"dispersive"},
         "diffrop": {"diffrop"}}


@pytest.mark.parametrize("method", list(TERMS))
def test_engine_trains_a_sit_step_for_each_method(method):
    engine = Engine(sit_tiny(f"loss.method={method}", "optim.warmup_steps=0"))
    before = [p.clone() for p in engine.model.parameters()]
    x, y = _batch()
    out = engine.train_step(x, y)
    assert set(out) == {"loss", "flow", "grad_norm"} | TERMS[method]
    assert all(torch.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))


@pytest.mark.parametrize("preset,overrides,term", [
    ("tiny", ["diffusion.process=flow", "sample.sampler=euler", "loss.method=ccua"], "flow"),
    ("tiny", ["loss.method=dispersive"], "ddpm"),
    ("tiny", ["loss.method=diffrop"], "ddpm"),
    ("sit-tiny", ["diffusion.process=ddpm", "sample.sampler=ddim"], "ddpm"),  # DiT
])
def test_other_backbone_process_pairs_train(preset, overrides, term):
    engine = Engine(config_lib.resolve(preset, overrides=overrides))
    out = engine.train_step(*_batch())
    assert term in out and all(torch.isfinite(v) for v in out.values())


def test_sit_learns_and_its_checkpoint_round_trips(tmp_path):
    cfg = sit_tiny("optim.warmup_steps=5", "loss.method=ccua", "optim.ema_decay=0.9")
    engine = Engine(cfg)
    x, y = _batch()
    losses = [float(engine.train_step(x, y)["flow"]) for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    engine.save(tmp_path / "ck")
    ema_at_save = copy.deepcopy(engine.ema.model).eval()
    resumed = Engine(cfg)
    resumed.load(tmp_path / "ck")
    assert resumed.step == 40
    for name, t in engine.ema.model.state_dict().items():
        assert torch.equal(t, resumed.ema.model.state_dict()[name]), name
    assert all(torch.equal(a, b) for a, b in zip(engine.train_step(x, y).values(),
                                                 resumed.train_step(x, y).values()))
    model, loaded = load_for_sampling(tmp_path / "ck")
    assert isinstance(model, SiT) and loaded == cfg and not model.training
    sample_cfg = config_lib.SampleConfig(sampler="heun", steps=3)
    images = sample_images(model, make_process(loaded.diffusion), [0, 1], [0, 1], sample_cfg)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    reference = sample_images(ema_at_save, make_process(cfg.diffusion), [0, 1], [0, 1],
                              sample_cfg)
    assert torch.equal(images, reference)  # the EMA weights, loaded without loss
