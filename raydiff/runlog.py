"""What a training run leaves for people: metrics.jsonl, TensorBoard events, sample grids,
and a one-line progress report with an ETA. Written by rank 0 only.

The log folder is ``<run>/logs`` in the run's storage. On a local path or NFS the files are
written there directly; in object storage (a URI) they are written into a local staging folder
and uploaded whole (``raydiff.storage.Folder``) at every checkpoint (``sync``) and at ``close``,
so ``tensorboard --logdir s3://...`` shows a finished run. The staging folder starts with the
run's ``metrics.jsonl`` from storage, so a resumed run continues its history; TensorBoard event
files of earlier sessions stay in storage under their own names.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raydiff.config import Config
from raydiff.diffusion import GaussianDiffusion
from raydiff.flow import FlowMatching
from raydiff.samplers import sample_images, to_uint8
from raydiff.storage import Folder, is_uri

logger = logging.getLogger("raydiff.train")

_PROGRESS_KEYS = ("loss", "ddpm", "flow", "ucl", "al", "cbdm", "dispersive", "diffrop")


def _ensure_console_logging() -> None:
    # Ray workers start without logging handlers; their stderr is forwarded to the driver.
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class RunLog:
    def __init__(self, log_dir: str | Path, cfg: Config, start_step: int):
        from tensorboardX import SummaryWriter

        _ensure_console_logging()
        # in object storage: written here, uploaded by sync(); locally: written in place
        self.remote = Folder(log_dir) if is_uri(log_dir) else None
        self.dir = Path(tempfile.mkdtemp(prefix="raydiff-logs-") if self.remote else log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.synced: dict[str, tuple[int, int]] = {}  # name: (size, mtime) last uploaded
        if self.remote and self.remote.is_file("metrics.jsonl"):
            self.remote.download(["metrics.jsonl"], self.dir)
        (self.dir / "config.json").write_text(cfg.to_json())
        self.metrics = (self.dir / "metrics.jsonl").open("a")
        self.tb = SummaryWriter(str(self.dir))
        self.start_step, self.start_time = start_step, time.monotonic()

    def write(self, metrics: dict[str, float], total_steps: int) -> None:
        step = int(metrics["step"])
        self.metrics.write(json.dumps({"time": time.time(), **metrics}) + "\n")
        self.metrics.flush()
        for name, value in metrics.items():
            if name.startswith("eval/"):  # measured on the weights of an earlier step
                self.tb.add_scalar(name, value, int(metrics["eval_step"]))
            elif name not in ("step", "eval_step"):
                self.tb.add_scalar(f"train/{name}", value, step)
        logger.info(self.progress_line(metrics, total_steps))

    def progress_line(self, metrics: dict[str, float], total_steps: int) -> str:
        step = int(metrics["step"])
        done = step - self.start_step
        elapsed = time.monotonic() - self.start_time
        eta = (total_steps - step) * elapsed / done if done > 0 else float("nan")
        eta_text = str(datetime.timedelta(seconds=round(eta))) if np.isfinite(eta) else "?"
        terms = " ".join(f"{k} {metrics[k]:.4f}" for k in _PROGRESS_KEYS if k in metrics)
        return (f"step {step}/{total_steps} ({100 * step / total_steps:.0f}%) {terms} "
                f"lr {metrics.get('lr', 0):.2e} {metrics.get('images_per_s', 0):.0f} img/s "
                f"ETA {eta_text}")

    def add_image(self, grid: np.ndarray, step: int) -> None:
        """A sample grid; called from rank 0's side-work thread, so the file appears whole
        (written under a dot-name that ``sync`` skips, then renamed)."""
        name = f"samples_{step:09d}.png"
        Image.fromarray(grid).save(self.dir / f".{name}", format="PNG")
        (self.dir / f".{name}").replace(self.dir / name)
        self.tb.add_image("samples", grid, step, dataformats="HWC")

    def error(self, message: str) -> None:
        logger.error(message)
        self.metrics.write(json.dumps({"time": time.time(), "error": message}) + "\n")
        self.metrics.flush()

    def sync(self) -> None:
        """Upload each file of the staging folder that changed since the last upload, whole
        (an object appears only when its upload completes); nothing to do on local storage."""
        if self.remote is not None:
            self.metrics.flush()
            self.tb.flush()
            self._upload()

    def _upload(self) -> None:
        for path in sorted(self.dir.iterdir()):
            stat = path.stat()
            if path.is_file() and not path.name.startswith(".") and \
                    self.synced.get(path.name) != (stat.st_size, stat.st_mtime_ns):
                self.remote.write_bytes(path.name, path.read_bytes())
                self.synced[path.name] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        self.metrics.close()
        self.tb.close()
        if self.remote is not None:
            self._upload()
            shutil.rmtree(self.dir, ignore_errors=True)


def image_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 image, ``columns`` per row, ``pad`` px of white between."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + col * (w + pad):pad + col * (w + pad) + w] = image
    return grid


def class_grid(model: torch.nn.Module, diffusion: GaussianDiffusion | FlowMatching,
               cfg: Config, class_order: Sequence[int], codec=None) -> np.ndarray:
    """EMA samples, one row per class in ``class_order`` (head to tail), fixed seeds;
    ``codec`` (a ``raydiff.vae.LatentCodec``) decodes a latent-space model's samples."""
    per_class = cfg.train.preview_per_class
    labels = [int(c) for c in class_order for _ in range(per_class)]
    seeds = list(range(len(labels)))  # the same noise at every checkpoint: progress is visible
    x = sample_images(model, diffusion, labels, seeds, cfg.sample, clamp=codec is None)
    images = to_uint8(x) if codec is None else codec.decode(x)
    return image_grid(images, per_class)
