"""``raydiff sample``: class-balanced synthetic datasets on Ray Data, deterministic and resumable.

The pipeline (``run_sampling``)::

    ray.data.from_items(missing shards)            one row per shard not on storage yet
      .map_batches(ShardActor, ActorPoolStrategy(size=actors), num_gpus=...)
                                                   EMA network loaded once per actor; each call
                                                   samples whole shards and writes each one to
                                                   --out (a path every node sees, or a URI)
      -> the driver                                a small row per shard written (shard, images,
                                                   bytes): progress, nothing else

Images never pass through the driver, so its network and disk do not bound how many actors
can be kept busy. A shard is the unit of work: an actor call gets whole shards
(``--actor-batch`` images, rounded down to whole shards, at least one), samples the shard's
indices and writes the Parquet file whole (``raydiff.data.samples.write_shard``). A set with
fewer shards than actors leaves actors idle; ``--shard-size`` sets the grain.

``SampleJob(write_in_actors=False)`` (not on the command line) runs the former design, kept
for ``benchmarks/sample_throughput.py`` to compare against: the actors return PNG rows
(blocks of ``--actor-batch`` images) and ``ShardWriter`` on the driver assembles and writes
each shard. Both write the same bytes.

What an image is, and the output folder: ``raydiff.data.samples``. A latent-space model's
samples are decoded by the actors with the VAE its config names (``latent``), each
forward block whole, so shards hold images either way and the manifest's identity records
the VAE.

Why a fixed forward batch: one seed per image is not enough for identical bytes, because the
network is not batch-invariant: oneDNN on CPU (cuDNN on GPU) picks kernels by batch shape, so
the same image computed in a batch of 1 or of 32 differs by up to ~2e-5 (measured on the
2-core development machine with the demo's checkpoint), which flips uint8 pixel values.
``sample_aligned`` therefore always runs the network on blocks of exactly
``forward_batch`` images, block b holding indices [b M, (b+1) M) each at its fixed position;
rows a block lacks (the set ends there, or Ray's batch boundary cut it) are padding, computed
and thrown away. Whatever the number of actors or the Ray Data batch size, every image is
computed in the same block at the same position: the same bytes. ``forward_batch`` is part of
the run's identity; a shard is a whole number of blocks.

``sample.compile`` (``--compile``) has each actor ``torch.compile`` its network. Compiled
kernels round differently from eager ones, so a compiled run is another run (its identity
says ``compile: true``) and cannot resume an eager one.

Resume: a shard file exists only once complete (an actor killed mid-write leaves at most a
hidden temporary file, removed by the next run), so a rerun of the same command samples just
the missing shards. A folder that holds a different run is refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import raydiff
from raydiff import checkpoint as checkpoint_lib
from raydiff.checkpoint import read_config, read_step
from raydiff.config import Config
from raydiff.data.images import encode_png_batch
from raydiff.data.samples import (
    COLUMNS,
    EXPORTS,
    FORMAT_VERSION,
    FORMATS,
    LABELS_RULE,
    MANIFEST,
    SEEDS_RULE,
    SHARDS_DIR,
    SamplePlan,
    finished_shards,
    load_manifest,
    write_shard,
)
from raydiff.diffusion import make_process
from raydiff.distributed import runtime
from raydiff.engine import open_for_sampling
from raydiff.errors import RaydiffError
from raydiff.samplers import sample_aligned
from raydiff.storage import Folder, local_copy

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SampleJob:
    """A ``raydiff sample`` request; the CLI and ``jobs/sample.py`` build one."""

    checkpoint: str  # a checkpoint folder, or a run folder (its latest checkpoint)
    out: str
    per_class: int
    classes: tuple[int, ...] | None = None  # None: every class of the checkpoint
    sampler: str | None = None  # None: the checkpoint config's sample section
    steps: int | None = None
    guidance: float | None = None
    format: str = "parquet"
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    # images per actor call: whole shards when the actors write them (None: one shard), else
    # any number (None: 4 * forward_batch)
    batch_size: int | None = None
    forward_batch: int = 32  # images per network call (fixes the bytes; see module doc)
    shard_size: int = 1024  # images per Parquet shard: the unit of resume and of actor work
    seed: int = 0
    compile: bool | None = None  # None: the checkpoint config's sample.compile
    # False: the actors return images and the driver writes the shards (the former design,
    # kept for benchmarks/sample_throughput.py; same bytes). Not on the command line.
    write_in_actors: bool = True


@dataclass(frozen=True)
class SampleRun:
    """A checked request: the plan, the checkpoint and the settings every actor uses."""

    job: SampleJob
    plan: SamplePlan
    checkpoint: str  # where it is (path or URI), resolved from a run folder if need be
    cfg: Config  # the checkpoint's config, its sample section replaced by the request
    identity: dict[str, Any]
    step: int = 0  # the checkpoint's training step

    @property
    def batch_size(self) -> int:
        """Images per actor call when the driver writes the shards."""
        return self.job.batch_size or 4 * self.job.forward_batch

    @property
    def shards_per_call(self) -> int:
        """Shards per actor call when the actors write them: ``--actor-batch`` images rounded
        down to whole shards, at least one (the default)."""
        return max(1, (self.job.batch_size or 0) // self.plan.shard_size)


# --- Ray Data batch functions ----------------------------------------------------------------

def assign_labels_and_seeds(batch: dict, plan: SamplePlan, skip_shards: frozenset) -> dict:
    """Ray Data batch function: ``id`` -> index, label, seed; indices past the end or in a
    shard already on disk are dropped."""
    ids = np.asarray(batch["id"], np.int64)
    keep = ids < plan.num_images
    if skip_shards:
        keep &= ~np.isin(ids // plan.shard_size, np.fromiter(skip_shards, np.int64))
    ids = ids[keep]
    return {"index": ids, "label": plan.labels(ids), "seed": plan.seeds(ids)}


class SampleActor:
    """Ray Data actor: the EMA network of one checkpoint, loaded once, sampling batches of
    image rows (index, label, seed) into PNG rows for the driver to write."""

    def __init__(self, checkpoint: str, cfg: dict, forward_batch: int, threads: int,
                 use_gpu: bool, ema_sha256: str):
        from raydiff import config as config_lib
        from raydiff.engine import load_for_sampling

        torch.set_num_threads(threads)
        device = "cuda" if use_gpu else "cpu"
        # the weights the driver checked, or an error: never a file replaced since
        self.model, _ = load_for_sampling(local_checkpoint(checkpoint), device=device,
                                          use_ema=True, sha256=ema_sha256)
        self.cfg = config_lib.from_dict(cfg)
        if self.cfg.sample.compile:
            # compiled on the first call; every call has the same shape (forward_batch rows,
            # twice that with guidance), so it is compiled once
            self.model.compile()
        self.diffusion = make_process(self.cfg.diffusion)
        self.forward_batch = forward_batch
        self.decode = None
        latent = self.cfg.latent
        if latent.vae:  # a latent-space model: its samples are decoded here, shards hold images
            from raydiff.vae import LatentCodec

            self.decode = LatentCodec.open(latent.vae, latent.scale, device,
                                           sha256=latent.sha256 or None,
                                           batch_size=forward_batch).decode

    def png(self, index: np.ndarray, label: np.ndarray, seed: np.ndarray) -> np.ndarray:
        """PNG bytes (an object array) of the given images."""
        images = sample_aligned(self.model, self.diffusion, self.cfg.sample, index, label, seed,
                                self.forward_batch, decode=self.decode)
        encoded = np.empty(len(index), dtype=object)
        encoded[:] = encode_png_batch(images)
        return encoded

    def __call__(self, batch: dict) -> dict:
        index = np.asarray(batch["index"], np.int64)
        label, seed = np.asarray(batch["label"], np.int64), np.asarray(batch["seed"], np.int64)
        return {"index": index.copy(), "label": label.copy(), "seed": seed.copy(),
                "image": self.png(index, label, seed)}


class ShardActor:
    """Ray Data actor: samples whole shards and writes each to its run's output folder itself;
    returns one small row per shard written (run, shard, images, bytes).

    ``runs`` holds, per run, its output folder, plan and ``SampleActor`` arguments: the shards
    of several runs (``run_samplings``, a study's every run) go through one actor pool. An
    actor holds the network of the run whose shard it sampled last and loads another when a
    shard of another run comes (the rows come ordered by run)."""

    def __init__(self, runs: list[dict]):
        self.runs = runs
        self.folders = [Folder(spec["out"]) for spec in runs]  # opened once, not per shard
        self.current: tuple[int, SampleActor] | None = None

    def sampler(self, run: int) -> SampleActor:
        if self.current is None or self.current[0] != run:
            self.current = None  # the last run's network goes before the next one loads
            self.current = (run, SampleActor(**self.runs[run]["actor"]))
        return self.current[1]

    def __call__(self, batch: dict) -> dict:
        shards = np.asarray(batch["shard"], np.int64)
        runs = np.asarray(batch["run"], np.int64)
        images, sizes = np.zeros(len(shards), np.int64), np.zeros(len(shards), np.int64)
        for k, (run, shard) in enumerate(zip(runs.tolist(), shards.tolist())):
            spec, sampler = self.runs[run], self.sampler(run)
            plan = spec["plan"]
            start, stop = plan.shard_bounds(shard)
            index = np.arange(start, stop, dtype=np.int64)
            label, seed = plan.labels(index), plan.seeds(index)
            columns = {"index": index, "label": label, "seed": seed,
                       "image": sampler.png(index, label, seed)}
            sizes[k] = write_shard(self.folders[run], shard, columns, start, stop)
            images[k] = stop - start
        return {"run": runs.copy(), "shard": shards.copy(), "images": images, "bytes": sizes}


# --- checking a request -----------------------------------------------------------------------

def resolve_checkpoint(location: str | Path) -> str:
    """A checkpoint folder (path or URI) as given, or the latest ``checkpoint_<step>`` of a run
    folder."""
    return checkpoint_lib.resolve_checkpoint(location, "state.json")


def local_checkpoint(location: str) -> Path:
    """A checkpoint as a local folder: itself, or a copy of a remote one (made once per node,
    shared by the actors there). Anything that is not a checkpoint is one clear error."""
    local = local_copy(location, "raydiff-checkpoints",
                       keep=lambda name: name != "optimizer.pt")  # sampling needs no optimizer
    read_config(local)
    return local


def _check_job(job: SampleJob) -> None:
    positive = {"--per-class": job.per_class, "--actors": job.actors,
                "--forward-batch": job.forward_batch, "--shard-size": job.shard_size,
                "--batch-size": job.batch_size or 1}
    for flag, value in positive.items():
        if value < 1:
            raise RaydiffError(f"{flag} must be at least 1, got {value}")
    if job.format not in FORMATS:
        raise RaydiffError(f"--format {job.format!r} is not one of {', '.join(FORMATS)}")
    if job.shard_size % job.forward_batch:
        raise RaydiffError(f"--shard-size {job.shard_size} must be a multiple of "
                           f"--forward-batch {job.forward_batch}")
    if not 0 <= job.seed < 2 ** 31:
        raise RaydiffError(f"--seed must be in [0, 2**31), got {job.seed}")
    if job.gpus_per_actor < 0 or job.cpus_per_actor <= 0:
        raise RaydiffError("--gpus-per-actor must be >= 0 and --cpus-per-actor > 0")


def _check_classes(classes: tuple[int, ...] | None, num_classes: int) -> tuple[int, ...]:
    if classes is None:
        return tuple(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise RaydiffError(f"--classes {bad[0]} is out of range: the checkpoint has "
                           f"{num_classes} classes (0 .. {num_classes - 1})")
    if len(set(classes)) != len(classes) or not classes:
        raise RaydiffError(f"--classes must be distinct and non-empty, got {list(classes)}")
    return tuple(classes)


def prepare_run(job: SampleJob) -> SampleRun:
    """Validate the request against the checkpoint; nothing is written and Ray is not needed."""
    _check_job(job)
    checkpoint = resolve_checkpoint(job.checkpoint)
    local = local_checkpoint(checkpoint)
    # the config, the step and the EMA weights are read and checked before the output is claimed
    _, cfg, ema_sha256 = open_for_sampling(local)
    step = read_step(local)
    sample = dataclasses.replace(cfg.sample, **{k: v for k, v in (
        ("sampler", job.sampler), ("steps", job.steps), ("guidance", job.guidance),
        ("compile", job.compile)) if v is not None})
    cfg = dataclasses.replace(cfg, sample=sample)  # validates the sampler settings
    classes = _check_classes(job.classes, cfg.model.num_classes)
    plan = SamplePlan(classes, job.per_class, job.seed, job.shard_size)
    sampler = dataclasses.asdict(sample)
    compiled = sampler.pop("compile")
    last_step = sampler.pop("sde_last_step")
    if sample.sampler == "sde":  # only the SDE reads it: other manifests are what they were
        sampler["sde_last_step"] = last_step
    latent = cfg.latent
    if latent.vae:  # the actors decode with it: found (or fetched) before the output is claimed
        from raydiff.vae import resolve_vae

        resolve_vae(latent.vae)
    identity = {
        "checkpoint_ema_sha256": ema_sha256,
        "sampler": sampler,
        "forward_batch": job.forward_batch,
        "seed": job.seed,
        "classes": list(classes),
        "per_class": job.per_class,
        "shard_size": job.shard_size,
        # the images' side: a latent-space model's decoded images are larger than its input
        "resolution": latent.image_resolution or cfg.model.resolution,
        "num_classes": cfg.model.num_classes,
    }
    if compiled:  # only when on: an eager run's manifest is what it was before the option
        identity["compile"] = True
    if latent.vae:  # only then: a pixel-space run's manifest is what it was before latents
        identity["latent"] = {"vae": latent.vae, "vae_sha256": latent.sha256,
                              "scale": latent.scale}
    return SampleRun(job, plan, checkpoint, cfg, identity, step)


# --- the output folder ----------------------------------------------------------------------

def _flat(identity: dict) -> dict:
    """``{"sampler": {"steps": 4}}`` -> ``{"steps": 4}``: the names the command line uses."""
    flat = {}
    for key, value in identity.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


# identity keys written only when they differ from these values
IDENTITY_DEFAULTS = {"compile": False}


def _identity_differences(found: dict, wanted: dict) -> list[str]:
    found = {**IDENTITY_DEFAULTS, **_flat(found)}
    wanted = {**IDENTITY_DEFAULTS, **_flat(wanted)}
    return [f"{key}: {found.get(key)!r} there, {wanted[key]!r} requested"
            for key in wanted if found.get(key) != wanted[key]]


def claim_output(run: SampleRun) -> dict:
    """The manifest of ``out``: a new one, or the existing one if it is the same run."""
    out = Folder(run.job.out)
    if out.is_file(MANIFEST):
        manifest = load_manifest(out)
        diffs = _identity_differences(manifest["identity"], run.identity)
        if not diffs:
            return manifest
        if out.names(SHARDS_DIR, "shard-*.parquet"):
            raise RaydiffError(f"{out} holds a different sampling run ({diffs[0]}); "
                               "choose another --out")
        # a run that failed before its first shard: nothing of it is worth keeping
        logger.info("sample: %s holds no shard of its earlier run (%s); starting this one",
                    out, diffs[0])
    elif out.exists() and (not out.is_dir() or out.names()):
        raise RaydiffError(f"{out} exists and is not a raydiff sample folder (no {MANIFEST})")
    out.makedirs(SHARDS_DIR)
    plan = run.plan
    manifest = {
        "kind": "raydiff-samples",
        "format_version": FORMAT_VERSION,
        "identity": run.identity,
        "checkpoint": {"path": run.checkpoint, "weights": "ema",
                       "step": run.step,
                       "model": dataclasses.asdict(run.cfg.model)},
        "seeds_rule": SEEDS_RULE,
        "labels_rule": LABELS_RULE,
        "num_images": plan.num_images,
        "num_shards": plan.num_shards,
        "class_counts": {str(c): plan.per_class for c in plan.classes},
        "formats": [],
        "complete": False,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "raydiff_version": raydiff.__version__,
    }
    out.write_json(MANIFEST, manifest)
    return manifest


class Progress:
    """The driver's account of the shards written: a log line each, with images/s and ETA."""

    def __init__(self, todo: int):
        self.todo, self.written, self.images, self.bytes = todo, 0, 0, 0
        self.start = time.monotonic()

    def shard_written(self, shard: int, images: int, nbytes: int) -> None:
        self.written, self.images, self.bytes = (self.written + 1, self.images + images,
                                                 self.bytes + nbytes)
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.written * (self.todo - self.written)
        logger.info("sample: shard %d written (%d/%d of this run), %.1f images/s, %.2f MB/s, "
                    "ETA %s", shard, self.written, self.todo, self.images / elapsed,
                    self.bytes / elapsed / 1e6, datetime.timedelta(seconds=round(eta)))


class ShardWriter:
    """Driver-side writes (``write_in_actors=False``): collects actor output by shard and
    writes each shard when all its rows are in."""

    def __init__(self, out: str | Path, plan: SamplePlan, todo: int):
        self.out, self.plan = Folder(out), plan
        self.parts: dict[int, list[dict]] = {}
        self.rows: dict[int, int] = {}
        self.progress = Progress(todo)

    def add(self, batch: dict) -> None:
        shards = np.asarray(batch["index"]) // self.plan.shard_size
        for shard in np.unique(shards):
            take = shards == shard
            self.parts.setdefault(int(shard), []).append(
                {name: np.asarray(batch[name])[take] for name in COLUMNS})
            self.rows[int(shard)] = self.rows.get(int(shard), 0) + int(take.sum())
            start, stop = self.plan.shard_bounds(int(shard))
            if self.rows[int(shard)] == stop - start:
                self._write(int(shard), start, stop)

    def _write(self, shard: int, start: int, stop: int) -> None:
        parts = self.parts.pop(shard)
        columns = {name: np.concatenate([p[name] for p in parts]) for name in COLUMNS}
        nbytes = write_shard(self.out, shard, columns, start, stop)
        del self.rows[shard]
        self.progress.shard_written(shard, stop - start, nbytes)


def _finish(run: SampleRun, manifest: dict) -> dict:
    out = Folder(run.job.out)
    if run.job.format in EXPORTS and run.job.format not in manifest["formats"]:
        EXPORTS[run.job.format](out, manifest)
    formats = sorted(set(manifest["formats"]) | {"parquet", run.job.format})
    manifest = {**manifest, "formats": formats, "complete": True}
    out.write_json(MANIFEST, manifest)
    return manifest


# --- the Ray layer --------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleResult:
    out: str
    manifest: dict
    shards_sampled: int
    shards_kept: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        sampled = min(self.shards_sampled * self.manifest["identity"]["shard_size"],
                      self.manifest["num_images"])
        return sampled / self.seconds if self.seconds > 0 else float("nan")


def _actor_kwargs(run: SampleRun) -> dict:
    job = run.job
    return {"checkpoint": run.checkpoint, "cfg": run.cfg.to_dict(),
            "forward_batch": job.forward_batch, "threads": max(1, int(job.cpus_per_actor)),
            "use_gpu": job.gpus_per_actor > 0,
            "ema_sha256": run.identity["checkpoint_ema_sha256"]}


def shard_spec(run: SampleRun) -> dict:
    """What a ``ShardActor`` needs of a run. The actors need the absolute output path: their
    working directory is not the driver's."""
    return {"out": Folder(run.job.out).uri(""), "plan": run.plan, "actor": _actor_kwargs(run)}


def _actor_pool(job: SampleJob) -> dict:
    import ray

    return {"compute": ray.data.ActorPoolStrategy(size=job.actors), "batch_format": "numpy",
            "num_cpus": job.cpus_per_actor, "num_gpus": job.gpus_per_actor or None}


def build_pipeline(runs: list[SampleRun], todo: list[list[int]]):
    """The Ray Data dataset that samples and writes the shards ``todo[i]`` of each run
    ``runs[i]`` (lazy: nothing runs until it is iterated); one row per shard written."""
    import ray

    rows = [{"run": i, "shard": shard} for i, shards in enumerate(todo) for shard in shards]
    # one block per shard, so that the pool hands out shards one call (or a few) at a time
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(ShardActor, fn_constructor_kwargs={"runs": [shard_spec(r) for r in runs]},
                        batch_size=runs[0].shards_per_call, **_actor_pool(runs[0].job))
    return runtime.quiet(ds)


def build_image_pipeline(run: SampleRun, skip: frozenset):
    """Driver-side writes (``write_in_actors=False``): the dataset of the missing shards'
    images as PNG rows, for ``ShardWriter`` (lazy: nothing runs yet)."""
    import ray

    plan = run.plan
    ds = ray.data.range(plan.num_shards * plan.shard_size, override_num_blocks=plan.num_shards)
    ds = ds.map_batches(assign_labels_and_seeds, fn_kwargs={"plan": plan, "skip_shards": skip},
                        batch_format="numpy", batch_size=None)
    # Blocks of one batch, so that every actor gets work even when there are fewer shards
    # than actors; the pieces start at multiples of the batch size within a shard, so they
    # stay aligned with the forward blocks when the batch size is a multiple of them.
    ds = ds.repartition(target_num_rows_per_block=run.batch_size)
    ds = ds.map_batches(SampleActor, fn_constructor_kwargs=_actor_kwargs(run),
                        batch_size=run.batch_size, **_actor_pool(run.job))
    return runtime.quiet(ds)


def _sample_shards(runs: list[SampleRun], todo: list[list[int]]) -> None:
    """Run the pipeline over the shards ``todo[i]`` of each run ``runs[i]``."""
    job = runs[0].job
    if job.write_in_actors:
        total = sum(len(t) for t in todo)
        if total < job.actors:
            logger.info("sample: %d shards to sample and %d actors: %d of them stay idle (a "
                        "smaller --shard-size spreads a set over more actors)", total,
                        job.actors, job.actors - total)
        progress = Progress(total)
        for batch in build_pipeline(runs, todo).iter_batches(batch_size=None,
                                                             batch_format="numpy"):
            for shard, images, nbytes in zip(batch["shard"], batch["images"], batch["bytes"]):
                progress.shard_written(int(shard), int(images), int(nbytes))
        return
    for run, shards in zip(runs, todo):
        done = frozenset(set(range(run.plan.num_shards)) - set(shards))
        writer = ShardWriter(run.job.out, run.plan, len(shards))
        for batch in build_image_pipeline(run, done).iter_batches(batch_size=None,
                                                                  batch_format="numpy"):
            writer.add(batch)


# what every job of one ``run_samplings`` call must share: the actor pool and its calls
POOL = ("actors", "gpus_per_actor", "cpus_per_actor", "batch_size", "shard_size",
        "write_in_actors")


def run_sampling(job: SampleJob) -> SampleResult:
    """Sample what ``job.out`` lacks, then write the requested export and the manifest."""
    return run_samplings([job])[0]


def run_samplings(jobs: list[SampleJob]) -> list[SampleResult]:
    """Several sampling requests (each its checkpoint and output) through one actor pool, in
    one Ray Data execution: a study samples every run this way. Each output gets what
    ``run_sampling`` would write for its job alone (the same bytes: an image depends on its
    seed, label and forward-block position only); the jobs must agree on ``POOL``."""
    if not jobs:
        return []
    for job in jobs[1:]:
        differ = [k for k in POOL if getattr(job, k) != getattr(jobs[0], k)]
        if differ:
            raise RaydiffError(f"sampling {jobs[0].out} and {job.out} in one pass: they must "
                               f"share {', '.join(differ)}")
    outs = [Folder(job.out).uri("") for job in jobs]
    if len(set(outs)) != len(outs):
        raise RaydiffError(f"two sampling requests would write to one folder: {outs}")
    runs = [prepare_run(job) for job in jobs]
    manifests = [claim_output(run) for run in runs]
    done = [finished_shards(run.job.out, run.plan) for run in runs]
    todo = [sorted(set(range(run.plan.num_shards)) - d) for run, d in zip(runs, done)]
    start = time.monotonic()
    if any(todo):
        for run, shards, d in zip(runs, todo, done):
            logger.info("sample: %d of %d shards to sample (%d on disk) into %s", len(shards),
                        run.plan.num_shards, len(d), run.job.out)
        runtime.init_ray(jobs[0].actors * jobs[0].cpus_per_actor)
        _sample_shards(runs, todo)
        for run in runs:
            missing = set(range(run.plan.num_shards)) - finished_shards(run.job.out, run.plan)
            if missing:
                raise RaydiffError(f"sampling {run.job.out} ended with {len(missing)} shards "
                                   f"missing (first: {min(missing)}); rerun the same command")
    seconds = time.monotonic() - start
    return [SampleResult(str(run.job.out), _finish(run, manifest), len(shards), len(d), seconds)
            for run, manifest, shards, d in zip(runs, manifests, todo, done)]
