"""Network shapes, the training step, EMA and checkpoints, on CPU without Ray."""

import dataclasses
import math
import pickle

import pytest
import torch

from raydiff import config as config_lib
from raydiff.checkpoint import load_checkpoint, resolve_checkpoint
from raydiff.engine import EMA, Engine, NonFiniteLossError, load_for_sampling, warmup_factor
from raydiff.errors import RaydiffError
from raydiff.samplers import sample_images
from raydiff.unet import AttnBlock, UNet, build_model, count_parameters


def tiny(*overrides: str) -> config_lib.Config:
    return config_lib.resolve("tiny", overrides=list(overrides))


def test_cifar32_network_has_the_paper_size():
    # METHOD.md: about 35.9 M parameters for 32x32 with 10 classes. Ours: 35,751,939 (the
    # unconditional pytorch-ddpm UNet is 35.75 M; the label table adds 11 x 512).
    n = count_parameters(build_model(config_lib.preset("cifar32").model))
    assert n == 35_751_939
    assert abs(n - 35.9e6) / 35.9e6 < 0.01


@pytest.mark.parametrize("name,bottleneck", [("tiny", (64, 4, 4)), ("cifar32", (256, 4, 4)),
                                             ("imagenet64", (256, 8, 8))])
def test_presets_predict_eps_and_return_bottleneck(name, bottleneck):
    cfg = config_lib.preset(name).model
    model = build_model(cfg)
    x = torch.randn(2, 3, cfg.resolution, cfg.resolution)
    eps, z = model(x, torch.tensor([0, 999]), torch.tensor([0, cfg.num_classes]),
                   return_features=True)
    assert eps.shape == x.shape and tuple(z.shape[1:]) == bottleneck


@pytest.mark.parametrize("name,sides", [("cifar32", [16, 16, 4, 16, 16, 16]),
                                        ("imagenet64", [32, 32, 8, 32, 32, 32])])
def test_presets_put_attention_at_the_released_level(name, sides):
    """Released --attn 1: level 1 of ch_mult (1, 2, 2, 2), 16x16 at 32 px and 32x32 at 64 px
    (2 blocks down, 3 up), plus the first middle block. Width cut to 32 to keep it fast."""
    model = build_model(dataclasses.replace(config_lib.preset(name).model, ch=32))
    seen = []
    for module in model.modules():
        if isinstance(module, AttnBlock):
            module.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[-1]))
    res = model.cfg.resolution
    model(torch.randn(1, 3, res, res), torch.tensor([5]), torch.tensor([0]))
    assert sorted(seen) == sorted(sides)


def test_attention_init_is_the_released_one():
    """Released: q, k, v are three (C, C) Xavier-initialised convs, and the output projection
    keeps gain 1 (the enclosing ResBlock re-initialises it)."""
    model = build_model(config_lib.preset("tiny").model)
    blocks = [m for m in model.modules() if isinstance(m, AttnBlock)]
    assert blocks
    for block in blocks:
        ch = block.proj.weight.shape[0]
        bound = math.sqrt(6 / (2 * ch))  # Xavier uniform bound of a (C, C) 1x1 conv, gain 1
        for w in [*block.qkv.weight.chunk(3), block.proj.weight]:
            assert bound * 0.9 < w.abs().max().item() <= bound
        assert block.proj.bias.abs().max().item() == 0.0


def test_null_label_is_a_learned_embedding_distinct_from_classes():
    model = build_model(tiny().model)
    assert model.label_emb.num_embeddings == model.cfg.num_classes + 1
    assert model.null_label == model.cfg.num_classes


def test_warmup_is_linear_then_constant():
    assert [warmup_factor(s, 10) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_ema_update_formula():
    model = build_model(tiny().model)
    ema = EMA(model, decay=0.9)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for p_ema, p0, p in zip(ema.model.parameters(), before, model.parameters()):
        assert torch.allclose(p_ema, 0.9 * p0 + 0.1 * p)
    assert not any(p.requires_grad for p in ema.model.parameters())


def _fixed_batch(n=8, res=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, res, res, generator=g) * 2 - 1, torch.arange(n) % 4


@pytest.mark.parametrize("method", ["ddpm", "ccua"])
def test_tiny_preset_overfits_a_few_images(method):
    engine = Engine(tiny("optim.warmup_steps=5", f"loss.method={method}"))
    x, y = _fixed_batch()
    losses = [float(engine.train_step(x, y)["ddpm"]) for _ in range(80)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_checkpoint_round_trip_is_exact_and_resumes_identically(tmp_path):
    cfg = tiny("optim.warmup_steps=2", "loss.t_align=300")
    x, y = _fixed_batch()
    a = Engine(cfg)
    for _ in range(3):
        a.train_step(x, y)
    a.save(tmp_path / "checkpoint_000003")
    b = Engine(cfg)
    b.load(tmp_path / "checkpoint_000003")
    assert b.step == 3
    for name, t in a.model.state_dict().items():
        assert torch.equal(t, b.model.state_dict()[name]), name
    for name, t in a.ema.model.state_dict().items():
        assert torch.equal(t, b.ema.model.state_dict()[name]), name
    # the next step draws the same noise and lands on the same weights
    out_a, out_b = a.train_step(x, y), b.train_step(x, y)
    assert out_a.keys() == out_b.keys()
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert resolve_checkpoint(tmp_path, "state.json") == str(tmp_path / "checkpoint_000003")


def test_checkpoint_loads_into_sampler(tmp_path):
    engine = Engine(tiny())
    engine.save(tmp_path / "ck")
    model, cfg = load_for_sampling(tmp_path / "ck")
    assert not model.training and cfg == engine.cfg
    images = sample_images(model, engine.diffusion, [0, 1], [0, 1],
                           config_lib.SampleConfig(steps=3))
    assert images.shape == (2, 3, 16, 16)


def test_loading_into_another_network_is_refused(tmp_path):
    Engine(tiny()).save(tmp_path / "ck")
    other = Engine(tiny("model.ch=64", "model.num_classes=7"))
    expected = r"num_classes: checkpoint 10, requested 7; model\.ch: checkpoint 32, requested 64"
    with pytest.raises(RaydiffError, match=expected):
        other.load(tmp_path / "ck")


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(RaydiffError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RaydiffError, match="not a raydiff checkpoint: missing config.json"):
        load_checkpoint(tmp_path / "empty")


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_optimizer_file_with_code_is_never_unpickled(tmp_path, capsys):
    Engine(tiny()).save(tmp_path / "ck")
    (tmp_path / "ck" / "optimizer.pt").write_bytes(pickle.dumps({"state": _Exploit()}))
    with pytest.raises(RaydiffError, match="refused"):
        load_checkpoint(tmp_path / "ck")
    assert "must never run" not in capsys.readouterr().out


def _state(engine: Engine) -> list[torch.Tensor]:
    optim = [t for st in engine.optimizer.state.values() for t in st.values()]
    return [t.clone() for t in [*engine.model.parameters(), *engine.ema.model.parameters(),
                                *optim]]


def test_non_finite_step_changes_nothing_and_collect_names_it():
    engine = Engine(tiny())
    x, y = _fixed_batch()
    engine.train_step(x, y)
    before = _state(engine)
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    out = engine.train_step(poisoned, y)  # no exception, no host sync: the step is skipped
    assert engine.step == 2 and not torch.isfinite(out["ddpm"])
    after = _state(engine)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), \
        "a non-finite step reached the weights, the EMA or the optimiser state"
    engine.train_step(x, y)  # a finite step after it is applied
    assert not torch.equal(before[0], next(engine.model.parameters()))
    with pytest.raises(NonFiniteLossError, match=r"at step 2: .*ddpm=nan"):
        engine.collect()
    engine.train_step(x, y)  # the record starts again after a collect
    assert set(engine.collect()) >= {"ddpm", "loss", "grad_norm", "lr"}


def test_collect_is_the_mean_of_the_steps_since_the_last():
    engine = Engine(tiny("optim.warmup_steps=4"))
    x, y = _fixed_batch()
    outs = [engine.train_step(x, y) for _ in range(3)]
    means = engine.collect()
    for name in ("loss", "ddpm", "grad_norm"):
        assert means[name] == pytest.approx(sum(float(o[name]) for o in outs) / 3, rel=1e-6)
    assert means["lr"] == pytest.approx(engine.cfg.optim.lr * (0 + 1 + 2) / 4 / 3)
    with pytest.raises(RuntimeError, match="before any train_step"):
        engine.collect()


def test_model_is_plain_unet_without_wrapper():
    assert isinstance(Engine(tiny()).net, UNet)


@pytest.mark.slow  # inductor's first compile of even a one-level UNet takes ~30 s on 2 cores
def test_compiled_training_equals_eager_within_1e_5(tmp_path):
    """``train.compile``: the network is run through ``torch.compile`` (inductor, the default
    backend, generating C++ on the CPU) and trains like the eager network: after one CCUA step
    the weights agree within 1e-5, and the terms of three steps within 1e-5. (Later weights
    are not compared: Adam divides by the root of near-zero second moments, which turns float
    reassociation in near-zero gradients into differences of up to the learning rate.) The
    checkpoint holds the plain network."""
    small = ["model.ch_mult=[1]", "model.attn_resolutions=[]", "model.resolution=8",
             "loss.method=ccua", "optim.warmup_steps=0"]
    eager, compiled = Engine(tiny(*small)), Engine(tiny(*small, "train.compile=true"))
    assert type(compiled.net).__name__ == "OptimizedModule" and eager.net is eager.model
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1, torch.arange(8) % 4
    for step in range(3):
        out_e, out_c = eager.train_step(x, y), compiled.train_step(x, y)
        for name in ("loss", "ddpm", "ucl", "grad_norm"):
            assert float(out_c[name]) == pytest.approx(float(out_e[name]), abs=1e-5), name
        if step == 0:
            for (name, p_e), p_c in zip(eager.model.named_parameters(),
                                        compiled.model.parameters()):
                assert torch.allclose(p_e, p_c, atol=1e-5, rtol=0), name
    compiled.save(tmp_path / "ck")
    model, _ = load_for_sampling(tmp_path / "ck")
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())


@pytest.mark.parametrize("method", ["ddpm", "ccua"])
def test_bf16_steps_train_and_ucl_stays_float32(method):
    """``train.bf16``: every method's step runs under bf16 autocast (CPU here, as on a GPU),
    its terms finite; UCL's similarities are computed in float32 inside it, so its value
    equals the float32 computation on the same features."""
    engine = Engine(tiny("train.bf16=true", f"loss.method={method}"))
    x, y = _fixed_batch()
    for _ in range(3):
        out = engine.train_step(x, y)
    assert all(torch.isfinite(v) for v in out.values()) and engine.collect()["loss"] > 0
    from raydiff.losses import ucl_loss

    z = torch.randn(16, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    w = torch.rand(16, generator=torch.Generator().manual_seed(1)) + 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ucl_loss(z, w, 0.1, 8)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, ucl_loss(z, w, 0.1, 8))
