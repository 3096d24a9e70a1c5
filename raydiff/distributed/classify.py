"""``raydiff classify``: a classifier trained with Ray Train on long-tailed real data, optionally
mixed with balanced synthetic samples, evaluated on the balanced reference split.

The driver (``run_classify``) checks the request, reads the training split and the sample
folders, mixes them (``raydiff.data.mixing``) and puts the decoded arrays in Ray's object
store once; every worker reads them from there (zero-copy on its node) and trains on its
shard of every global batch (``raydiff.data.resample.epoch_batches``: disjoint shards, the same
number of steps on every worker, DDP all-reduces the gradients). The arrays are held in
memory: right for CIFAR-LT and for 64 px ImageNet-LT (about 1.4 GB); larger data would want a
Ray Data pipeline as ``raydiff train`` has.

Storage and resume are ``raydiff train``'s: the run folder ``--out`` is Ray Train's
``storage_path/name``; a checkpoint (``raydiff.classifier`` format) is written every
``ckpt_every`` epochs and at the end; running the same command again resumes from the
latest one Ray registered, a finished run is not trained again, and a worker that dies is
restarted from it (``--max-failures``). After the last epoch the workers evaluate their shares
of the reference split; the driver writes ``results.json`` (written whole) and
``results.png`` into the run folder.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raydiff.classifier import (
    META_FILE,
    ClassifierConfig,
    ClassifierTrainer,
    accuracy_report,
    config_differences,
    correct_counts,
    fit_to_data,
    predict,
)
from raydiff.data import parquet
from raydiff.data.mixing import MixedSet, MixRule, load_synthetic, mix
from raydiff.data.resample import steps_per_epoch
from raydiff.distributed import runtime
from raydiff.distributed.runtime import Scaling, find_latest_checkpoint, storage_and_name
from raydiff.engine import NonFiniteLossError
from raydiff.errors import RaydiffError
from raydiff.metrics import FEW_SHOT_BELOW, MANY_SHOT_ABOVE
from raydiff.runlog import RunLog
from raydiff.storage import Folder, to_buffer

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
CHART_FILE = "results.png"
COMPARISON_FILE = "comparison.md"
SPLITS = ("train", "reference")


@dataclass(frozen=True)
class ClassifyJob:
    """A ``raydiff classify`` request; the CLI and ``jobs/classify.py`` build one."""

    data: str  # a prepared dataset
    out: str  # the run folder (path or URI): checkpoints, logs, results.json, results.png
    cfg: ClassifierConfig = ClassifierConfig()
    synthetic: tuple[str, ...] = ()  # 'raydiff sample' folders
    mix: str | None = None  # a MixRule; None: topup with synthetic folders, none without
    split: str = "train"  # reference: the balanced split (a feature extractor for evaluate)
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    eval_batch_size: int = 256

    @property
    def scaling(self) -> Scaling:
        return Scaling(self.workers, self.cpus_per_worker, self.gpus_per_worker,
                       self.max_failures)


@dataclass
class ClassifyPlan:
    """A checked job and the data it trains and evaluates on."""

    job: ClassifyJob
    cfg: ClassifierConfig  # fitted to the data
    info: parquet.DatasetInfo
    mixed: MixedSet
    reference: tuple[np.ndarray, np.ndarray]
    done_steps: int  # where a relaunch resumes (0: a new run)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * steps_per_epoch(len(self.mixed.labels), self.cfg.batch_size)

    def record(self) -> dict:
        """What the checkpoints keep about the data; a relaunch must match it to resume."""
        return {"data": self.job.data, "split": self.job.split,
                "synthetic": list(self.job.synthetic),
                "mix": self.mixed.counts(self.info.class_names),
                "train_counts": list(self.info.counts("train")),
                "class_names": list(self.info.class_names)}


# --- driver-side checks -------------------------------------------------------------------------

def _mix_rule(job: ClassifyJob) -> MixRule:
    rule = MixRule.parse(job.mix or ("topup" if job.synthetic else "none"))
    if rule.kind != "none" and not job.synthetic:
        raise RaydiffError(f"--mix {rule} needs --synthetic SAMPLES_DIR")
    if rule.kind == "none" and job.synthetic:
        raise RaydiffError("--mix none with --synthetic: the samples would not be used")
    return rule


def _check_job(job: ClassifyJob) -> None:
    if job.workers < 1:
        raise RaydiffError(f"--workers must be at least 1, got {job.workers}")
    if job.split not in SPLITS:
        raise RaydiffError(f"--split {job.split!r}: expected one of {', '.join(SPLITS)}")
    if job.cfg.batch_size % job.workers:
        raise RaydiffError(f"--batch-size {job.cfg.batch_size} does not split evenly over "
                           f"{job.workers} workers")


def check_resume(job: ClassifyJob, cfg: ClassifierConfig, record: dict) -> int:
    """The step a relaunch resumes from (0: a new run); refuses a run of another classifier
    or another training set before any worker starts."""
    latest = find_latest_checkpoint(*storage_and_name(job.out))
    if latest is None:
        return 0
    meta = Folder(latest).read_json(META_FILE)
    diffs = config_differences(ClassifierConfig.from_dict(meta["config"]), cfg)
    diffs += [f"{key}: checkpoint {meta.get(key)!r}, requested {record[key]!r}"
              for key in ("split", "mix", "train_counts") if meta.get(key) != record[key]]
    if meta["epoch"] > cfg.epochs or (meta["epoch"] == cfg.epochs and "evaluation" not in meta):
        diffs.append(f"epochs: the run is at epoch {meta['epoch']}, --epochs {cfg.epochs} "
                     "would end it without its evaluation")
    if diffs:
        raise RaydiffError(f"cannot resume {job.out} from {posixpath.basename(latest)}: "
                           f"{diffs[0]}; choose another --out")
    return int(meta["step"])


def prepare_classify(job: ClassifyJob) -> ClassifyPlan:
    """Validate the request and read the data; needs no Ray (``check_resources`` does)."""
    _check_job(job)
    rule = _mix_rule(job)
    info = parquet.load_info(job.data)
    parquet.check_split(job.data, job.split, info)
    real_images, real_labels = parquet.read_split_arrays(job.data, job.split)
    synthetic_images, synthetic_labels = load_synthetic(job.synthetic, info, job.data)
    mixed = mix(real_images, real_labels, synthetic_images, synthetic_labels, rule,
                info.num_classes, source=", ".join(job.synthetic) or "no sample folder")
    if len(mixed.labels) < job.cfg.batch_size:
        raise RaydiffError(f"{job.data} gives {len(mixed.labels)} training images, fewer than "
                           f"one batch (--batch-size {job.cfg.batch_size})")
    # Normalisation statistics of the real images: synthetic ones must not move them.
    cfg = fit_to_data(job.cfg, info.num_classes, info.resolution, real_images)
    reference = ((real_images, real_labels) if job.split == "reference"
                 else parquet.read_split_arrays(job.data, "reference"))
    plan = ClassifyPlan(job, cfg, info, mixed, reference, done_steps=0)
    plan.done_steps = check_resume(job, cfg, plan.record())
    return plan


# --- the worker ---------------------------------------------------------------------------------

def _evaluate(trainer: ClassifierTrainer, images: np.ndarray, labels: np.ndarray, rank: int,
              world: int, batch_size: int) -> dict:
    """Per-class correct and total counts on the reference split, each worker a share."""
    mine = np.arange(len(labels))[rank::world]
    _, logits = predict(trainer.model, trainer.cfg, images[mine], batch_size, trainer.device)
    correct, total = correct_counts(logits.argmax(1), labels[mine], trainer.cfg.num_classes)
    summed = runtime.all_reduce(list(correct) + list(total), trainer.device)
    num_classes = trainer.cfg.num_classes
    return {"split": "reference", "correct": [int(v) for v in summed[:num_classes]],
            "total": [int(v) for v in summed[num_classes:]]}


def _report(trainer: ClassifierTrainer, metrics: dict, meta: dict | None,
            runlog: RunLog | None) -> None:
    """Every rank reports (a barrier); rank 0 writes the checkpoint, if any, and the log."""
    runtime.report(metrics, trainer.step, trainer.total_steps, runlog,
                   save=(lambda directory: trainer.save(directory, meta))
                   if meta is not None else None)


def classify_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, str | None]:
    """The Ray Train worker function: resume, then epochs {train, report, checkpoint}, then
    evaluate on the reference split."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = ClassifierConfig.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop_config["torch_threads"])
    device = ray.train.torch.get_device()
    images, labels = ray.get(loop_config["train"])
    per_epoch = steps_per_epoch(len(labels), cfg.batch_size)
    trainer = ClassifierTrainer(cfg, per_epoch, device, rank,
                                wrap=ray.train.torch.prepare_model if world > 1 else None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)
    start = trainer.step
    runlog = runtime.worker_runlog(loop_config, cfg, start, rank)
    while trainer.epoch < cfg.epochs:
        tick, steps = time.perf_counter(), per_epoch - trainer.step % per_epoch
        try:
            means = trainer.train_epoch(images, labels, world)
        except NonFiniteLossError as err:  # every worker sees it at the same step
            return runtime.stop_on_error(runlog, err)
        metrics = runtime.mean_over_workers(means, 1, device)
        metrics.update(step=trainer.step, epoch=trainer.epoch, resumed_from=start,
                       images_per_s=steps * cfg.batch_size / (time.perf_counter() - tick))
        meta = None
        if trainer.epoch == cfg.epochs or trainer.epoch % cfg.ckpt_every == 0:
            meta = {**loop_config["record"], "epoch": trainer.epoch}
            if trainer.epoch == cfg.epochs:
                meta["evaluation"] = _evaluate(trainer, *ray.get(loop_config["reference"]),
                                               rank, world, loop_config["eval_batch_size"])
                metrics["top1"] = sum(meta["evaluation"]["correct"]) / max(
                    1, sum(meta["evaluation"]["total"]))
        _report(trainer, metrics, meta, runlog)
    if runlog is not None:
        runlog.close()
    return {"error": None}


# --- the driver ---------------------------------------------------------------------------------

def build_trainer(plan: ClassifyPlan):
    """The TorchTrainer of a checked plan; the data travels through the object store."""
    import ray

    job = plan.job
    loop_config = {
        "config": plan.cfg.to_dict(),
        "record": plan.record(),
        # in lists, so Ray hands the workers references, not copies of the arrays
        "train": [ray.put(plan.mixed.images), ray.put(plan.mixed.labels)],
        "reference": [ray.put(plan.reference[0]), ray.put(plan.reference[1])],
        "eval_batch_size": job.eval_batch_size,
    }
    return runtime.torch_trainer(f"{__name__}:classify_loop_per_worker", loop_config, job.scaling,
                                 *storage_and_name(job.out), plan.cfg.num_to_keep)


def build_results(plan: ClassifyPlan, checkpoint: str, meta: dict, seconds: float) -> dict:
    """results.json: the mix, the classifier, and top-1 on the reference split by group."""
    info = plan.info
    evaluation = meta["evaluation"]
    report = accuracy_report(evaluation["correct"], evaluation["total"], info.counts("train"),
                             info.class_names)
    return {
        "kind": "raydiff-classify", "format_version": 1,
        "data": plan.job.data, "split": plan.job.split, "synthetic": list(plan.job.synthetic),
        "mix": meta["mix"], "train_counts": meta["train_counts"],
        "classifier": meta["config"], "checkpoint": checkpoint, "step": meta["step"],
        "evaluation": {"split": "reference", "on_training_data": plan.job.split == "reference",
                       "shot_thresholds": {"many_above": MANY_SHOT_ABOVE,
                                           "few_below": FEW_SHOT_BELOW},
                       **report},
        "seconds": round(seconds, 1),
    }


def write_results(out: str, results: dict) -> None:
    from raydiff.report import accuracy_chart

    folder = Folder(out)
    folder.write_json(RESULTS_FILE, results)
    folder.write_bytes(CHART_FILE, to_buffer(
        lambda f: accuracy_chart(results).save(f, format="PNG")))


def run_classify(job: ClassifyJob) -> dict:
    """Check, train (or resume, or reuse a finished run), evaluate; returns results.json."""
    start = time.monotonic()
    plan = prepare_classify(job)  # bad input fails here, before Ray starts
    runtime.init_ray(job.workers * job.cpus_per_worker)
    job.scaling.check()
    if plan.done_steps >= plan.total_steps:
        logger.info("classify: %s is finished (step %d); reusing it", job.out, plan.done_steps)
    else:
        if plan.done_steps:
            logger.info("classify: resuming %s from step %d", job.out, plan.done_steps)
        runtime.fit(build_trainer(plan))
    checkpoint = find_latest_checkpoint(*storage_and_name(job.out))
    meta = Folder(checkpoint).read_json(META_FILE)
    results = build_results(plan, checkpoint, meta, time.monotonic() - start)
    write_results(job.out, results)
    return results


def load_results(run: str) -> dict:
    folder = Folder(run)
    if not folder.is_file(RESULTS_FILE):
        raise RaydiffError(f"{folder.uri(RESULTS_FILE)} does not exist: not a finished "
                           "'raydiff classify' run")
    results = folder.read_json(RESULTS_FILE)
    if results.get("kind") != "raydiff-classify":
        raise RaydiffError(f"{folder.uri(RESULTS_FILE)} is not a 'raydiff classify' result")
    return results


def compare(runs: list[str], out: str | None = None) -> str:
    """The comparison table of finished runs (Markdown); written to OUT/comparison.md."""
    from raydiff.report import comparison_table

    table = comparison_table([(run, load_results(run)) for run in runs])
    if out is not None:
        Folder(out).write_bytes(COMPARISON_FILE, (table + "\n").encode("utf-8"))
    return table
