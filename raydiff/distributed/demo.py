"""``raydiff demo``: the whole pipeline on the built-in shapes dataset with a local Ray.

prepare (16 px shapes, 10 classes, 500 ... 50 training images) -> train the
``tiny-vpred`` preset with CCUA on Ray Train -> sample a class-balanced set on Ray Data ->
evaluate -> a short report (``report.md``: a sample grid per class, a metrics table, where the files are).

FID, KID, IS and P/R are measured in Inception's feature space when torch-fidelity's weights
can be had (a download, or ``--inception-weights``). Without them the demo says so in one line
and measures them in the feature space of a small classifier instead (``raydiff.classifier``:
a resnet10 of width 16, trained in this process on 90% of the balanced reference split in
seconds; its top-1 on the other 10% is reported), which also gives its top-1 on the samples
of each class group. Either way it reports class balance, training loss, sampling throughput,
and each group's distance from its samples to the nearest training image of their class (small
= copying, the failure of tail classes that CCUA addresses). Every stage resumes: running the
demo again reuses the dataset, the finished training run, the complete sample folder and the
feature classifier.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from raydiff import config as config_lib
from raydiff.data import parquet
from raydiff.data.prepare import builtin_dataset
from raydiff.data.resample import class_ranks
from raydiff.data.samples import read_samples
from raydiff.distributed import runtime
from raydiff.distributed.evaluate import EvalJob, run_evaluation
from raydiff.distributed.runtime import find_latest_checkpoint
from raydiff.distributed.sample import SampleJob, run_sampling
from raydiff.distributed.train import TrainJob, prepare_job, run_training
from raydiff.errors import RaydiffError
from raydiff.features import CLASSIFIER_PREFIX, WeightsUnavailable, resolve_weights
from raydiff.metrics import GROUPS, class_groups
from raydiff.report import class_rows_grid, metrics_table

DEMO_PRESET = "tiny-vpred"  # v-prediction: the tiny network draws its shapes within minutes
REPORT_FILE = "report.md"
GRID_FILE = "samples_grid.png"
FEATURE_CLASSIFIER = "feature-classifier"
_GRID_SCALE = 4  # 16 px tiles are hard to see at their size
_HOLDOUT_EVERY = 10  # every 10th reference image is held out of the feature classifier
# 97% top-1 on held-out 16 px shapes after 8 s on 2 cores (measured on the built-in dataset)
_CLASSIFIER = dict(arch="resnet10", width=16, epochs=8, batch_size=64, warmup_epochs=1.0)


@dataclass
class DemoReport:
    run_dir: Path
    lines: list[str] = field(default_factory=list)  # the summary printed at the end
    seconds: dict[str, float] = field(default_factory=dict)


def _timed(report: DemoReport, stage: str, start: float) -> None:
    report.seconds[stage] = round(time.monotonic() - start, 1)


def _train(args: argparse.Namespace, data: str, report: DemoReport) -> str:
    """The checkpoint of the finished demo run: trained now, or found from a previous demo."""
    overrides = [f"optim.total_steps={args.steps}"] if args.steps else []
    cfg = config_lib.resolve(DEMO_PRESET, overrides=overrides)
    # One worker with both cores: on 2 CPUs, DDP between two 1-thread workers is slower.
    job = TrainJob(data=data, cfg=cfg, storage=args.storage, name=args.name, workers=1,
                   cpus_per_worker=2.0, max_failures=1)
    start = time.monotonic()
    _, _, done = prepare_job(job)
    if done >= cfg.optim.total_steps:
        checkpoint = find_latest_checkpoint(args.storage, args.name)
        report.lines.append(f"training: reused the finished run ({done} steps)")
    else:
        checkpoint = run_training(job).checkpoint.path
    _timed(report, "train", start)
    log = Path(args.storage) / args.name / "logs" / "metrics.jsonl"
    losses = [r["loss"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
    if losses:
        report.lines.append(f"training: {cfg.optim.total_steps} steps of the {DEMO_PRESET} "
                            f"preset ({cfg.loss.method}), loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return checkpoint


def _sample(args: argparse.Namespace, checkpoint: str, report: DemoReport) -> str:
    out = str(report.run_dir / "samples")
    start = time.monotonic()
    result = run_sampling(SampleJob(checkpoint=checkpoint, out=out, per_class=args.per_class,
                                    actors=args.actors, forward_batch=16, shard_size=64,
                                    batch_size=32))
    _timed(report, "sample", start)
    speed = (f", {result.images_per_s:.1f} images/s on {args.actors} actors"
             if result.shards_sampled else " (already complete)")
    report.lines.append(f"sampling: {result.manifest['num_images']} images, {args.per_class} "
                        f"per class, DDIM {result.manifest['identity']['sampler']['steps']} steps"
                        f"{speed}")
    return out


def nearest_train_distance(images: np.ndarray, labels: np.ndarray, train_images: np.ndarray,
                           train_labels: np.ndarray) -> np.ndarray:
    """Per generated image: RMS pixel distance (in [0, 1]) to the nearest training image of
    its class. Near 0 means the sample copies a training image."""
    out = np.empty(len(images))
    flat = images.reshape(len(images), -1).astype(np.float32) / 255
    train_flat = train_images.reshape(len(train_images), -1).astype(np.float32) / 255
    for c in np.unique(labels):
        gen, train = flat[labels == c], train_flat[train_labels == c]
        d2 = (gen ** 2).sum(1)[:, None] + (train ** 2).sum(1)[None] - 2 * gen @ train.T
        out[labels == c] = np.sqrt(np.clip(d2.min(axis=1), 0, None) / flat.shape[1])
    return out


def _no_download_report(samples: str, data: str, report: DemoReport) -> None:
    info = parquet.load_info(data)
    images, labels, _ = read_samples(samples)
    counts = np.bincount(labels, minlength=info.num_classes)
    report.lines.append(f"class balance: {counts.min()} .. {counts.max()} images per class")
    head_to_tail = list(np.argsort(class_ranks(info.counts("train")), kind="stable"))
    grid = class_rows_grid(images, labels, head_to_tail, per_row=min(10, counts.max()))
    Image.fromarray(grid).resize((grid.shape[1] * _GRID_SCALE, grid.shape[0] * _GRID_SCALE),
                                 Image.NEAREST).save(report.run_dir / GRID_FILE)
    train_images, train_labels = parquet.read_split_arrays(data, "train")
    distance = nearest_train_distance(images, labels, train_images, train_labels)
    groups = class_groups(info.counts("train"))[labels]
    parts = [f"{name} {distance[groups == g].mean():.3f}" for g, name in enumerate(GROUPS)]
    report.lines.append("nearest training image, RMS pixel distance (lower = closer to copying): "
                        + ", ".join(parts))


def feature_classifier(data: str, out: Path) -> tuple[str, float]:
    """A small classifier of the reference split for the offline feature space, trained here
    (or found from a previous demo); its checkpoint and its top-1 on held-out images."""
    from raydiff.classifier import (
        META_FILE,
        ClassifierConfig,
        ClassifierFeatures,
        fit_to_data,
        train_classifier,
    )

    images, labels = parquet.read_split_arrays(data, "reference")
    held_out = np.arange(len(labels)) % _HOLDOUT_EVERY == 0
    if not (out / META_FILE).is_file():
        info = parquet.load_info(data)
        cfg = fit_to_data(ClassifierConfig(**_CLASSIFIER), info.num_classes, info.resolution,
                          images[~held_out])
        trainer = train_classifier(cfg, images[~held_out], labels[~held_out])
        trainer.save(out, {"data": data, "split": "reference",
                           "held_out": f"every {_HOLDOUT_EVERY}th reference image"})
    _, logits = ClassifierFeatures(out)(images[held_out])
    return str(out), float((logits.argmax(1) == labels[held_out]).mean())


def _evaluate(args: argparse.Namespace, samples: str, data: str, report: DemoReport) -> str:
    """The metrics table, in Inception's feature space or else in a classifier's."""
    start = time.monotonic()
    try:
        weights = str(resolve_weights(args.inception_weights, download=not args.no_download))
        features = "inception"
    except WeightsUnavailable as err:
        checkpoint, top1 = feature_classifier(data, report.run_dir / FEATURE_CLASSIFIER)
        _timed(report, "feature classifier", start)
        report.lines.append(f"Inception FID/KID/IS/PR skipped: {err}; measured in the feature "
                            f"space of a classifier of the reference split instead (top-1 "
                            f"{top1:.3f} on held-out reference images; IS over its classes)")
        weights, features = None, CLASSIFIER_PREFIX + checkpoint
    start = time.monotonic()
    result = run_evaluation(EvalJob(
        samples=samples, reference=data, groups=True, per_class=True, features=features,
        inception_weights=weights, actors=args.actors,
        reference_per_class=args.reference_per_class or 50, copying=not args.no_copy_metrics,
        out=str(report.run_dir / "eval")))
    _timed(report, "evaluate", start)
    table = metrics_table(result)
    report.lines.append(f"metrics ({result['feature_extractor']['name']} features, vs "
                        f"{result['sets']['overall']['num_reference']} reference images):"
                        f"\n{table}")
    return table


def _write_report(report: DemoReport, data: str, checkpoint: str, samples: str,
                  metrics: str) -> Path:
    files = [("dataset", data), ("checkpoint", checkpoint), ("samples", samples),
             ("sample grid (one row per class, head to tail)", report.run_dir / GRID_FILE),
             ("metrics", report.run_dir / "eval" / "metrics.json"),
             ("feature classifier (without the Inception weights)",
              report.run_dir / FEATURE_CLASSIFIER),
             ("training logs (TensorBoard)", report.run_dir / "logs")]
    text = "\n".join([
        "# raydiff demo", "",
        *[f"- {line}" for line in report.lines if "\n" not in line and line != metrics], "",
        "## Metrics", "", metrics, "",
        f"![samples]({GRID_FILE})", "",
        "## Files", "", *[f"- {what}: `{path}`" for what, path in files
                          if Path(path).exists()], "",
        "## Wall time (s)", "", *[f"- {k}: {v}" for k, v in report.seconds.items()], ""])
    path = report.run_dir / REPORT_FILE
    path.write_text(text)
    return path


def run_demo(args: argparse.Namespace) -> DemoReport:
    if args.per_class < 2:
        raise RaydiffError(f"--per-class must be at least 2, got {args.per_class}")
    begin = time.monotonic()
    report = DemoReport(run_dir=Path(args.storage) / args.name)
    cfg = config_lib.resolve(DEMO_PRESET)
    data = builtin_dataset(args.storage, cfg.model.resolution)
    runtime.init_ray(max(2.0, float(args.actors)))
    checkpoint = _train(args, data, report)
    samples = _sample(args, checkpoint, report)
    _no_download_report(samples, data, report)
    metrics = _evaluate(args, samples, data, report)
    report.seconds["total"] = round(time.monotonic() - begin, 1)
    path = _write_report(report, data, checkpoint, samples, metrics)
    report.lines.append(f"report: {path} ({report.seconds['total']:.0f} s in all)")
    return report


def run(args: argparse.Namespace) -> int:
    report = run_demo(args)
    print("\n".join(report.lines))
    return 0
