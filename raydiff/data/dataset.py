"""A prepared split as a plain torch ``Dataset``, for in-process use without Ray.

Unit tests, notebooks and torch-fidelity (which wants a ``Dataset`` of uint8 CxHxW tensors)
read prepared data through this; distributed training reads the same shards through
``ray.data.read_parquet(split_paths(...))`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from raydiff.data.images import decode_png
from raydiff.data.parquet import DatasetInfo, load_info, read_latent_arrays, read_split
from raydiff.errors import RaydiffError

OUTPUTS = ("uint8", "float", "latent")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any layout) as float32 in [-1, 1], the range the diffusion model works in."""
    return images.to(torch.float32) / 127.5 - 1.0


class SplitDataset(torch.utils.data.Dataset):
    """One split held as PNG bytes in memory and decoded per item.

    Items are ``(image, label)``: ``image`` is a 3xHxW tensor, uint8 (``output="uint8"``) or
    float32 in [-1, 1] (``output="float"``), after the optional ``transform``; ``label`` an int.
    Keeping the compressed bytes (a few KB per image) lets a whole long-tailed split sit in
    memory while decoding stays in the DataLoader workers. ``output="latent"`` (a latent
    dataset's training split) gives the image's scaled VAE posterior mean instead, float32
    C x h x w (both latent columns are read into memory).
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str = "train",
        *,
        output: str = "float",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if output not in OUTPUTS:
            raise RaydiffError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        self.info: DatasetInfo = load_info(dataset_dir)
        self.output = output
        self.transform = transform
        if output == "latent":
            self.latents, _, self.labels = read_latent_arrays(dataset_dir, split)
            return
        table = read_split(dataset_dir, split, columns=["image", "label"])
        self.images: list[bytes] = table.column("image").to_pylist()
        self.labels: np.ndarray = table.column("label").to_numpy().astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.output == "latent":  # the image as stored (orientation 0), not its mirror
            latent = torch.from_numpy(self.latents[index, 0].astype(np.float32))
            return (latent if self.transform is None else self.transform(latent),
                    int(self.labels[index]))
        image = torch.from_numpy(decode_png(self.images[index]).copy()).permute(2, 0, 1)
        if self.output == "float":
            image = to_float(image)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
