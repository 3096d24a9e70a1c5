"""``raydiff prepare --latents``: the training split encoded with a VAE in Ray Data actors.

The pipeline (``encode_train_split``)::

    ray.data.from_items(shard names)               one row per training shard
      .map_batches(read_shard_rows)                tasks pinned to this node, where the staging
                                                   folder is: shard -> rows (PNG, label, row)
      .map_batches(EncodeActor, ActorPoolStrategy) the VAE loaded once per actor (one actor per
                                                   GPU when the cluster has GPUs, else one CPU
                                                   actor): posterior mean and std x scale of
                                                   each image and of its mirror
      -> the driver                                collects each shard's rows and adds the
                                                   latent columns to its file

The driver has checked the VAE first (``raydiff.vae.check_vae``: found, loadable, its
weights' sha256, a resolution its downsampling divides); every actor loads exactly those
weights. ``raydiff prepare`` hands ``encode_train_split`` to ``prepare_dataset``, so that the
data layer never imports the Ray layer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from raydiff.data import parquet
from raydiff.data.images import decode_images
from raydiff.distributed import runtime
from raydiff.errors import RaydiffError

if TYPE_CHECKING:  # the reading tasks run this module's functions: they need no torch
    from raydiff.vae import CheckedVae

logger = logging.getLogger(__name__)

ENCODE_BATCH = 32  # images per actor call (each is encoded twice: as stored and mirrored)


def read_shard_rows(batch: dict, split_dir: str) -> dict:
    """Ray Data batch function: shard names -> their rows (image, label, shard, row)."""
    images, labels, shards, rows = [], [], [], []
    for shard in batch["shard"]:
        table = pq.read_table(Path(split_dir) / str(shard), columns=["image", "label"])
        images.extend(table.column("image").to_pylist())
        labels.append(table.column("label").to_numpy())
        shards.extend([str(shard)] * table.num_rows)
        rows.append(np.arange(table.num_rows))
    column = np.empty(len(images), dtype=object)
    column[:] = images
    return {"image": column, "label": np.concatenate(labels), "shard": np.asarray(shards),
            "row": np.concatenate(rows)}


class EncodeActor:
    """Ray Data actor: one VAE, loaded once and checked against the driver's sha256."""

    def __init__(self, vae: CheckedVae, dtype: str, threads: int, use_gpu: bool):
        import torch

        from raydiff.vae import LatentCodec

        torch.set_num_threads(threads)
        self.codec = LatentCodec.open(vae.spec, vae.scale, "cuda" if use_gpu else "cpu",
                                      sha256=vae.sha256, batch_size=ENCODE_BATCH)
        self.dtype = np.dtype(dtype)

    def __call__(self, batch: dict) -> dict:
        images = decode_images(list(batch["image"]))
        mirrored = np.ascontiguousarray(images[:, :, ::-1])
        moments = [self.codec.moments(x) for x in (images, mirrored)]
        mean = np.stack([m.cpu().numpy() for m, _ in moments], axis=1).astype(self.dtype)
        std = np.stack([s.cpu().numpy() for _, s in moments], axis=1).astype(self.dtype)
        return {"shard": np.asarray(batch["shard"]).copy(), "row": np.asarray(batch["row"]).copy(),
                "label": np.asarray(batch["label"]).copy(), "latent_mean": mean,
                "latent_std": std}


def _pool() -> tuple[int, dict]:
    """Actors and their resources: one per GPU when the cluster has GPUs, else one on CPU."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    return 1, {"num_cpus": 1}


def encode_train_split(split_dir: Path, names: list[str], vae: CheckedVae, dtype: str,
                       threads: int) -> parquet.LatentInfo:
    """Add the latent columns to every shard ``names`` of the local ``split_dir``."""
    import ray

    runtime.init_ray(1)
    actors, resources = _pool()
    # the readers run on this node, where the staging folder is (the label Ray gives every node)
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    rows_of = {name: pq.read_metadata(split_dir / name).num_rows for name in names}
    logger.info("encoding %d training images with VAE %s on %d %s actor(s)",
                sum(rows_of.values()), vae.spec, actors, "GPU" if "num_gpus" in resources
                else "CPU")
    ds = ray.data.from_items([{"shard": name} for name in names], override_num_blocks=len(names))
    ds = ds.map_batches(read_shard_rows, fn_kwargs={"split_dir": str(split_dir)}, batch_size=1,
                        batch_format="numpy", label_selector=here)
    ds = ds.map_batches(EncodeActor, fn_constructor_kwargs={
        "vae": vae, "dtype": dtype, "threads": max(1, threads), "use_gpu": "num_gpus" in resources},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=ENCODE_BATCH,
        batch_format="numpy", **resources)
    parts: dict[str, list[dict]] = {}
    done = 0
    for batch in runtime.quiet(ds).iter_batches(batch_size=None, batch_format="numpy"):
        for name in np.unique(batch["shard"]):
            take = batch["shard"] == name
            parts.setdefault(str(name), []).append({k: v[take] for k, v in batch.items()})
            if sum(len(p["row"]) for p in parts[str(name)]) == rows_of[str(name)]:
                _write_shard(split_dir / str(name), parts.pop(str(name)), dtype)
                done += 1
                logger.info("latents: %s written (%d/%d shards)", name, done, len(names))
    if done != len(names) or parts:
        raise RaydiffError(f"encoding ended with {len(names) - done} training shards unfinished")
    return parquet.LatentInfo(vae=vae.spec, sha256=vae.sha256, scale=vae.scale,
                              channels=vae.channels, resolution=vae.latent_resolution,
                              dtype=dtype)


def _write_shard(path: Path, parts: list[dict], dtype: str) -> None:
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(columns["row"], kind="stable")
    labels = pq.read_table(path, columns=["label"]).column("label").to_numpy()
    if not (np.array_equal(columns["row"][order], np.arange(len(labels)))
            and np.array_equal(columns["label"][order], labels)):
        raise RuntimeError(f"{path}: the encoded rows do not match the shard's rows")
    parquet.write_latent_columns(path, columns["latent_mean"][order],
                                 columns["latent_std"][order], dtype)
