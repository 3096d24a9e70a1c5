"""Latent datasets: the VAE codec, its safe loading and download, prepare --latents, and one
end-to-end run in latent space (prepare -> train -> sample -> evaluate) on the session's Ray.

No test downloads: the VAE is a small randomly initialised AutoencoderKL written by
``raydiff.vae.write_random_vae`` (block_out_channels (16, 32): 2x downsampling, 4 latent
channels), and the Hub is a local HTTP stand-in that serves that folder's files.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from raydiff import config as config_lib
from raydiff.data import parquet
from raydiff.errors import RaydiffError
from raydiff.storage import Folder
from raydiff.vae import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LatentCodec,
    VaeIdentity,
    resolve_vae,
    write_random_vae,
)

REPO = "stabilityai/sd-vae-ft-ema"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return write_random_vae(tmp_path_factory.mktemp("vae") / "random-vae")


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _images(n: int, side: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


# --- the codec ---------------------------------------------------------------------------------

def test_codec_is_diffusers_encode_and_decode_times_the_scale(vae_dir):
    codec = LatentCodec.open(str(vae_dir), scale=0.5)
    images = _images(3)
    mean, std = codec.moments(images)
    assert mean.shape == std.shape == (3, 4, 16, 16) and codec.latent_shape(32) == (4, 16, 16)
    with torch.no_grad():
        posterior = codec.vae.encode(_pixels(images)).latent_dist
        torch.testing.assert_close(mean, posterior.mean * 0.5)
        torch.testing.assert_close(std, posterior.std * 0.5)
        # a posterior sample with the same generator: diffusers' latent_dist.sample()
        expected = posterior.sample(generator=torch.Generator().manual_seed(7)) * 0.5
    torch.testing.assert_close(codec.encode(images, torch.Generator().manual_seed(7)), expected)
    torch.testing.assert_close(codec.encode(images), mean)  # no generator: the mean
    # the scale is applied: the same VAE with scale 1 gives twice these
    unscaled, _ = LatentCodec(codec.vae, VaeIdentity("v", "s", 1.0)).moments(images)
    torch.testing.assert_close(unscaled, mean * 2)

    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    decoded = codec.decode(latents)
    assert decoded.dtype == np.uint8 and decoded.shape == (3, 32, 32, 3)
    with torch.no_grad():
        pixels = codec.vae.decode(latents / 0.5).sample
    expected = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert np.array_equal(decoded, expected.numpy())
    assert codec.identity.sha256 == hashlib.sha256((vae_dir / WEIGHTS_FILE).read_bytes()).hexdigest()


def test_hub_files_with_old_attention_names_load_to_the_same_weights(vae_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    # sd-vae-ft-ema's file on the Hub predates diffusers' to_q/to_k/to_v/to_out.0 names
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
                 ".to_out.0.": ".proj_attn."}
    state = load_file(str(vae_dir / WEIGHTS_FILE))
    renamed = {}
    for key, value in state.items():
        for new, old in old_names.items():
            key = key.replace(new, old)
        renamed[key] = value
    assert renamed.keys() != state.keys()
    old = tmp_path / "old"
    old.mkdir()
    (old / CONFIG_FILE).write_text((vae_dir / CONFIG_FILE).read_text())
    save_file(renamed, str(old / WEIGHTS_FILE))
    images = _images(2, seed=3)
    a = LatentCodec.open(str(vae_dir)).moments(images)[0]
    b = LatentCodec.open(str(old)).moments(images)[0]
    assert torch.equal(a, b)


def test_unsafe_missing_or_changed_vaes_are_one_clear_line(vae_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / CONFIG_FILE).write_text((vae_dir / CONFIG_FILE).read_text())
    torch.save({"x": torch.zeros(1)}, pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(RaydiffError, match="a pickle, which raydiff never loads"):
        resolve_vae(str(pickled))
    with pytest.raises(RaydiffError, match="neither a known name"):
        resolve_vae(str(tmp_path / "no-such-vae"))
    with pytest.raises(RaydiffError, match="downloads are off"):
        resolve_vae("sd-vae-ft-ema", cache=tmp_path / "cache", download=False)
    with pytest.raises(RaydiffError, match="not the"):  # weights replaced since the run
        LatentCodec.open(str(vae_dir), sha256="0" * 64)


# --- the download, against a local stand-in of the Hub -----------------------------------------

class _Hub(http.server.ThreadingHTTPServer):
    files: dict[str, bytes] = {}
    requests: list[str] = []


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """``GET/HEAD /<repo>/resolve/<revision>/<file>``, with the headers hf_hub_download reads."""

    def _answer(self, body: bool) -> None:
        self.server.requests.append(self.path)
        prefix = f"/{REPO}/resolve/main/"
        data = self.server.files.get(self.path[len(prefix):]) if self.path.startswith(
            prefix) else None
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802 (http.server's names)
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    server = _Hub(("127.0.0.1", 0), _HubHandler)
    server.files, server.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_known_name_is_downloaded_once_into_the_cache(hub, vae_dir, tmp_path):
    hub.files = {name: (vae_dir / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    url = f"http://127.0.0.1:{hub.server_address[1]}"
    folder = resolve_vae("sd-vae-ft-ema", cache=tmp_path, endpoint=url)
    assert folder == tmp_path / "sd-vae-ft-ema"
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert Folder(folder).sha256([WEIGHTS_FILE]) == Folder(vae_dir).sha256([WEIGHTS_FILE])
    asked = len(hub.requests)
    assert asked >= 2
    assert resolve_vae("sd-vae-ft-ema", cache=tmp_path, endpoint=url) == folder
    assert len(hub.requests) == asked  # the second time comes from the cache
    codec = LatentCodec.open("sd-vae-ft-ema", cache=tmp_path, download=False)
    assert codec.identity.vae == "sd-vae-ft-ema" and codec.channels == 4


def test_prepare_with_a_vae_that_cannot_be_had_is_one_line_and_writes_nothing(
        cli_error, hub, vae_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDIFF_VAE_CACHE", str(tmp_path / "cache"))
    # the Hub stand-in serves nothing (and nothing here may reach the real Hub)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.server_address[1]}")
    out = tmp_path / "out"
    line = cli_error(["prepare", "shapes", "--out", str(out), "--latents", "sd-vae-ft-ema"])
    assert "VAE sd-vae-ft-ema is not in" in line and "cannot be downloaded from " + REPO in line
    assert hub.requests, "the download did not go to the Hub stand-in"
    assert not out.exists() and not (tmp_path / "cache" / "sd-vae-ft-ema").exists()
    line = cli_error(["prepare", "shapes", "--out", str(out), "--latents", str(vae_dir),
                      "--resolution", "33"])
    assert "--resolution 33 is not a multiple of VAE" in line and not out.exists()
    line = cli_error(["prepare", "shapes", "--out", str(out), "--latent-scale", "0.5"])
    assert "--latent-scale applies only with --latents" in line


# --- configs and datasets --------------------------------------------------------------------

def _info(latent: parquet.LatentInfo | None) -> parquet.DatasetInfo:
    return parquet.DatasetInfo(source="shapes", class_names=("a", "b"), train_counts=(4, 2),
                               reference_counts=(3, 3), resolution=32, imbalance_ratio=2.0,
                               seed=0, files={"train": (), "reference": ()}, latent=latent)


def test_a_run_takes_its_latent_space_from_the_dataset_and_refuses_a_mismatch():
    from raydiff.distributed.train import fit_config_to_data

    latent = parquet.LatentInfo("sd-vae-ft-ema", "ab" * 32, 0.18215, 4, 16, "float16")
    tiny = ["sample.clip_x0=false"]
    cfg = fit_config_to_data(config_lib.resolve("tiny", overrides=[*tiny, "model.in_channels=4"]),
                             _info(latent), "D")
    assert (cfg.model.in_channels, cfg.model.resolution, cfg.model.num_classes) == (4, 16, 2)
    assert cfg.latent == config_lib.LatentConfig("sd-vae-ft-ema", "ab" * 32, 0.18215, 32)
    with pytest.raises(RaydiffError, match=r"model.in_channels=3 does not fit D: its latents of "
                                           r"VAE sd-vae-ft-ema have 4 channels"):
        fit_config_to_data(config_lib.resolve("tiny", overrides=tiny), _info(latent), "D")
    other = config_lib.resolve("tiny", overrides=[*tiny, "model.in_channels=4",
                                                  "latent.vae=sd-vae-ft-mse"])
    with pytest.raises(RaydiffError, match="latent.vae='sd-vae-ft-mse' does not fit D"):
        fit_config_to_data(other, _info(latent), "D")
    with pytest.raises(RaydiffError, match="holds images, not latents"):
        fit_config_to_data(config_lib.resolve("tiny", overrides=[*tiny, "latent.vae=x"]),
                           _info(None), "D")
    with pytest.raises(RaydiffError, match="sample.clip_x0=True is invalid"):
        config_lib.resolve("tiny", overrides=["latent.vae=sd-vae-ft-ema"])  # tiny clips x0


def test_latent_rows_become_posterior_samples_of_the_image_or_its_mirror():
    from raydiff.distributed.train import ModelInput, _memory_batches

    n, shape = 6, (2, 4, 2, 2)
    mean = np.zeros((n, *shape), np.float16)
    mean[:, 1] = 100  # the mirror's mean: every x0 says which orientation it came from
    mean += np.arange(n, dtype=np.float16)[:, None, None, None, None]
    std = np.full((n, *shape), 0.5, np.float16)
    labels = np.arange(n) % 2
    for hflip in (False, True):
        cfg = config_lib.resolve("tiny", overrides=[
            "optim.batch_size=6", "model.num_classes=2", "model.in_channels=4",
            "sample.clip_x0=false", "latent.vae=v", f"train.hflip={hflip}"])
        batches = _memory_batches({"latent_mean": mean, "latent_std": std, "label": labels},
                                  cfg, 0, 1, 0, torch.device("cpu"),
                                  ModelInput(cfg, torch.Generator().manual_seed(0)))
        x0, y = next(batches)
        assert x0.dtype == torch.float32 and x0.shape == (n, 4, 2, 2)
        row = (x0.mean(dim=(1, 2, 3)) % 100).round().long()  # each row's index, from its mean
        assert torch.equal(y, torch.from_numpy(labels)[row])
        mirrored = x0.mean(dim=(1, 2, 3)) > 50
        assert mirrored.any() == hflip and (~mirrored).any()
        base = torch.from_numpy(mean[row.numpy(), mirrored.long().numpy()]).float()
        eps = (x0 - base) / 0.5
        assert 0.5 < eps.std() < 1.5 and eps.abs().max() > 0  # noise drawn, of the std given


# --- end to end on Ray: prepare --latents -> train -> sample -> evaluate ------------------------

@pytest.mark.slow
def test_latent_pipeline_end_to_end(ray_local, vae_dir, inception_weights, tmp_path):
    from raydiff import cli
    from raydiff.data.dataset import SplitDataset
    from raydiff.data.prepare import options_from_args, reuse_problem
    from raydiff.data.samples import load_manifest, read_samples
    from raydiff.diffusion import make_process
    from raydiff.distributed.evaluate import EvalJob, run_evaluation
    from raydiff.distributed.sample import SampleJob, run_sampling
    from raydiff.distributed.train import TrainJob, run_training
    from raydiff.engine import load_for_sampling
    from raydiff.samplers import sample_aligned

    data = tmp_path / "shapes-latent"
    argv = ["prepare", "shapes", "--out", str(data), "--resolution", "32", "--num-classes", "3",
            "--images-per-class", "10", "--rows-per-shard", "8", "--latents", str(vae_dir)]
    assert cli.main(argv) == 0
    info = parquet.load_info(data)
    # a resubmitted job keeps it; other latent options are another dataset
    asked = [*argv[1:], "--latent-dtype", "float16", "--latent-scale", "0.18215"]
    assert reuse_problem(str(data), options_from_args(cli.build_parser().parse_args(
        ["prepare", *asked])), info) is None
    asked = [*argv[1:], "--latent-dtype", "float32"]
    assert reuse_problem(str(data), options_from_args(cli.build_parser().parse_args(
        ["prepare", *asked])), info) == "it holds --latent-dtype float16, not float32"
    sha = Folder(vae_dir).sha256([WEIGHTS_FILE])
    assert info.latent == parquet.LatentInfo(str(vae_dir), sha, 0.18215, 4, 16, "float16")
    assert json.loads((data / "dataset.json").read_text())["latent"]["vae_sha256"] == sha
    assert len(info.files["train"]) > 1  # rows from several shards came back to their files
    # the stored latents are the codec's moments of the stored images and of their mirrors
    images, labels = parquet.read_split_arrays(data, "train")
    mean, std, stored_labels = parquet.read_latent_arrays(data, "train")
    assert np.array_equal(labels, stored_labels) and mean.dtype == np.float16
    codec = LatentCodec.open(str(vae_dir))
    for k, view in enumerate((images, images[:, :, ::-1].copy())):
        m, s = codec.moments(view)
        np.testing.assert_allclose(mean[:, k].astype(np.float32), m.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(std[:, k].astype(np.float32), s.numpy(), rtol=2e-3, atol=2e-3)
    latent_item, label = SplitDataset(data, output="latent")[1]
    assert torch.equal(latent_item, torch.from_numpy(mean[1, 0].astype(np.float32)))
    assert label == labels[1]
    reference, ref_labels = parquet.read_split_arrays(data, "reference")
    assert reference.shape == (info.num_images("reference"), 32, 32, 3)
    assert reference.dtype == np.uint8 and np.bincount(ref_labels).tolist() == list(
        info.counts("reference"))

    # a few steps of the paper's pairing, SiT with flow matching and CCUA, on the latents,
    # streamed through Ray Data, with a decoded preview
    cfg = config_lib.resolve("sit-tiny", overrides=[
        "model.in_channels=4", "loss.method=ccua", "optim.batch_size=8",
        "optim.total_steps=4", "optim.warmup_steps=0", "train.log_every=2", "train.ckpt_every=4",
        "train.preview_per_class=1", "sample.steps=3", "train.in_memory_max_images=0"])
    result = run_training(TrainJob(data=str(data), cfg=cfg, storage=str(tmp_path / "runs"),
                                   name="latent", workers=1))
    assert result.metrics["step"] == 4 and np.isfinite(result.metrics["loss"])
    assert (tmp_path / "runs" / "latent" / "logs" / "samples_000000004.png").is_file()
    checkpoint = Path(result.checkpoint.path)
    model, trained = load_for_sampling(checkpoint, use_ema=True)
    assert type(model).__name__ == "SiT" and trained.diffusion.process == "flow"
    assert (trained.model.in_channels, trained.model.resolution) == (4, 16)
    assert trained.latent == config_lib.LatentConfig(str(vae_dir), sha, 0.18215, 32)

    # sampling decodes in the actors: the shards hold 32 px images, the codec's decoding
    samples = tmp_path / "samples"
    run_sampling(SampleJob(checkpoint=str(checkpoint), out=str(samples), per_class=2,
                           forward_batch=2, shard_size=2, actors=1))
    generated, gen_labels, seeds = read_samples(samples)
    assert generated.shape == (6, 32, 32, 3) and generated.dtype == np.uint8
    identity = load_manifest(samples)["identity"]
    assert identity["latent"] == {"vae": str(vae_dir), "vae_sha256": sha, "scale": 0.18215}
    assert identity["resolution"] == 32
    # on one thread, as the actor (1 CPU) runs: the SiT's matrix products sum in another
    # order on two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = sample_aligned(model, make_process(trained.diffusion), trained.sample,
                                  np.arange(6), gen_labels, seeds, 2, decode=codec.decode)
    finally:
        torch.set_num_threads(threads)
    differ = generated.astype(int) - expected
    assert not differ.any(), (np.count_nonzero(differ), np.abs(differ).max())

    # evaluation sees images: samples against the 32 px reference split
    metrics = run_evaluation(EvalJob(samples=str(samples), reference=str(data), metrics=("fid",),
                                     inception_weights=str(inception_weights), batch_size=8,
                                     copying=False, cache_dir=str(tmp_path / "features")))
    assert np.isfinite(metrics["sets"]["overall"]["fid"]) and metrics["sets"]["overall"]["fid"] > 0
