"""Presets, typed overrides, JSON round trip and the errors users see."""

import json

import pytest

from raydiff import config as config_lib
from raydiff.cli import main
from raydiff.errors import RaydiffError


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    cfg = config_lib.preset(name)
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert config_lib.load_json(path) == cfg


def test_overrides_are_typed():
    cfg = config_lib.resolve("tiny", overrides=[
        "loss.t_align=250", "loss.ucl_weight=0.05", "train.hflip=false",
        "model.ch_mult=1,2", "loss.method=cbdm", "sample.compile=true"])
    assert cfg.loss.t_align == 250 and isinstance(cfg.loss.t_align, int)
    assert cfg.loss.ucl_weight == 0.05 and cfg.train.hflip is False
    assert cfg.sample.compile is True
    assert cfg.model.ch_mult == (1, 2) and cfg.loss.method == "cbdm"
    assert cfg.preset == "tiny"


def test_cifar32_preset_is_the_released_recipe():
    cfg = config_lib.preset("cifar32")
    assert (cfg.model.ch, cfg.model.ch_mult, cfg.model.attn_resolutions) == (128, (1, 2, 2, 2), (16,))
    assert (cfg.model.num_res_blocks, cfg.model.dropout) == (2, 0.1)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip) == (2e-4, 5000, 1.0)
    assert cfg.optim.ema_decay == 0.9999 and cfg.loss.temperature == 0.1
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance) == ("ddim", 100, 1.5)
    # the released main.py defaults, which its CIFAR-LT runs use: batch 64, 300k steps, no BRS
    assert (cfg.optim.batch_size, cfg.optim.total_steps) == (64, 300_000)
    assert cfg.train.resample_factor == 0.0 and cfg.loss.ucl_group_size == 32
    assert cfg.sample.ddim_last_step == "x0"


def test_imagenet64_preset_is_the_released_tinyimagenet_script():
    cfg = config_lib.preset("imagenet64")
    # ccua-brs_200k.sh: --img_size 64 --num_class 200 --batch_size 128 --total_steps 100001
    # --brs --brs_factor 0.1 --ccua_ucl 1.0 --ccua_al 1.0, DataParallel over 4 GPUs
    assert (cfg.model.resolution, cfg.model.num_classes) == (64, 200)
    assert cfg.model.attn_resolutions == (32,)  # --attn 1: level 1 of (1, 2, 2, 2) at 64 px
    assert (cfg.optim.batch_size, cfg.optim.total_steps) == (128, 100_000)
    assert cfg.train.resample_factor == 0.1
    assert (cfg.loss.ucl_weight, cfg.loss.al_weight, cfg.loss.ucl_group_size) == (1.0, 1.0, 32)


@pytest.mark.parametrize("override,message", [
    ("model.chh=3", "unknown config key 'model.chh': model has backbone, resolution"),
    ("modle.ch=3", "unknown config key 'modle.ch'"),
    ("optim.lr=fast", "config optim.lr='fast' is invalid: expected a number"),
    ("loss.t_align=0.5", "config loss.t_align='0.5' is invalid: expected an integer"),
    ("train.hflip=maybe", "expected true or false"),
    ("loss.method=gan", "config loss.method='gan' is invalid: expected one of ddpm, cbdm, ccua"),
    ("loss.t_align=1000", "loss.t_align=1000 is invalid"),
    ("model.resolution=34", "model.resolution=34 is invalid: expected divisible by 2^2"),
    ("noequals", "not of the form section.key=value"),
    ("loss.ucl_group_size=1", "loss.ucl_group_size=1 is invalid: expected >= 2"),
    ("sample.ddim_last_step=noisy", "expected x0 or identity"),
    ("sample.compile=maybe", "config sample.compile='maybe' is invalid: expected true or false"),
])
def test_bad_overrides_name_key_and_value(override, message):
    with pytest.raises(RaydiffError) as err:
        config_lib.resolve("tiny", overrides=[override])
    assert message in str(err.value)


def test_config_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n "loss": {"t_align": 10,}\n}')
    with pytest.raises(RaydiffError, match=r"bad.json line 2"):
        config_lib.load_json(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"loss": {"alpha": 1}}))
    with pytest.raises(RaydiffError, match="unknown config key 'loss.alpha'"):
        config_lib.load_json(unknown)
    with pytest.raises(RaydiffError, match="does not exist"):
        config_lib.load_json(tmp_path / "none.json")


def test_sample_compile_is_off_unless_asked_for_and_typed_in_json():
    # checkpoints saved before the key existed have no sample.compile: they sample eagerly
    data = config_lib.preset("tiny").to_dict()
    del data["sample"]["compile"]
    assert config_lib.from_dict(data).sample.compile is False
    assert not any(config_lib.preset(name).sample.compile for name in config_lib.PRESETS)
    data["sample"]["compile"] = "true"
    with pytest.raises(RaydiffError, match="sample.compile='true' is invalid: expected true or "
                                           "false, not a string"):
        config_lib.from_dict(data)


def test_cli_prints_resolved_config(capsys):
    assert main(["config", "--preset", "cifar32", "--method", "ddpm",
                 "--set", "loss.t_align=250"]) == 0
    cfg = config_lib.from_dict(json.loads(capsys.readouterr().out))
    assert cfg.loss.method == "ddpm" and cfg.loss.t_align == 250 and cfg.preset == "cifar32"


def test_cli_reports_bad_override_as_one_line(capsys):
    assert main(["config", "--set", "optim.lr=fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["raydiff: error: config optim.lr='fast' is invalid: expected a number"]
