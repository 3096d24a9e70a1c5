"""Checkpoints as folders of plain tensors plus the resolved config; loading runs no code.

Layout of a checkpoint folder::

    config.json          resolved Config (raydiff.config)
    state.json           step and format version
    model.safetensors    raw model weights
    ema.safetensors      EMA weights (what one samples from)
    optimizer.pt         optimizer state dict, read back with torch.load(weights_only=True)

A folder is written under a temporary name and renamed when complete, so a crash never
leaves a half-written checkpoint that looks valid. The helpers below (tensors as safetensors,
optimizer state read with ``weights_only=True``, a run folder's latest checkpoint) serve the
classifier checkpoints of ``raydiff.classifier`` too.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from raydiff import config as config_lib
from raydiff.config import Config, ModelConfig
from raydiff.errors import RaydiffError
from raydiff.storage import Folder, atomic_path, latest_checkpoint_folder, read_verified

FORMAT_VERSION = 1
_REQUIRED = ("config.json", "state.json", "model.safetensors", "ema.safetensors")


@dataclass
class Checkpoint:
    cfg: Config
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None  # None when loaded for sampling only


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_tensors(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """A state dict as one safetensors file (contiguous CPU copies)."""
    save_file(_contiguous(state), str(path))


def read_tensors(where: str | Path, sha256: str | None = None, prefix: bytes = b"",
                 what: str = "checkpoint weights",
                 device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], str]:
    """One safetensors file, read once: its tensors and the sha256 of ``prefix`` + the bytes
    they were parsed from. With ``sha256``, refused unless they hash to it (a file replaced
    after it was checked is never used)."""
    where = Path(where)
    data, digest = read_verified(where, sha256, prefix=prefix, what=what)
    try:
        tensors = load_bytes(data)
    except (SafetensorError, ValueError) as err:
        raise RaydiffError(f"checkpoint {where.parent} has unreadable weights: {where.name}: "
                           f"{str(err).splitlines()[0]}") from None
    return {k: v.to(device) for k, v in tensors.items()}, digest


def read_optimizer(where: str | Path, device: str | torch.device = "cpu") -> dict:
    """An optimizer state dict, read with ``weights_only=True``: tensors and plain
    containers only, never arbitrary objects."""
    try:
        return torch.load(where, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise RaydiffError(f"{where} refused: it holds more than tensors "
                           f"({str(err).splitlines()[0]})") from None


def resolve_checkpoint(location: str | Path, marker: str) -> str:
    """A checkpoint folder (path or URI) as given when it holds ``marker`` (a file every
    complete checkpoint of its kind has), else the ``checkpoint_<step>`` with the highest step
    of a run folder, else ``location`` itself (for its reader to say what it lacks)."""
    folder = Folder(location)
    if not folder.is_file(marker):
        latest = latest_checkpoint_folder(location, marker)
        if latest is not None:
            return latest
    return folder.location


def save_checkpoint(path: str | Path, cfg: Config, step: int, model: dict, ema: dict,
                    optimizer: dict | None = None) -> Path:
    """Write a checkpoint folder whole (a temporary sibling, renamed when complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(cfg.to_json())
        (tmp / "state.json").write_text(json.dumps({"step": step, "format": FORMAT_VERSION}))
        write_tensors(tmp / "model.safetensors", model)
        write_tensors(tmp / "ema.safetensors", ema)
        if optimizer is not None:
            torch.save(optimizer, tmp / "optimizer.pt")
        if path.exists():
            shutil.rmtree(path)
    return path


def describe_mismatch(found: ModelConfig, expected: ModelConfig) -> list[str]:
    """``["model.ch: checkpoint 128, requested 64", ...]`` for every field that differs."""
    return [f"model.{f.name}: checkpoint {getattr(found, f.name)!r}, "
            f"requested {getattr(expected, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if getattr(found, f.name) != getattr(expected, f.name)]


def read_config(path: str | Path) -> Config:
    """The resolved config of a checkpoint folder, after checking the folder is one."""
    path = Path(path)
    if not path.is_dir():
        raise RaydiffError(f"checkpoint {path} does not exist or is not a folder")
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise RaydiffError(f"{path} is not a raydiff checkpoint: missing {', '.join(missing)}")
    return config_lib.load_json(path / "config.json")


def read_step(path: str | Path) -> int:
    """The step recorded in a checkpoint's ``state.json``; one clear line if it is damaged."""
    where = Path(path) / "state.json"
    try:
        step = json.loads(where.read_text())["step"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise RaydiffError(f"{where} is damaged: {type(err).__name__}: {err}") from None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RaydiffError(f"{where} is damaged: step {step!r} is not a count of steps")
    return step


def read_weights(path: str | Path, name: str, sha256: str | None = None,
                 device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], str]:
    """One safetensors file of a checkpoint folder (``read_tensors``)."""
    return read_tensors(Path(path) / name, sha256, device=device)


def load_checkpoint(path: str | Path, expected: ModelConfig | None = None,
                    with_optimizer: bool = True, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint folder. Refuses one whose model config differs from ``expected``."""
    path = Path(path)
    cfg = read_config(path)
    if expected is not None and cfg.model != expected:
        raise RaydiffError(f"checkpoint {path} does not match the requested model: "
                           + "; ".join(describe_mismatch(cfg.model, expected)))
    step = read_step(path)
    model, _ = read_weights(path, "model.safetensors", device=device)
    ema, _ = read_weights(path, "ema.safetensors", device=device)
    optimizer = None
    if with_optimizer and (path / "optimizer.pt").is_file():
        optimizer = read_optimizer(path / "optimizer.pt", device)
    return Checkpoint(cfg=cfg, step=int(step), model=model, ema=ema, optimizer=optimizer)
