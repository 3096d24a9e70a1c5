"""A torchvision ResNet classifier for long-tailed data: config, network, one training step,
checkpoints, top-1 by class group, and its penultimate layer as an evaluation feature space.

No Ray here: ``train_classifier`` trains in a notebook, ``raydiff.distributed.classify`` runs
the same ``ClassifierTrainer`` steps in Ray Train workers.

Recipe (defaults): the standard long-tail recognition one for CIFAR-LT (LDAM-DRW, Cao et al.
2019; the BBN and MiSLAS code bases share it): SGD with momentum 0.9, weight decay 5e-4,
lr 0.1 per 128 images of batch (the linear scaling rule of Goyal et al. 2017), linear warm-up
for 5 epochs then cosine decay to 0, random crop with zero padding and horizontal flip.
Images of 64 px or less get the small-image ResNet stem (a 3x3 stride-1 convolution and no
max-pool, as in the CIFAR ResNets), larger ones torchvision's 7x7 stride-2 stem and max-pool.

Class groups: many-shot (more than 100 training images), medium (20-100), few (fewer than
20), counted on the real training split (Liu et al. 2019, OLTR), and the head/body/tail thirds
that the rest of raydiff uses (``raydiff.metrics``). A group's top-1 is the mean of its
classes' top-1, as OLTR's ``shot_acc`` computes it.

Checkpoint folder: ``classifier.json`` (kind, step, resolved config, training counts, the
data it came from), ``model.safetensors`` and ``optimizer.pt`` (read back with
``weights_only=True``); written under a temporary name and renamed, never unpickling code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet

from raydiff import checkpoint as checkpoint_lib
from raydiff.checkpoint import read_optimizer, read_tensors, write_tensors
from raydiff.config import ClassifierConfig
from raydiff.data.resample import epoch_batches, steps_per_epoch
from raydiff.engine import NonFiniteLossError, step_seed
from raydiff.errors import RaydiffError
from raydiff.metrics import GROUPS, SHOT_GROUPS, class_groups, shot_groups
from raydiff.storage import Folder, atomic_path, local_copy

KIND = "raydiff-classifier"
FORMAT_VERSION = 1
META_FILE = "classifier.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SMALL_STEM_MAX = 64  # images up to this side get the 3x3 stride-1 stem and no max-pool

# name: (torchvision block, blocks per stage, width_per_group). resnet10 is not in
# torchvision's zoo: resnet18 with one block per stage, for the demo's seconds-long training.
ARCHS: dict[str, tuple[type, tuple[int, ...], int]] = {
    "resnet10": (tv_resnet.BasicBlock, (1, 1, 1, 1), 64),
    "resnet18": (tv_resnet.BasicBlock, (2, 2, 2, 2), 64),
    "resnet34": (tv_resnet.BasicBlock, (3, 4, 6, 3), 64),
    "resnet50": (tv_resnet.Bottleneck, (3, 4, 6, 3), 64),
    "wide_resnet50_2": (tv_resnet.Bottleneck, (3, 4, 6, 3), 128),
}


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and std of uint8 NHWC images, in [0, 1] (float64 sums)."""
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].reshape(-1, 3).astype(np.float64) / 255
        total += part.sum(0)
        squares += (part ** 2).sum(0)
        count += len(part)
    mean = total / count
    std = np.sqrt(np.clip(squares / count - mean ** 2, 1e-12, None))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def fit_to_data(cfg: ClassifierConfig, num_classes: int, resolution: int,
                images: np.ndarray) -> ClassifierConfig:
    """The config with the dataset's classes, side and channel statistics, and lr and padding
    resolved, so the saved config is what ran."""
    mean, std = channel_stats(images)
    cfg = dataclasses.replace(cfg, num_classes=num_classes, resolution=resolution, mean=mean,
                              std=std)
    return dataclasses.replace(cfg, lr=cfg.base_lr, crop_padding=cfg.padding)


# --- the network ------------------------------------------------------------------------------

class ResNet(tv_resnet.ResNet):
    """torchvision's ResNet with a base width, the small-image stem, and ``features``."""

    def __init__(self, cfg: ClassifierConfig):
        block, layers, width_per_group = ARCHS[cfg.arch]
        self._width = cfg.width  # read by _make_layer during torchvision's __init__
        super().__init__(block, list(layers), num_classes=cfg.num_classes,
                         width_per_group=width_per_group)
        small = cfg.resolution <= SMALL_STEM_MAX
        self.conv1 = nn.Conv2d(3, cfg.width, 3 if small else 7, 1 if small else 2,
                               1 if small else 3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(cfg.width)
        if small:
            self.maxpool = nn.Identity()
        self.feature_dim = 8 * cfg.width * block.expansion
        self.fc = nn.Linear(self.feature_dim, cfg.num_classes)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        # torchvision hard-codes 64, 128, 256, 512 planes; scale them to the width. Its first
        # stage starts from the stem's 64 channels, which are `width` channels here.
        if planes == 64:
            self.inplanes = self._width
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer: globally pooled last-stage activations, (N, feature_dim)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_classifier(cfg: ClassifierConfig) -> ResNet:
    return ResNet(cfg)


def normalize(x: torch.Tensor, cfg: ClassifierConfig) -> torch.Tensor:
    """uint8 NCHW -> float, standardised per channel with the training split's statistics."""
    mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def augment(x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop from the zero-padded image and horizontal flip (torchvision's
    ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip``), for a whole NCHW batch."""
    n, c, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding,) * 4)
        dy, dx = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, channel, rows, cols]
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


# --- training ---------------------------------------------------------------------------------

def learning_rate(cfg: ClassifierConfig, step: int, per_epoch: int) -> float:
    """Linear warm-up over ``warmup_epochs``, then cosine decay towards 0 (reached one step
    after the last)."""
    total, warmup = cfg.epochs * per_epoch, round(cfg.warmup_epochs * per_epoch)
    if step < warmup:
        return cfg.base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class ClassifierTrainer:
    """Model, SGD optimiser and step counter of one (data-parallel) worker."""

    def __init__(self, cfg: ClassifierConfig, per_epoch: int, device: str | torch.device = "cpu",
                 rank: int = 0, wrap: Callable[[nn.Module], nn.Module] | None = None):
        if per_epoch < 1:
            raise RaydiffError(f"fewer training images than one batch (batch_size="
                               f"{cfg.batch_size})")
        self.cfg, self.per_epoch, self.rank = cfg, per_epoch, rank
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # identical initial weights on every worker
            model = build_classifier(cfg)
        self.model = model.to(self.device)
        self.net = wrap(self.model) if wrap is not None else self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.base_lr,
                                         momentum=cfg.momentum, nesterov=cfg.nesterov,
                                         weight_decay=cfg.weight_decay)
        self.step = 0

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.step // self.per_epoch

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.per_epoch

    def train_step(self, images: np.ndarray | torch.Tensor, labels) -> dict[str, float]:
        """One SGD step on uint8 NHWC images; returns loss, batch accuracy and lr."""
        self.net.train()
        generator = torch.Generator().manual_seed(step_seed(self.cfg.seed, self.rank, self.step))
        x = torch.as_tensor(images).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = normalize(augment(x, self.cfg.padding, self.cfg.hflip, generator), self.cfg)
        y = torch.as_tensor(labels, dtype=torch.long).to(self.device, non_blocking=True)
        lr = learning_rate(self.cfg, self.step, self.per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Gradients are averaged over workers, so a NaN anywhere shows on every worker here
        # and all stop at the same step with the weights untouched.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf")))
        value = float(loss.detach())
        if not (math.isfinite(value) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1}: "
                                     f"loss={value}, grad_norm={grad_norm}")
        self.optimizer.step()
        self.step += 1
        accuracy = (logits.detach().argmax(1) == y).float().mean()
        return {"loss": value, "accuracy": float(accuracy), "lr": lr}

    def train_epoch(self, images: np.ndarray, labels: np.ndarray, world: int = 1) -> dict:
        """The rest of the current epoch (all of it unless resumed mid-epoch); mean metrics."""
        batches = epoch_batches(len(labels), self.cfg.batch_size, self.cfg.seed, self.epoch,
                                self.rank, world)
        sums: dict[str, float] = {}
        done = self.step % self.per_epoch
        for index in batches[done:]:
            for name, value in self.train_step(images[index], labels[index]).items():
                sums[name] = sums.get(name, 0.0) + value
        return {name: value / max(1, len(batches) - done) for name, value in sums.items()}

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        return save_classifier(path, self.cfg, self.step, self.model.state_dict(),
                               self.optimizer.state_dict(), meta)

    def load(self, path: str | Path) -> dict:
        """Resume weights, optimiser and step; refuses a checkpoint of another network."""
        ckpt = load_classifier(path, with_optimizer=True, device=self.device)
        differences = config_differences(ckpt.cfg, self.cfg)
        if differences:
            raise RaydiffError(f"checkpoint {path} is of another classifier: {differences[0]}")
        self.model.load_state_dict(ckpt.weights)
        if ckpt.optimizer is not None:
            self.optimizer.load_state_dict(ckpt.optimizer)
        self.step = ckpt.step
        return ckpt.meta


def train_classifier(cfg: ClassifierConfig, images: np.ndarray, labels: np.ndarray,
                     device: str | torch.device = "cpu",
                     on_epoch: Callable[[int, dict], None] | None = None) -> ClassifierTrainer:
    """Train in this process (no Ray): ``cfg.epochs`` epochs on uint8 NHWC images."""
    trainer = ClassifierTrainer(cfg, steps_per_epoch(len(labels), cfg.batch_size), device)
    while trainer.epoch < cfg.epochs:
        metrics = trainer.train_epoch(images, labels)
        if on_epoch is not None:
            on_epoch(trainer.epoch, metrics)
    return trainer


# --- checkpoints ------------------------------------------------------------------------------

@dataclass
class ClassifierCheckpoint:
    cfg: ClassifierConfig
    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    meta: dict  # everything in classifier.json


def save_classifier(path: str | Path, cfg: ClassifierConfig, step: int, weights: dict,
                    optimizer: dict | None = None, meta: dict | None = None) -> Path:
    """Write a checkpoint folder whole: a temporary sibling, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**(meta or {}), "kind": KIND, "format_version": FORMAT_VERSION, "step": step,
              "config": cfg.to_dict()}
    with atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
        write_tensors(tmp / WEIGHTS_FILE, weights)
        if optimizer is not None:
            torch.save(optimizer, tmp / OPTIMIZER_FILE)
    return path


def read_meta(path: str | Path) -> dict:
    """classifier.json of a checkpoint folder, after checking the folder is one."""
    folder = Folder(path)
    if not folder.is_file(META_FILE):
        raise RaydiffError(f"{path} is neither a classifier checkpoint (no {META_FILE}) nor a "
                           "'raydiff classify' run folder with one")
    meta = folder.read_json(META_FILE)
    if meta.get("kind") != KIND or "config" not in meta:
        raise RaydiffError(f"{folder.uri(META_FILE)} is not a raydiff classifier checkpoint")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise RaydiffError(f"{folder.uri(META_FILE)}: format_version {meta['format_version']} "
                           f"is newer than this raydiff reads ({FORMAT_VERSION})")
    return meta


def load_classifier(path: str | Path, with_optimizer: bool = False,
                    device: str | torch.device = "cpu",
                    sha256: str | None = None) -> ClassifierCheckpoint:
    """Read a local checkpoint folder: safetensors weights, optimizer with weights_only. With
    ``sha256`` (``checkpoint_sha256``), the weights and config must be the ones that hashed to
    it: they are parsed from the very bytes that were hashed."""
    path = Path(path)
    meta = read_meta(path)
    weights, _ = read_tensors(path / WEIGHTS_FILE, sha256, prefix=_config_bytes(meta["config"]),
                              what="classifier weights", device=device)
    optimizer = None
    if with_optimizer and (path / OPTIMIZER_FILE).is_file():
        optimizer = read_optimizer(path / OPTIMIZER_FILE, device)
    return ClassifierCheckpoint(ClassifierConfig.from_dict(meta["config"]), int(meta["step"]),
                                weights, optimizer, meta)


def config_differences(found: ClassifierConfig, wanted: ClassifierConfig,
                       ignore: Sequence[str] = ("epochs", "ckpt_every", "num_to_keep")
                       ) -> list[str]:
    """``["width: checkpoint 64, requested 32", ...]``, leaving out what a resumed run may
    change: more epochs extend it, and how often it checkpoints."""
    return [f"{f.name}: checkpoint {getattr(found, f.name)!r}, requested "
            f"{getattr(wanted, f.name)!r}" for f in dataclasses.fields(ClassifierConfig)
            if f.name not in ignore and getattr(found, f.name) != getattr(wanted, f.name)]


def resolve_checkpoint(location: str | Path) -> str:
    """A classifier checkpoint folder as given, or the latest one of a run folder
    (``raydiff classify --out``)."""
    return checkpoint_lib.resolve_checkpoint(location, META_FILE)


def _config_bytes(config: dict) -> bytes:
    """What a classifier's features depend on besides its weights (the normalisation)."""
    return json.dumps(config, sort_keys=True).encode()


def checkpoint_sha256(location: str | Path) -> str:
    """What the features depend on: the weights' bytes and the config (normalisation)."""
    return Folder(location).sha256([WEIGHTS_FILE], _config_bytes(read_meta(location)["config"]))


# --- evaluation -------------------------------------------------------------------------------

@torch.inference_mode()
def predict(model: ResNet, cfg: ClassifierConfig, images: np.ndarray, batch_size: int = 256,
            device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features, logits) of uint8 NHWC images, float32, in eval mode."""
    model.eval()
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        x = normalize(x.to(device).permute(0, 3, 1, 2), cfg)
        feats = model.features(x)
        features.append(feats.float().cpu().numpy())
        logits.append(model.fc(feats).float().cpu().numpy())
    empty = np.zeros((0, model.feature_dim), np.float32)
    return (np.concatenate(features) if features else empty,
            np.concatenate(logits) if logits else empty[:, :cfg.num_classes])


def local_checkpoint(location: str | Path) -> Path:
    """A checkpoint as a local folder: itself, or a copy of a remote one (weights and
    metadata, made once per node)."""
    return local_copy(location, "raydiff-classifiers",
                      keep=lambda name: name in (META_FILE, WEIGHTS_FILE))


class ClassifierFeatures:
    """A classifier checkpoint as a feature extractor: uint8 NHWC -> (features, logits)."""

    def __init__(self, location: str | Path, device: str | torch.device = "cpu",
                 sha256: str | None = None):
        ckpt = load_classifier(local_checkpoint(location), device=device, sha256=sha256)
        self.cfg, self.device = ckpt.cfg, torch.device(device)
        self.model = build_classifier(ckpt.cfg).to(self.device)
        self.model.load_state_dict(ckpt.weights)
        self.model.eval().requires_grad_(False)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return predict(self.model, self.cfg, images, device=self.device)


def correct_counts(predictions: np.ndarray, labels: np.ndarray,
                   num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct, total) per class."""
    labels = np.asarray(labels, np.int64)
    hit = np.asarray(predictions) == labels
    return (np.bincount(labels[hit], minlength=num_classes),
            np.bincount(labels, minlength=num_classes))


def accuracy_report(correct: Sequence[int], total: Sequence[int], train_counts: Sequence[int],
                    class_names: Sequence[str] | None = None) -> dict:
    """Top-1 overall, per class, per many/medium/few-shot group and per head/body/tail third.

    Groups are cut by ``train_counts`` (the real training split); a group's top-1 is the mean
    of its classes' top-1 (classes without test images left out); an empty group is None.
    """
    correct, total = np.asarray(correct, np.float64), np.asarray(total, np.float64)
    names = list(class_names or [str(c) for c in range(len(total))])
    per_class = np.where(total > 0, correct / np.maximum(total, 1), np.nan)

    def groups(index: np.ndarray, group_names: Sequence[str]) -> dict:
        out = {}
        for g, name in enumerate(group_names):
            members = [c for c in range(len(total)) if index[c] == g]
            values = [per_class[c] for c in members if total[c] > 0]
            out[name] = {"classes": members, "top1": float(np.mean(values)) if values else None}
        return out

    return {
        "num_images": int(total.sum()),
        "top1": float(correct.sum() / total.sum()) if total.sum() else None,
        "per_class": {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, per_class)},
        "shot_groups": groups(shot_groups(train_counts), SHOT_GROUPS),
        "groups": groups(class_groups(train_counts), GROUPS),
    }
