"""Distributed training on Ray Train: DDP workers fed from memory or by a Ray Data pipeline.

The driver (``run_training``) checks the request before any worker starts, puts a small
training split in Ray's object store decoded (``train.in_memory_max_images``) or builds the
Ray Data pipeline of a large one (Parquet -> optional BRS -> PNG decode), and fits a
``TorchTrainer``. Each
worker (``train_loop_per_worker``) runs the core ``Engine``: it resumes from the latest
checkpoint Ray hands it, reports every ``train.log_every`` steps and writes a checkpoint every
``train.ckpt_every`` steps (rank 0 writes the files; every rank reports, since a report is a
barrier). Re-running with the same ``storage`` and ``name`` resumes; a worker that dies is
restarted from the latest checkpoint up to ``max_failures`` times.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raydiff import config as config_lib
from raydiff.checkpoint import describe_mismatch
from raydiff.config import Config
from raydiff.data import parquet
from raydiff.data.resample import Resample, class_ranks, epoch_batches, repeat_rates, steps_per_epoch
from raydiff.diffusion import make_process
from raydiff.distributed import runtime
from raydiff.distributed.runtime import Scaling, run_dir
from raydiff.engine import Engine, NonFiniteLossError, step_seed
from raydiff.errors import RaydiffError
from raydiff.quickeval import EvalSpec, QuickEval
from raydiff.runlog import RunLog, class_grid
from raydiff.storage import Folder

logger = logging.getLogger(__name__)

_SHUFFLE_BUFFER_BATCHES = 4  # local shuffle buffer, in per-worker batches
DECODE_ONCE_MAX_BYTES = 2 << 30  # training splits this small (decoded) are decoded once
_BLOCK_BATCHES = 2  # rows per block of a decoded-once split, in global batches


@dataclass(frozen=True)
class TrainJob:
    """Everything ``run_training`` needs; the CLI and ``jobs/train.py`` build one."""

    data: str
    cfg: Config
    storage: str
    name: str
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    eval: EvalSpec | None = None  # in-training evaluation at every report (hyperparameter search)
    eval_reference: Any = None  # ObjectRef of the ReferenceStats that evaluation compares to
    # [images, labels] ObjectRefs of a split held in memory, put once by a search or study
    # driver for all its trials (``put_split``); None: ``build_trainer`` puts it
    split_refs: list | None = None

    @property
    def scaling(self) -> Scaling:
        return Scaling(self.workers, self.cpus_per_worker, self.gpus_per_worker,
                       self.max_failures)


# --- driver-side checks ---------------------------------------------------------------------

def fit_config_to_data(cfg: Config, info: parquet.DatasetInfo, data: str = "the dataset"
                       ) -> Config:
    """Take the class count and the side of what the network sees (the images', or the
    latents' of a latent dataset) from the dataset the run trains on, and the latent section
    from a latent dataset. Channels, and a latent section set in the config, must match."""
    latent = info.latent
    channels, side = (3, info.resolution) if latent is None else (latent.channels,
                                                                  latent.resolution)
    what = "images" if latent is None else f"latents of VAE {latent.vae}"
    if cfg.model.in_channels != channels:
        raise RaydiffError(f"config model.in_channels={cfg.model.in_channels} does not fit "
                           f"{data}: its {what} have {channels} channels (pass --set "
                           f"model.in_channels={channels})")
    la = cfg.latent
    if latent is None:
        if la.vae:
            raise RaydiffError(f"config latent.vae={la.vae!r} but {data} holds images, not "
                               "latents (prepare it with --latents)")
        fitted = la
    else:
        found = {"vae": latent.vae, "sha256": latent.sha256, "scale": latent.scale,
                 "image_resolution": info.resolution}
        if la.vae:
            for key, value in found.items():
                if getattr(la, key) not in (value, "", 0):
                    raise RaydiffError(f"config latent.{key}={getattr(la, key)!r} does not fit "
                                       f"{data}: its latents have {key} {value!r}")
        fitted = dataclasses.replace(la, **found)
    model = dataclasses.replace(cfg.model, num_classes=info.num_classes, resolution=side)
    return dataclasses.replace(cfg, model=model, latent=fitted)


def check_resume(job: TrainJob) -> int:
    """The step a relaunch resumes from (0 for a new run); refuses a checkpoint of another
    network or dataset before any worker starts."""
    latest = runtime.latest_registered(job.storage, job.name)
    if latest is None:
        return 0
    dir_name, step = latest
    found = config_lib.from_dict(Folder(run_dir(job.storage, job.name)).read_json(
        f"{dir_name}/config.json"))
    diffs = describe_mismatch(found.model, job.cfg.model)
    for f in dataclasses.fields(config_lib.LatentConfig):  # same shapes, another space
        was, now = getattr(found.latent, f.name), getattr(job.cfg.latent, f.name)
        if was != now:
            diffs.append(f"latent.{f.name}: checkpoint {was!r}, requested {now!r}")
    if diffs:
        raise RaydiffError(f"cannot resume run {job.name!r} from {dir_name} with data "
                           f"{job.data}: " + "; ".join(diffs))
    return step


def check_batch(job: TrainJob, info: parquet.DatasetInfo) -> None:
    batch = job.cfg.optim.batch_size
    if batch % job.workers:
        raise RaydiffError(f"optim.batch_size={batch} does not split evenly over "
                           f"{job.workers} workers")
    if info.num_images("train") < batch:
        raise RaydiffError(f"{job.data} has {info.num_images('train')} training images, fewer "
                           f"than one batch (optim.batch_size={batch})")


# --- the data pipeline ----------------------------------------------------------------------

def decoded_bytes(info: parquet.DatasetInfo, cfg: Config) -> int:
    """The training split's size as the workers read it: uint8 pixels, or both latent
    columns of a latent dataset."""
    if info.latent is not None:
        row = int(np.prod(info.latent.row_shape)) * np.dtype(info.latent.dtype).itemsize
        return info.num_images("train") * len(parquet.LATENT_COLUMNS) * row
    return info.num_images("train") * info.resolution ** 2 * cfg.model.in_channels


def in_memory(info: parquet.DatasetInfo, cfg: Config) -> bool:
    """Whether the training split is held in memory rather than streamed through Ray Data.

    In memory (up to ``train.in_memory_max_images`` images, 2 GiB decoded: the shapes,
    CIFAR-LT, TinyImageNet-LT at 64 px), the driver decodes the split once (CIFAR-10-LT's 12k
    PNGs in well under a second) and every worker reads the arrays zero-copy from its node's
    object store and draws its epochs with ``raydiff.data.resample.epoch_batches``: a global
    permutation every epoch (or the released BRS draws), the same on every worker and on a
    resumed run. A Ray Data pipeline costs a coordinator actor, read tasks and an execution
    per epoch: seconds a run for a small split (``benchmarks/train_data_start.py``)."""
    return (info.num_images("train") <= cfg.train.in_memory_max_images
            and decoded_bytes(info, cfg) <= DECODE_ONCE_MAX_BYTES)


def build_dataset(data: str, info: parquet.DatasetInfo, cfg: Config):
    """The Ray Data pipeline of a split too large to hold in memory; every iteration over it
    is a new epoch.

    A split whose decoded images fit in ``DECODE_ONCE_MAX_BYTES`` is decoded once by Ray Data
    tasks and kept in the object store in blocks of about ``_BLOCK_BATCHES`` batches; each
    epoch then only reorders those blocks. A larger split streams: every epoch reads and
    decodes the Parquet shards again. Each worker shuffles locally (a buffer of
    ``_SHUFFLE_BUFFER_BATCHES`` batches); flips (and a latent dataset's posterior samples)
    are drawn by the worker, on its device (``ModelInput``). Of a latent dataset only the
    latent columns are read.
    """
    import ray

    # The streaming split feeds training forever: its bars and banners would only repeat the
    # progress line.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = runtime.verbose()
    decode_once = decoded_bytes(info, cfg) <= DECODE_ONCE_MAX_BYTES
    blocks = max(1, info.num_images("train") // (_BLOCK_BATCHES * cfg.optim.batch_size))
    if info.latent is None:
        columns, decode = ["image", "label"], {"fn": parquet.decode_training_batch,
                                               "batch_format": "numpy"}
    else:  # only the latent columns are read; the images stay on storage
        columns = [*parquet.LATENT_COLUMNS, "label"]
        decode = {"fn": parquet.LatentTrainingBatch(info.latent.row_shape),
                  "batch_format": "pyarrow"}
    ds = ray.data.read_parquet(parquet.split_paths(data, "train")).select_columns(columns)
    if decode_once:
        ds = ds.map_batches(**decode).repartition(blocks).materialize()
    ds = ds.randomize_block_order()
    if cfg.train.resample_factor > 0:
        rates = repeat_rates(info.counts("train"), cfg.train.resample_factor)
        # A global shuffle of the rows, every epoch: it spreads the copies of a row over the
        # epoch, as the released sampler's independent draws are (resample.py).
        ds = ds.map_batches(Resample(rates), batch_format="numpy").random_shuffle()
    return ds if decode_once else ds.map_batches(**decode)


# --- the worker -----------------------------------------------------------------------------

def _model_input(images: torch.Tensor, labels: torch.Tensor,
                 flip_generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC -> [-1, 1] NCHW; with a generator, each image is flipped horizontally with
    probability 1/2."""
    x0 = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if flip_generator is not None:
        flip = torch.rand(x0.shape[0], device=x0.device, generator=flip_generator) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
    return x0, labels.long()


def _latent_input(mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor,
                  generator: torch.Generator, hflip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a latent dataset -> one posterior sample each, float32 NCHW: x0 = mean + std *
    eps of the image or (``hflip``, probability 1/2) of its mirror, as the released CCUA-SiT
    code's ``vae.encode(flip(x)).latent_dist.sample() * scale`` draws it. Latents themselves
    are never flipped: the VAE is not mirror-symmetric."""
    rows = torch.arange(mean.shape[0], device=mean.device)
    mirrored = torch.zeros_like(rows)
    if hflip:
        mirrored = (torch.rand(mean.shape[0], device=mean.device, generator=generator)
                    < 0.5).long()
    m, s = mean[rows, mirrored].float(), std[rows, mirrored].float()
    eps = torch.randn(m.shape, device=m.device, generator=generator)
    return m + s * eps, labels.long()


class ModelInput:
    """A batch of training rows (a dict of tensors on the device) -> (x0, labels) for the
    engine: uint8 images to [-1, 1] (flipped with ``train.hflip``), or latent rows to
    posterior samples. ``generator`` draws the flips and the posterior noise (the worker
    seeds it by seed, rank and the step it starts from)."""

    def __init__(self, cfg: Config, generator: torch.Generator | None):
        self.latent, self.hflip, self.generator = bool(cfg.latent.vae), cfg.train.hflip, generator

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latent:
            return _latent_input(batch["latent_mean"], batch["latent_std"], batch["label"],
                                 self.generator, self.hflip)
        return _model_input(batch["image"], batch["label"],
                            self.generator if self.hflip else None)


def _stream_batches(shard, batch_size: int, device: torch.device,
                    model_input: ModelInput) -> Iterator[tuple]:
    """Endless batches from a Ray Data shard, epoch after epoch."""
    while True:
        for batch in shard.iter_torch_batches(
                batch_size=batch_size, drop_last=True, device=device,
                local_shuffle_buffer_size=_SHUFFLE_BUFFER_BATCHES * batch_size):
            yield model_input(batch)


def _memory_batches(arrays: dict[str, np.ndarray], cfg: Config, rank: int, world: int,
                    start_step: int, device: torch.device,
                    model_input: ModelInput) -> Iterator[tuple]:
    """Endless batches of a split held in memory (``arrays``: its columns, ``label`` among
    them): this worker's share of every global batch of ``epoch_batches``, from the batch of
    ``start_step`` on (a resumed run continues the epoch it stopped in)."""
    labels = arrays["label"]
    batch = cfg.optim.batch_size
    per_epoch = steps_per_epoch(len(labels), batch)
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        order = epoch_batches(len(labels), batch, cfg.train.seed, epoch, rank, world, labels,
                              cfg.model.num_classes, cfg.train.resample_factor)
        for rows in order[offset:]:
            yield model_input({name: torch.from_numpy(column[rows]).to(device)
                               for name, column in arrays.items()})
        epoch, offset = epoch + 1, 0


def replica_divergence(model: torch.nn.Module, device) -> float:
    """Spread of a weight fingerprint across workers: 0.0 when DDP kept every replica equal."""
    fingerprint = float(sum(p.detach().double().sum() for p in model.parameters()))
    high, neg_low = runtime.all_reduce([fingerprint, -fingerprint], device, op="max")
    return high + neg_low


class SideWork:
    """Rank 0's work on the EMA weights of a report that the other ranks need not wait for:
    the in-training evaluation (a search's objective) and the preview grid.

    At a report, rank 0 copies the EMA weights into a second network (on a GPU the copy is
    queued on the training stream, and the work waits for it on a CUDA stream of its own) and
    hands it to a thread; then every rank reports and trains on, nobody waiting at the report
    barrier while rank 0 samples. At most one piece of work is in flight: the next report
    first takes its result (waiting only if it is still running) and carries the evaluation as
    ``eval/<metric>`` keys with ``eval_step``, the step whose weights it measured (a search's
    Tune callback joins them with that step's training metrics:
    ``raydiff.distributed.tune.evaluation_reports``). The last one is taken after the loop and
    reported by every rank in one extra report. Previews go to the run's
    ``logs/samples_<step>.png`` and TensorBoard.
    """

    def __init__(self, engine: Engine, counts: list[int], runlog: RunLog,
                 quickeval: QuickEval | None, codec=None):
        self.engine, self.runlog, self.quickeval = engine, runlog, quickeval
        self.codec = codec  # decodes a latent-space model's previews
        self.head_to_tail = [int(c) for c in np.argsort(class_ranks(counts))]
        self.snapshot = copy.deepcopy(engine.ema.model)
        self.diffusion = make_process(engine.cfg.diffusion)
        cuda = engine.device.type == "cuda"
        self.stream = torch.cuda.Stream(engine.device) if cuda else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydiff-side")
        self.pending: Future | None = None

    def take(self) -> dict[str, float]:
        """The evaluation of the work in flight (waiting for it), with its ``eval_step``."""
        if self.pending is None:
            return {}
        done, self.pending = self.pending.result(), None
        return done

    def submit(self, step: int, preview: bool) -> None:
        if self.quickeval is None and not preview:
            return
        self.take()
        with torch.no_grad():
            for mine, ema in zip(self.snapshot.parameters(), self.engine.ema.model.parameters()):
                mine.copy_(ema, non_blocking=True)
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        self.pending = self.pool.submit(self._run, step, preview, ready)

    def _run(self, step: int, preview: bool, ready) -> dict[str, float]:
        with (torch.cuda.stream(self.stream) if self.stream is not None
              else contextlib.nullcontext()):
            if ready is not None:
                self.stream.wait_event(ready)
            out = {}
            if self.quickeval is not None:
                measured = self.quickeval(self.snapshot, self.engine.cfg)
                out = {"eval_step": step, **{f"eval/{k}": v for k, v in measured.items()}}
            if preview:
                self.runlog.add_image(class_grid(self.snapshot, self.diffusion, self.engine.cfg,
                                                 self.head_to_tail, self.codec), step)
            return out

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _report(engine: Engine, metrics: dict, is_ckpt: bool, runlog: RunLog | None,
            side: SideWork | None) -> None:
    """Every rank reports (a barrier); rank 0 alone writes checkpoint and logs, with the
    evaluation its side work finished since the last report, and starts the next."""
    if side is not None:
        metrics.update(side.take())
        side.submit(engine.step, preview=is_ckpt and engine.cfg.train.preview_per_class > 0)
    if is_ckpt:
        metrics["replica_divergence"] = replica_divergence(engine.model, engine.device)
    runtime.report(metrics, engine.step, engine.cfg.optim.total_steps, runlog,
                   save=engine.save if is_ckpt else None)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, str | None]:
    """The Ray Train worker function: resume, loop {batch, step, report, checkpoint}."""
    import ray
    import ray.train
    import ray.train.torch

    # DDP warns when 1x1-conv gradients come out channels-last on CPU; it costs nothing here.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    cfg = config_lib.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop_config["torch_threads"])
    device = ray.train.torch.get_device()
    counts = loop_config["class_counts"]
    prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    engine = Engine(cfg, device, rank, class_prior=prior,
                    wrap=(lambda m: ray.train.torch.prepare_model(m)) if world > 1 else None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            engine.load(directory)
    start_step = engine.step
    runlog = runtime.worker_runlog(loop_config, cfg, start_step, rank)
    side = None
    if rank == 0:
        codec = None
        needs_images = loop_config.get("eval") or cfg.train.preview_per_class > 0
        if cfg.latent.vae and needs_images:
            from raydiff.vae import LatentCodec

            codec = LatentCodec.open(cfg.latent.vae, cfg.latent.scale, device,
                                     sha256=cfg.latent.sha256 or None)
        quickeval = None
        if loop_config.get("eval"):
            reference = ray.get(loop_config["eval_reference"][0])
            quickeval = QuickEval(EvalSpec(**loop_config["eval"]), reference, device, codec)
        side = SideWork(engine, counts, runlog, quickeval, codec)
    generator = None
    if cfg.train.hflip or cfg.latent.vae:
        generator = torch.Generator(device).manual_seed(
            step_seed(cfg.train.seed, rank, start_step))
    model_input = ModelInput(cfg, generator)
    if loop_config.get("in_memory"):
        columns = ray.get(loop_config["in_memory"])
        names = [*parquet.LATENT_COLUMNS, "label"] if cfg.latent.vae else ["image", "label"]
        batches = _memory_batches(dict(zip(names, columns)), cfg, rank, world, start_step,
                                  device, model_input)
    else:
        batches = _stream_batches(ray.train.get_dataset_shard("train"),
                                  cfg.optim.batch_size // world, device, model_input)

    seen, tick = 0, time.perf_counter()
    total, tc = cfg.optim.total_steps, cfg.train
    while engine.step < total:
        x0, y = next(batches)
        engine.train_step(x0, y)  # queued on the device; the host learns the terms below
        seen += 1
        step = engine.step
        is_ckpt = step % tc.ckpt_every == 0 or step == total
        if not (is_ckpt or step % tc.log_every == 0):
            continue
        try:  # the interval's means over every worker: the one host synchronisation
            metrics = engine.collect()
        except NonFiniteLossError as err:  # every worker raises it, at the same report
            if side is not None:
                side.close()
            return runtime.stop_on_error(runlog, err)
        metrics.update(step=step, resumed_from=start_step,
                       images_per_s=seen * cfg.optim.batch_size / (time.perf_counter() - tick))
        _report(engine, metrics, is_ckpt, runlog, side)
        seen, tick = 0, time.perf_counter()
    last = side.take() if side is not None else {}
    if loop_config.get("eval"):  # every rank knows: one more report, the last evaluation's
        runtime.report({**last, "step": engine.step}, engine.step, total, runlog)
    if side is not None:
        side.close()
    if runlog is not None:
        runlog.close()
    return {"error": None}


# --- the driver -----------------------------------------------------------------------------

def prepare_job(job: TrainJob, cluster: bool = True) -> tuple[TrainJob, parquet.DatasetInfo, int]:
    """Validate the request against the data, the storage and (``cluster``: Ray must be up)
    the cluster's resources; no worker starts."""
    info = parquet.load_info(job.data)
    parquet.check_split(job.data, "train", info)
    job = dataclasses.replace(job, cfg=fit_config_to_data(job.cfg, info, job.data))
    if job.cfg.latent.vae:  # rank 0 decodes previews with it: found (or fetched) now or never
        from raydiff.vae import resolve_vae

        resolve_vae(job.cfg.latent.vae)
    check_batch(job, info)
    resumed = check_resume(job)
    if cluster:
        job.scaling.check()
    return job, info, resumed


def put_split(data: str) -> list:
    """A training split decoded into Ray's object store: ObjectRefs of [images, labels], or of
    [latent_mean, latent_std, labels] for a latent dataset."""
    import ray

    if parquet.load_info(data).latent is not None:
        return [ray.put(column) for column in parquet.read_latent_arrays(data, "train")]
    images, labels = parquet.read_split_arrays(data, "train")
    return [ray.put(images), ray.put(labels)]


def shared_split(job: TrainJob, info: parquet.DatasetInfo) -> TrainJob:
    """The job with its split put once, when it is held in memory: every trial of a search or
    study reads the same arrays instead of decoding and putting its own copy."""
    return dataclasses.replace(job, split_refs=put_split(job.data)) \
        if in_memory(info, job.cfg) else job


def build_trainer(job: TrainJob, info: parquet.DatasetInfo, callbacks: list | None = None):
    """The TorchTrainer of a checked job (``prepare_job``); Tune passes its report callback."""
    loop_config = {
        "config": job.cfg.to_dict(),
        "class_counts": list(info.counts("train")),
        "eval": dataclasses.asdict(job.eval) if job.eval else None,
        # in a list, so Ray hands the worker the reference, not its 100+ MB of statistics
        "eval_reference": [job.eval_reference],
    }
    datasets = None
    if in_memory(info, job.cfg):
        loop_config["in_memory"] = job.split_refs or put_split(job.data)
    else:
        datasets = {"train": build_dataset(job.data, info, job.cfg)}
    return runtime.torch_trainer(f"{__name__}:train_loop_per_worker", loop_config, job.scaling,
                                 job.storage, job.name, job.cfg.train.num_to_keep,
                                 datasets=datasets, callbacks=callbacks)


def run_training(job: TrainJob):
    """Check the job, fit the TorchTrainer; returns the Ray Train ``Result``."""
    job, info, resumed = prepare_job(job, cluster=False)  # every check that needs no Ray
    runtime.init_ray(job.workers * job.cpus_per_worker)
    job.scaling.check()
    if resumed:
        logger.info("resuming run %s from step %d", job.name, resumed)
    return runtime.fit(build_trainer(job, info))
