"""``raydiff sample`` on the session's Ray: byte-identical output whatever the actors and batch
size and whoever writes the shards, resume after a kill, exports, compiled sampling, and one
clear line for each bad input.

Tiny checkpoint (4 classes, 16 px), DDIM with few steps, a dozen images per run.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raydiff import cli
from raydiff.data.samples import finished_shards, load_manifest, npz_name, read_samples, shard_name
from raydiff.diffusion import GaussianDiffusion
from raydiff.distributed.sample import (
    SampleActor,
    SampleJob,
    ShardActor,
    prepare_run,
    run_sampling,
    run_samplings,
    shard_spec,
)
from raydiff.engine import Engine, load_for_sampling, open_for_sampling
from raydiff.errors import RaydiffError
from raydiff.samplers import sample_aligned, sample_images

FAST = {"per_class": 3, "forward_batch": 4, "shard_size": 8}  # 12 images, 2 shards


def shard_images(out: Path) -> list[bytes]:
    """Every PNG of a sample folder, in index order (one list across shards)."""
    table = pq.read_table(sorted((out / "shards").glob("shard-*.parquet")))
    assert table.column("index").to_pylist() == list(range(table.num_rows))
    return table.column("image").to_pylist()


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


def manifest_without_time(out: Path) -> dict:
    return {k: v for k, v in load_manifest(out).items() if k != "created"}


def test_sample_aligned_does_not_depend_on_how_rows_are_grouped(tiny_checkpoint):
    model, cfg = load_for_sampling(tiny_checkpoint)
    diffusion = GaussianDiffusion(cfg.diffusion)
    indices = np.arange(10)
    labels, seeds = indices % 4, 1000 + indices

    def run(rows):
        return sample_aligned(model, diffusion, cfg.sample, indices[rows], labels[rows],
                              seeds[rows], forward_batch=4)

    whole = run(np.arange(10))
    pieces = np.concatenate([run(np.arange(0, 3)), run(np.arange(3, 7)), run(np.arange(7, 10))])
    shuffled = run(np.arange(10)[::-1])[::-1]
    assert whole.dtype == np.uint8 and whole.shape == (10, 16, 16, 3)
    np.testing.assert_array_equal(whole, pieces)
    np.testing.assert_array_equal(whole, shuffled)


@pytest.fixture(scope="module")
def one_actor_run(ray_local, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "one-actor"
    result = run_sampling(SampleJob(checkpoint=str(tiny_checkpoint), out=str(out), actors=1,
                                    batch_size=4, **FAST))
    assert (result.shards_sampled, result.shards_kept) == (2, 0)
    return out


def test_one_and_two_actors_and_two_batch_sizes_give_identical_bytes(
        ray_local, tiny_checkpoint, one_actor_run, tmp_path):
    # The actors write the shards (one_actor_run: one actor, one shard per call). Two actors
    # with batch 6 (still one shard per call) must write the same files, byte for byte, as
    # must the driver-side writer this replaced, with the same batch 6: not a multiple of the
    # forward batch, so Ray's batches cut blocks, which padding must absorb.
    # ... and beside another run in the same pass (a study samples its runs so): each run's
    # shards are what it samples alone, whichever network an actor held before
    from raydiff import config as config_lib

    other = Engine(config_lib.resolve("tiny", overrides=[
        "model.num_classes=4", "sample.steps=3", "train.seed=7"])).save(
        tmp_path / "other" / "checkpoint_000000000")
    two, beside = tmp_path / "two-actors", tmp_path / "other-samples"
    with pytest.raises(RaydiffError, match="in one pass: they must share actors"):
        run_samplings([SampleJob(checkpoint=str(other), out=str(beside), **FAST),
                       SampleJob(checkpoint=str(other), out=str(two), actors=2, **FAST)])
    with pytest.raises(RaydiffError, match="two sampling requests would write to one folder"):
        run_samplings([SampleJob(checkpoint=str(other), out=str(two), **FAST),
                       SampleJob(checkpoint=str(tiny_checkpoint), out=str(two), **FAST)])
    assert not two.exists()
    run_samplings([SampleJob(checkpoint=str(other), out=str(beside), actors=2, batch_size=6,
                             **FAST),
                   SampleJob(checkpoint=str(tiny_checkpoint), out=str(two), actors=2,
                             batch_size=6, **FAST)])
    driver = tmp_path / "driver-writes"
    run_sampling(SampleJob(checkpoint=str(tiny_checkpoint), out=str(driver), actors=2,
                           batch_size=6, write_in_actors=False, **FAST))
    expected = shard_files(one_actor_run)
    assert list(expected) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert shard_files(two) == expected and shard_files(driver) == expected
    assert manifest_without_time(two) == manifest_without_time(driver)
    assert shard_images(two) == shard_images(one_actor_run)

    # both shards in one actor call (--actor-batch 16), in this process: the same files, and
    # the driver gets a row per shard, no images
    run = prepare_run(SampleJob(checkpoint=str(tiny_checkpoint), out=str(tmp_path / "x"),
                                batch_size=16, **FAST))
    assert run.shards_per_call == 2
    in_one_call = tmp_path / "one-call"
    actor = ShardActor([{**shard_spec(run), "out": str(in_one_call)}])
    rows = actor({"run": np.array([0, 0]), "shard": np.array([1, 0])})
    assert {k: v.tolist() for k, v in rows.items()} == {
        "run": [0, 0], "shard": [1, 0], "images": [4, 8],
        "bytes": [len(expected["shard-00001.parquet"]), len(expected["shard-00000.parquet"])]}
    assert shard_files(in_one_call) == expected

    images, labels, seeds = read_samples(two)
    assert labels.tolist() == [0, 1, 2, 3] * 3 and seeds.tolist() == list(range(12))
    model, cfg = load_for_sampling(tiny_checkpoint)
    in_process = sample_aligned(model, GaussianDiffusion(cfg.diffusion), cfg.sample,
                                np.arange(12), labels, seeds, forward_batch=4)
    np.testing.assert_array_equal(images, in_process)
    beside_images, beside_labels, beside_seeds = read_samples(beside)
    model, cfg = load_for_sampling(other)
    np.testing.assert_array_equal(beside_images, sample_aligned(
        model, GaussianDiffusion(cfg.diffusion), cfg.sample, np.arange(12), beside_labels,
        beside_seeds, forward_batch=4))
    assert not np.array_equal(beside_images, images)
    assert load_manifest(beside)["identity"]["sampler"]["steps"] == 3

    manifest = load_manifest(two)
    assert manifest["complete"] and manifest["num_images"] == 12
    assert manifest["class_counts"] == {"0": 3, "1": 3, "2": 3, "3": 3}
    assert manifest["identity"]["sampler"] == {"sampler": "ddim", "steps": 4, "eta": 0.0,
                                               "guidance": 1.5, "clip_x0": True,
                                               "ddim_last_step": "x0"}
    assert len(manifest["identity"]["checkpoint_ema_sha256"]) == 64


def test_a_sit_checkpoint_samples_through_the_actors_with_the_sde(ray_local, tmp_path):
    # The flow process reaches the actors through the checkpoint's config: two actors write
    # the bytes this process computes with the SDE sampler, and the manifest records its
    # last step (only the SDE's manifests carry it).
    import torch

    from raydiff import config as config_lib
    from raydiff.diffusion import make_process

    engine = Engine(config_lib.resolve("sit-tiny", overrides=[
        "model.num_classes=4", "sample.steps=3", "optim.warmup_steps=0"]))
    g = torch.Generator().manual_seed(0)
    engine.train_step(torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, torch.arange(8) % 4)
    ckpt = engine.save(tmp_path / "checkpoint_000000001")
    out = tmp_path / "sit-sde"
    run_sampling(SampleJob(checkpoint=str(ckpt), out=str(out), actors=2, batch_size=8,
                           sampler="sde", **FAST))
    images, labels, seeds = read_samples(out)
    model, cfg = load_for_sampling(ckpt)
    sde = dataclasses.replace(cfg.sample, sampler="sde")
    in_process = sample_aligned(model, make_process(cfg.diffusion), sde, np.arange(12), labels,
                                seeds, forward_batch=4)
    np.testing.assert_array_equal(images, in_process)
    assert load_manifest(out)["identity"]["sampler"] == {
        "sampler": "sde", "steps": 3, "eta": 0.0, "guidance": 1.5, "clip_x0": False,
        "ddim_last_step": "x0", "sde_last_step": 0.04}


def test_exports_imagefolder_and_npz_from_the_shards(ray_local, tiny_checkpoint, one_actor_run):
    from torchvision.datasets import ImageFolder

    job = SampleJob(checkpoint=str(tiny_checkpoint), out=str(one_actor_run), format="imagefolder",
                    **FAST)
    result = run_sampling(job)  # the same run: nothing to sample, only the export
    assert (result.shards_sampled, result.shards_kept) == (0, 2)
    tree = ImageFolder(str(one_actor_run / "images"))
    assert tree.classes == ["0", "1", "2", "3"]
    assert np.bincount(tree.targets).tolist() == [3, 3, 3, 3]
    images, labels, _ = read_samples(one_actor_run)
    path, target = tree.samples[0]
    assert Path(path).name == "00000000.png" and target == labels[0]
    np.testing.assert_array_equal(np.asarray(tree[0][0]), images[0])

    result = run_sampling(SampleJob(checkpoint=str(tiny_checkpoint), out=str(one_actor_run),
                                    format="npz", **FAST))
    assert result.manifest["formats"] == ["imagefolder", "npz", "parquet"]
    with np.load(one_actor_run / npz_name(result.manifest)) as npz:
        assert npz.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(npz["arr_0"], images)  # uint8 NHWC, ADM's layout
        np.testing.assert_array_equal(npz["arr_1"], labels)
    assert not list(one_actor_run.glob(".*tmp*"))


def test_checkpoint_and_output_given_as_uris(ray_local, tiny_checkpoint, one_actor_run,
                                             tmp_path):
    # file:// goes through the same pyarrow filesystem code as s3:// or gs:// (objects written
    # whole, checkpoint copied to each node); the run folder resolves to its latest checkpoint
    out = tmp_path / "uri-out"
    result = run_sampling(SampleJob(checkpoint=f"file://{tiny_checkpoint.parent}",
                                    out=f"file://{out}", format="npz", **FAST))
    assert result.manifest["checkpoint"]["path"] == f"file://{tiny_checkpoint}"
    assert shard_images(out) == shard_images(one_actor_run)
    with np.load(out / npz_name(result.manifest)) as npz:
        np.testing.assert_array_equal(npz["arr_0"], read_samples(one_actor_run)[0])


def test_killed_run_resumes_with_exactly_the_missing_shards(ray_local, tiny_checkpoint, tmp_path):
    out = tmp_path / "killed"
    # 32 images in 8 shards, 40 DDIM steps: long enough to kill between shards
    args = ["sample", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--per-class",
            "8", "--sample-steps", "40", "--forward-batch", "4", "--shard-size", "4",
            "--actor-batch", "4"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "raydiff.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("shards/shard-*.parquet")):
            assert proc.poll() is None and time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run = prepare_run(SampleJob(checkpoint=str(tiny_checkpoint), out=str(out), per_class=8,
                                steps=40, forward_batch=4, shard_size=4))
    kept = finished_shards(out, run.plan)
    assert 1 <= len(kept) < 8, kept
    # every visible shard is whole; a write cut short would only leave a hidden temporary
    for path in out.glob("shards/shard-*.parquet"):
        assert pq.read_metadata(path).num_rows == 4
    (out / "shards" / ".shard-00009.tmp-12345").write_bytes(b"half a shard")
    stamps = {k: (out / shard_name(k)).stat().st_mtime_ns for k in kept}

    code = cli.main(args)
    assert code == 0
    result_manifest = load_manifest(out)
    assert result_manifest["complete"]
    assert {k: (out / shard_name(k)).stat().st_mtime_ns for k in kept} == stamps  # not redone
    images, labels, seeds = read_samples(out)
    assert seeds.tolist() == list(range(32))  # every index once, in order
    assert np.bincount(labels).tolist() == [8, 8, 8, 8]
    assert not list((out / "shards").glob(".*"))
    model, cfg = load_for_sampling(tiny_checkpoint)
    again = sample_aligned(model, GaussianDiffusion(cfg.diffusion), run.cfg.sample,
                           np.arange(28, 32), labels[28:], seeds[28:], forward_batch=4)
    np.testing.assert_array_equal(images[28:], again)


def test_bad_input_is_one_clear_line(cli_error, tiny_checkpoint, one_actor_run, tmp_path):
    base = ["sample", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "new"),
            "--per-class", "3"]
    line = cli_error(["sample", "--checkpoint", str(tmp_path), "--out",
                                str(tmp_path / "x"), "--per-class", "3"])
    assert "is not a raydiff checkpoint: missing config.json" in line
    assert "--per-class: 0 is out of range: expected >= 1" in cli_error(base[:-1] + ["0"])
    assert "--classes 4 is out of range" in cli_error(base + ["--classes", "0,4"])
    assert "must be a multiple of --forward-batch 32" in cli_error(base + ["--shard-size", "100"])
    line = cli_error(["sample", "--checkpoint", str(tiny_checkpoint), "--out",
                                str(one_actor_run), "--per-class", "3", "--forward-batch", "4",
                                "--shard-size", "8", "--guidance", "0"])
    assert "holds a different sampling run (guidance: 1.5 there, 0.0 requested)" in line
    line = cli_error(["sample", "--checkpoint", str(tiny_checkpoint), "--out",
                      str(one_actor_run), "--per-class", "3", "--forward-batch", "4",
                      "--shard-size", "8", "--compile"])
    assert "holds a different sampling run (compile: False there, True requested)" in line
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    line = cli_error(base[:4] + [str(tmp_path / "foreign"), "--per-class", "3"])
    assert "is not a raydiff sample folder" in line
    assert not (tmp_path / "new").exists()  # nothing was written for any bad request


@pytest.mark.slow
def test_compiled_sampling_equals_eager_within_float_rounding(tmp_path, monkeypatch):
    """``sample.compile=true``: the actor compiles its network with torch.compile (inductor),
    and the compiled network samples the images the eager one does, to within 1e-4 in [-1, 1]
    (a uint8 level is 7.8e-3; measured here: 1.2e-6, not bit-equal).

    Inductor is slow to compile on the 2-core CPU: its start-up alone is about 13 s, and the
    ``tiny`` preset's network took 52 s in all. So this uses a tiny network (one resolution
    level of width 32, one residual block, 8 px, 2 classes: 0.16 M parameters), about 30 s,
    and is marked slow although it starts no Ray. It predicts v, so that an untrained network
    draws images inside [-1, 1] (an eps-predicting one saturates them), and its EMA weights are
    perturbed from the initialisation, whose output layer (gain 1e-5) predicts almost nothing."""
    import torch

    from raydiff import config as config_lib

    cfg = config_lib.resolve("tiny", overrides=[
        "model.num_classes=2", "model.resolution=8", "model.ch_mult=1",
        "model.attn_resolutions=", "model.num_res_blocks=1", "sample.steps=3",
        "diffusion.prediction=v", "sample.clip_x0=false", "sample.compile=true"])
    engine = Engine(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in engine.ema.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    checkpoint = engine.save(tmp_path / "checkpoint_000000000")
    eager, _, ema_sha256 = open_for_sampling(checkpoint)

    compiled = []
    real_compile = torch.compile

    def spy(fn, *args, **kwargs):
        compiled.append(fn)
        return real_compile(fn, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    actor = SampleActor(str(checkpoint), cfg.to_dict(), forward_batch=4, threads=2,
                        use_gpu=False, ema_sha256=ema_sha256)
    assert [getattr(fn, "__self__", None) for fn in compiled] == [actor.model]

    labels, seeds = [0, 1, 1, 0], [11, 12, 13, 14]
    want = sample_images(eager, actor.diffusion, labels, seeds, actor.cfg.sample)
    got = sample_images(actor.model, actor.diffusion, labels, seeds, actor.cfg.sample)
    assert (want.abs() < 1).float().mean() > 0.5  # images, not saturated noise
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
