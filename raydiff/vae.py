"""The latent codec: a Stable Diffusion VAE (``diffusers.AutoencoderKL``) between images and
the latents a latent-space diffusion model (SiT on ImageNet-LT) trains and samples in.

Which VAE (``resolve_vae``): a known name (``sd-vae-ft-ema``, the released CCUA-SiT recipe's
``--vae ema``; ``sd-vae-ft-mse``) is downloaded from the Hugging Face Hub on first use into
``$RAYDIFF_VAE_CACHE`` (default ``~/.cache/raydiff/vae``) and read from there afterwards; any
other value is a folder (a path, or a URI copied once per node) that holds ``config.json`` and
``diffusion_pytorch_model.safetensors``.

Loading never runs code (``load_vae``): the network is built from ``config.json`` with
``AutoencoderKL.from_config`` and its weights read with safetensors; diffusers'
``from_pretrained`` is not used, since it falls back to unpickling ``.bin`` files. A folder
with only a pickle is refused.

What the codec computes, as the released CCUA-SiT ``train.py`` does it (``vae.encode(x)
.latent_dist.sample().mul_(0.18215)`` on images in [-1, 1]; ``vae.decode(z / 0.18215)``):
``moments`` gives the posterior's mean and standard deviation times ``scale``, so that a
posterior sample is ``mean + std * eps``; ``encode`` gives that sample (or the mean without a
generator); ``decode`` turns latents back into uint8 images.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raydiff.config import LatentConfig
from raydiff.errors import RaydiffError

DEFAULT_SCALE = LatentConfig().scale  # the SD VAE's 0.18215 (released train.py: mul_(0.18215))
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
PICKLE_FILES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
# known names -> Hugging Face Hub repositories
KNOWN_VAES = {"sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema",
              "sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse"}


def cache_dir() -> Path:
    return Path(os.environ.get("RAYDIFF_VAE_CACHE", "~/.cache/raydiff/vae")).expanduser()


def _has_files(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def resolve_vae(spec: str, cache: str | Path | None = None, download: bool = True,
                endpoint: str | None = None) -> Path:
    """The local folder of the VAE ``spec`` names: a known name (downloaded into ``cache`` on
    first use; ``endpoint`` is the Hub's address, default huggingface.co or $HF_ENDPOINT), or a
    folder path or URI. Anything else is one clear error."""
    if not spec:
        raise RaydiffError("no VAE given: pass a known name "
                           f"({', '.join(KNOWN_VAES)}) or a folder with {CONFIG_FILE} and "
                           f"{WEIGHTS_FILE}")
    if spec in KNOWN_VAES:
        return _download(spec, Path(cache) if cache else cache_dir(), download, endpoint)
    from raydiff.storage import Folder, is_uri, local_copy

    if is_uri(spec):
        if not Folder(spec).is_file(WEIGHTS_FILE):
            raise RaydiffError(f"VAE {spec} holds no {WEIGHTS_FILE}")
        folder = local_copy(spec, "raydiff-vae", keep=lambda n: n in (CONFIG_FILE, WEIGHTS_FILE))
    else:
        folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise RaydiffError(f"VAE {spec!r} is neither a known name ({', '.join(KNOWN_VAES)}) "
                           f"nor a folder")
    if not (folder / WEIGHTS_FILE).is_file():
        pickles = [name for name in PICKLE_FILES if (folder / name).is_file()]
        if pickles:
            raise RaydiffError(f"VAE folder {spec} holds {pickles[0]}, a pickle, which raydiff "
                               f"never loads (it can run code): convert it to {WEIGHTS_FILE}")
        raise RaydiffError(f"VAE folder {spec} holds no {WEIGHTS_FILE}")
    if not (folder / CONFIG_FILE).is_file():
        raise RaydiffError(f"VAE folder {spec} holds no {CONFIG_FILE}")
    return folder


def _download(name: str, cache: Path, download: bool, endpoint: str | None) -> Path:
    """The cached copy of a known VAE, downloaded whole into a hidden sibling and renamed into
    place, so processes that share the cache never see half a VAE."""
    folder = cache / name
    if _has_files(folder):
        return folder
    repo = KNOWN_VAES[name]
    if not download:
        raise RaydiffError(f"VAE {name} is not in {folder} and downloads are off: put {repo}'s "
                           f"{CONFIG_FILE} and {WEIGHTS_FILE} there")
    from huggingface_hub import hf_hub_download

    staging = cache / f".{name}.tmp-{os.getpid()}"
    try:
        for filename in (CONFIG_FILE, WEIGHTS_FILE):
            # $HF_ENDPOINT read now: huggingface_hub reads it once, when first imported
            hf_hub_download(repo, filename, local_dir=staging,
                            endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None)
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # the hub's download notes
        try:
            staging.rename(folder)
        except OSError:  # another process finished first
            if not _has_files(folder):
                raise
    except Exception as err:  # no network, no such file, ...: one line, nothing left behind
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise RaydiffError(f"VAE {name} is not in {folder} and cannot be downloaded from "
                           f"{repo} ({reason}); put its {CONFIG_FILE} and {WEIGHTS_FILE} "
                           "there, or pass a folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_vae(folder: str | Path, device: str | torch.device = "cpu",
             sha256: str | None = None) -> tuple[torch.nn.Module, str]:
    """The AutoencoderKL of a resolved folder in eval mode, and its weights' sha256. With
    ``sha256``, weights that hash otherwise are refused."""
    from diffusers import AutoencoderKL
    from safetensors import SafetensorError
    from safetensors.torch import load

    from raydiff.storage import read_verified

    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    # read once: the bytes hashed are the bytes parsed
    data, digest = read_verified(weights, what="VAE weights")
    if sha256 and digest != sha256:
        raise RaydiffError(f"VAE weights {weights} have sha256 {digest[:12]}..., not the "
                           f"{sha256[:12]}... this run was made with")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        vae = AutoencoderKL.from_config(config)
        state = load(data)
    except (OSError, ValueError, TypeError, SafetensorError) as err:
        raise RaydiffError(f"cannot load the VAE in {folder}: "
                           f"{' '.join(str(err).split())[:200]}") from None
    # Hub files of older diffusers name attention weights query/key/value/proj_attn: the same
    # renaming from_pretrained applies (a dict operation; nothing is executed).
    fix = getattr(vae, "_fix_state_dict_keys_on_load", None)
    if fix is not None:
        fix(state)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise RaydiffError(f"VAE weights {weights} do not fit its {CONFIG_FILE} ({what})")
    return vae.to(device).eval().requires_grad_(False), digest


@dataclass(frozen=True)
class VaeIdentity:
    """What decides a codec's numbers: recorded in datasets, configs and sample folders."""

    vae: str  # the name or folder it was given as
    sha256: str  # of its weights file
    scale: float


class LatentCodec:
    """Images <-> scaled latents with one AutoencoderKL; batches of ``batch_size`` images."""

    def __init__(self, vae: torch.nn.Module, identity: VaeIdentity, batch_size: int = 32):
        self.vae, self.identity, self.batch_size = vae, identity, batch_size
        self.device = next(vae.parameters()).device
        config = vae.config
        self.channels = int(config.latent_channels)
        self.downsampling = 2 ** (len(config.block_out_channels) - 1)

    @classmethod
    def open(cls, spec: str, scale: float = DEFAULT_SCALE, device: str | torch.device = "cpu",
             sha256: str | None = None, batch_size: int = 32, **resolve_kwargs) -> LatentCodec:
        vae, digest = load_vae(resolve_vae(spec, **resolve_kwargs), device, sha256)
        return cls(vae, VaeIdentity(spec, digest, float(scale)), batch_size)

    @property
    def scale(self) -> float:
        return self.identity.scale

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.downsampling:
            raise RaydiffError(f"images of {resolution} px do not divide into this VAE's "
                               f"{self.downsampling}x downsampling")
        side = resolution // self.downsampling
        return self.channels, side, side

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    @torch.inference_mode()
    def moments(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation, times ``scale``, of uint8 NHWC images:
        float32 NCHW on the codec's device."""
        means, stds = [], []
        for start in range(0, len(images), self.batch_size):
            posterior = self.vae.encode(self._pixels(images[start:start + self.batch_size]))
            means.append(posterior.latent_dist.mean * self.scale)
            stds.append(posterior.latent_dist.std * self.scale)
        return torch.cat(means).float(), torch.cat(stds).float()

    def encode(self, images: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of uint8 NHWC images: a posterior sample drawn with ``generator``
        (the released code's ``latent_dist.sample()``), or the posterior mean without one."""
        mean, std = self.moments(images)
        if generator is None:
            return mean
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        return mean + std * eps

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 NHWC images of scaled latents (NCHW), rounded as ``samplers.to_uint8``."""
        from raydiff.samplers import to_uint8

        out = []
        for start in range(0, len(latents), self.batch_size):
            z = latents[start:start + self.batch_size].to(self.device, torch.float32)
            out.append(to_uint8(self.vae.decode(z / self.scale).sample))
        return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


@dataclass(frozen=True)
class CheckedVae:
    """A VAE found and loaded once (``check_vae``): what encoding actors load and what a
    dataset.json records."""

    spec: str
    sha256: str
    scale: float
    channels: int
    latent_resolution: int


def check_vae(spec: str, scale: float, resolution: int) -> CheckedVae:
    """Resolve (download on first use) and load the VAE once, so that a missing or broken
    one, or an image side its downsampling does not divide, is one line before any work."""
    codec = LatentCodec.open(spec, scale)
    if resolution % codec.downsampling:
        raise RaydiffError(f"--resolution {resolution} is not a multiple of VAE {spec}'s "
                           f"{codec.downsampling}x downsampling")
    channels, side, _ = codec.latent_shape(resolution)
    return CheckedVae(spec, codec.identity.sha256, float(scale), channels, side)


def write_random_vae(folder: str | Path, block_out_channels: tuple[int, ...] = (16, 32),
                     latent_channels: int = 4, seed: int = 0) -> Path:
    """A small randomly initialised AutoencoderKL as a VAE folder (config.json + safetensors):
    the stand-in tests use, since they never download. ``len(block_out_channels) - 1``
    halvings: (16, 32) maps 32 px images to 16 x 16 latents."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    blocks = len(block_out_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        block_out_channels=tuple(block_out_channels), layers_per_block=1,
                        norm_num_groups=min(block_out_channels) // 2,
                        down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=32)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(dict(vae.config), indent=2, default=list))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / WEIGHTS_FILE))
    return folder
