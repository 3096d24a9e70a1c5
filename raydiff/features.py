"""Feature extractors for evaluation: the Inception network of the protocol, or a classifier.

torch-fidelity's ``inception-v3-compat`` (TF-compatible InceptionV3, docs/METHOD.md
"Evaluation") gives two outputs per image: ``2048`` (pool3 features: FID, KID, P/R) and
``logits_unbiased`` (the Inception Score). Its weights are a 95 MB download; on a machine
without network they must be given as a file (``--inception-weights``), and
``resolve_weights`` says so in one line (``WeightsUnavailable``) instead of a traceback.

``pixels`` (the cheap space of a hyperparameter search's objective, ``raydiff.quickeval``):
images area-resized to 8x8, as vectors in [0, 1]; no weights, no logits.

``classifier:CKPT`` (``--features``) uses a ``raydiff classify`` checkpoint instead, best one
trained on the balanced reference split (``--split reference``): its penultimate layer is the
feature space of FID, KID and P/R, a domain-specific one that needs no download, and its
logits give the Inception Score formula over the dataset's own classes (so IS lies in
[1, num_classes] and is not comparable with Inception IS) and the classifier's top-1 on the
generated images. Either way an ``Extractor`` names the network and the hash of its weights,
which is what keys the reference-feature cache.

No Ray here: ``raydiff.distributed.evaluate`` loads an ``Extractor`` inside Ray Data actors.
"""

from __future__ import annotations

import io
import logging
import pickle
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raydiff.errors import RaydiffError
from raydiff.storage import read_verified

logger = logging.getLogger(__name__)

EXTRACTOR = "inception-v3-compat"
FEATURE_LAYERS = ("2048", "logits_unbiased")
INCEPTION_DIMS = (2048, 1008)  # pool3 features; logits (TF's 1001 classes + padding)
CLASSIFIER_PREFIX = "classifier:"
PIXELS = "pixels-8x8"
_PIXEL_SIDE = 8
_DOWNLOAD_TIMEOUT_S = 60


class WeightsUnavailable(RaydiffError):
    """The Inception weights are neither given, nor cached, nor downloadable."""


def _weights_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def cached_weights_path() -> Path:
    """Where torch.hub (and so torch-fidelity) keeps the downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_weights_url()).name


def resolve_weights(path: str | Path | None = None, download: bool = True) -> Path:
    """A local weights file: ``path`` if given, else torch.hub's cache, else a download."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RaydiffError(f"--inception-weights {path} does not exist")
        return path
    cached = cached_weights_path()
    if cached.is_file():
        return cached
    if not download:
        raise WeightsUnavailable(f"the Inception weights are not in {cached} and downloading "
                                 "is off; pass --inception-weights PATH")
    cached.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # torch.hub's urlopen has no timeout
    try:
        torch.hub.download_url_to_file(_weights_url(), str(cached), progress=False)
    except OSError as err:  # URLError, timeouts, DNS failures
        raise WeightsUnavailable(f"the Inception weights could not be downloaded "
                                 f"({getattr(err, 'reason', err)}); pass --inception-weights "
                                 "PATH") from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached


def read_inception_state(path: str | Path, sha256: str | None = None) -> tuple[dict, str]:
    """The Inception state dict in ``path`` and the sha256 of the bytes it was parsed from,
    read once by raydiff (``weights_only=True``: a pickle that carries code is refused, never
    run). With ``sha256``, refused unless those bytes hash to it, so a file replaced after it
    was checked is never used. Anything else is one clear line."""
    data, digest = read_verified(path, sha256, what="Inception weights")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise RaydiffError(f"{path} is not a plain Inception state dict: "
                           f"{str(err).strip().splitlines()[0]}") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise RaydiffError(f"{path} is not an {EXTRACTOR} state dict (no fc.weight)")
    return state, digest


def check_weights_file(path: str | Path) -> str:
    """Refuse, with one clear line, a weights file that is more than an Inception state dict;
    its sha256 when it is one."""
    return read_inception_state(path)[1]


class InceptionFeatures:
    """Pool3 features and unbiased logits of uint8 images, on one device."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu",
                 sha256: str | None = None):
        from unittest import mock

        import torch_fidelity.feature_extractor_inceptionv3 as inception

        self.device = torch.device(device)
        # torch-fidelity unpickles a weights path with weights_only=False, so it never gets
        # one: raydiff reads the tensors itself (weights_only=True, from the bytes whose hash
        # it checks) and hands them over where torch-fidelity would otherwise take its
        # downloaded state dict.
        state, _ = read_inception_state(weights, sha256)
        with mock.patch.object(inception, "load_state_dict_from_url", return_value=state):
            model = inception.FeatureExtractorInceptionV3(EXTRACTOR, list(FEATURE_LAYERS))
        self.model = model.to(self.device)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NHWC -> (float32 (N, 2048) features, float32 (N, 1008) logits)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)
        features, logits = self.model(x)
        return features.cpu().numpy(), logits.cpu().numpy()


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """A stand-in ``inception-v3-compat`` weights file where the real one cannot be downloaded
    (tests, throughput checks): PyTorch's default init, BatchNorm statistics calibrated on
    random images (else the 2048-d features collapse to ~1e-8 and every FID is 0). Its
    features are not Inception's; its speed and shapes are."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as inception

    cls = inception.FeatureExtractorInceptionV3
    with mock.patch.object(inception, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(cls, "load_state_dict", lambda self, state, strict=True: None):
        net = cls(EXTRACTOR, list(FEATURE_LAYERS))
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: the calibration batch's statistics
    g = torch.Generator().manual_seed(seed)
    net.train()
    with torch.no_grad():
        net((torch.rand(4, 3, 32, 32, generator=g) * 255).to(torch.uint8))
    torch.save(net.eval().state_dict(), path)
    return Path(path)


class PixelFeatures:
    """Images area-resized to 8x8, flattened: float32 rows in [0, 1]; no logits."""

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
        rows = torch.nn.functional.adaptive_avg_pool2d(x, _PIXEL_SIDE).flatten(1).numpy()
        return rows, np.zeros((len(rows), 0), np.float32)


@dataclass(frozen=True)
class Extractor:
    """Which network turns images into (features, logits): plain data, so it travels to Ray
    actors, and what metrics.json and the reference-feature cache key name."""

    kind: str  # inception | classifier | pixels
    name: str  # inception-v3-compat | classifier:<arch> | pixels-8x8
    path: str  # the weights file, or the classifier checkpoint folder
    sha256: str  # of the weights (classifier: and of its config, which holds the normalisation)
    feature_dim: int
    logits_dim: int
    num_classes: int | None = None  # classifier: the classes it tells apart
    resolution: int | None = None  # classifier: the image side it was trained on

    def load(self, device: str | torch.device = "cpu") -> Callable:
        """A callable uint8 NHWC -> (float32 features, float32 logits)."""
        if self.kind == "inception":
            return InceptionFeatures(self.path, device, sha256=self.sha256)
        if self.kind == "pixels":
            return PixelFeatures()
        from raydiff.classifier import ClassifierFeatures

        return ClassifierFeatures(self.path, device, sha256=self.sha256)


def inception_extractor(path: str | Path | None = None, download: bool = True,
                        sha256: str | None = None) -> Extractor:
    """Inception with the weights of ``path`` (else the cache, else a download); with
    ``sha256``, the hash of those weights as already checked."""
    weights = resolve_weights(path, download=download)
    return Extractor("inception", EXTRACTOR, str(weights), sha256 or check_weights_file(weights),
                     *INCEPTION_DIMS)


def pixel_extractor(channels: int = 3) -> Extractor:
    return Extractor("pixels", PIXELS, "", f"{PIXELS}-area", _PIXEL_SIDE ** 2 * channels, 0)


def classifier_extractor(location: str) -> Extractor:
    """A ``raydiff classify`` checkpoint (or run folder: its latest checkpoint) as extractor."""
    from raydiff.classifier import ARCHS, ClassifierConfig, checkpoint_sha256, read_meta, resolve_checkpoint

    path = resolve_checkpoint(location)
    cfg = ClassifierConfig.from_dict(read_meta(path)["config"])
    feature_dim = 8 * cfg.width * ARCHS[cfg.arch][0].expansion
    return Extractor("classifier", f"{CLASSIFIER_PREFIX}{cfg.arch}", path, checkpoint_sha256(path),
                     feature_dim, cfg.num_classes, cfg.num_classes, cfg.resolution)


def resolve_extractor(spec: str, inception_weights: str | None = None,
                      download: bool = True) -> Extractor:
    """``inception`` or ``classifier:CKPT`` (the ``--features`` value) as an Extractor."""
    if spec == "inception":
        return inception_extractor(inception_weights, download)
    if spec.startswith(CLASSIFIER_PREFIX) and spec[len(CLASSIFIER_PREFIX):]:
        return classifier_extractor(spec[len(CLASSIFIER_PREFIX):])
    raise RaydiffError(f"--features {spec!r}: expected inception or classifier:CHECKPOINT")
