"""The ``raydiff`` command: one subcommand per job, errors as one clear line.

The parser is built from the standard library and ``raydiff.config`` alone: a command's module
(torch, Ray) is imported only to run it, so ``raydiff --help`` answers at once. Every verb names
a concept the same way (the README's "Command-line flags" table); spellings of an earlier
release are accepted as hidden aliases.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

from raydiff import config as config_lib
from raydiff.argcheck import OneLineParser, check_numbers
from raydiff.errors import RaydiffError

# Choices the parser offers, kept here so that building it imports nothing heavy;
# tests/test_cli.py holds each equal to the module that owns it.
SOURCES = ("shapes", "cifar10", "cifar100", "imagenet-lt", "places-lt", "imagefolder")
SAMPLE_FORMATS = ("parquet", "imagefolder", "npz")  # raydiff.data.samples.FORMATS
EVAL_METRICS = ("fid", "kid", "isc", "prc")  # raydiff.metrics.METRICS
METRIC_SUBSET = 10_000  # raydiff.accumulate.METRIC_SUBSET
MIX_RULES = ("none", "add:N", "topup")  # raydiff.data.mixing.RULES
DEFAULT_ROWS_PER_SHARD = 4096  # raydiff.data.parquet.DEFAULT_ROWS_PER_SHARD
LATENT_DTYPES = ("float16", "float32")  # raydiff.data.parquet.LATENT_DTYPES
# --preset when --data is given without one: the preset made for the dataset's image side
PRESET_BY_RESOLUTION = {16: "tiny-vpred", 32: "cifar32", 64: "imagenet64",
                        256: "sit-s2-imagenet-lt-256"}
BUILTIN_PRESET = "tiny-vpred"  # no --data: the built-in 16 px shapes

class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default (unless its help already says it) and hides old spellings."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (text and text != argparse.SUPPRESS and "default" not in text and action.option_strings
                and default is not None and default is not False and default != []
                and default is not argparse.SUPPRESS):
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text += f" (default: {shown})"
        return text

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "hidden_aliases", ())
        shown = [s for s in action.option_strings if s not in hidden]
        if not action.option_strings or shown == action.option_strings:
            return super()._format_action_invocation(action)
        return super()._format_action_invocation(argparse.Action(
            shown, action.dest, nargs=action.nargs, metavar=action.metavar,
            default=action.default, help=action.help))


class Parser(OneLineParser):
    """Every verb's parser: one-line errors, defaults and no old spellings in ``--help``."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str):
        for action in self._actions:  # name an option by its current spelling alone
            hidden = getattr(action, "hidden_aliases", ())
            if hidden:
                shown = "/".join(s for s in action.option_strings if s not in hidden)
                message = message.replace("/".join(action.option_strings), shown)
        super().error(message)


def alias(add, *names: str, old: tuple[str, ...], **kwargs) -> argparse.Action:
    """An option that also answers to the spellings in ``old``, which ``--help`` leaves out."""
    action = add(*names, *old, **kwargs)
    action.hidden_aliases = set(old)
    return action


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


# --- shared groups ----------------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset / --config / --method / --set, resolved in that order by ``resolve_config``."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", choices=sorted(config_lib.PRESETS),
                       help="named preset (default: the one for the dataset's image side: "
                            + ", ".join(f"{r} px {p}" for r, p in PRESET_BY_RESOLUTION.items())
                            + f"; {BUILTIN_PRESET} on the built-in data)")
    group.add_argument("--config", metavar="FILE",
                       help="a resolved config JSON (e.g. a run's config.json); replaces --preset")
    group.add_argument("--method", choices=config_lib.METHODS,
                       help="objective (same as --set loss.method=...)")
    group.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    group.add_argument("--dry-run", action="store_true",
                       help="print the resolved config as JSON and exit")


def resolve_config(args: argparse.Namespace, resolution: int | None = None,
                   data: str | None = None) -> config_lib.Config:
    """The config of a command: --config, else --preset, else the preset for the dataset's
    image side (said in one printed line), then --method and --set."""
    preset = args.preset
    if args.config is None and preset is None:
        if resolution is None:
            preset = BUILTIN_PRESET
        elif resolution in PRESET_BY_RESOLUTION:
            preset = PRESET_BY_RESOLUTION[resolution]
            print(f"raydiff: --preset {preset} (the preset for {resolution} px data such as "
                  f"{data}; pass --preset to choose)")
        else:
            raise RaydiffError(f"no preset is made for {resolution} px data ({data}); pass "
                               f"--preset ({', '.join(sorted(config_lib.PRESETS))}) or --config")
    overrides = ([f"loss.method={args.method}"] if args.method else []) + args.overrides
    return config_lib.resolve(preset, args.config, overrides)  # --config: preset is unused


def config_for_data(args: argparse.Namespace, data: str | None) -> config_lib.Config:
    resolution = None
    if data is not None:
        from raydiff.data.parquet import load_info

        resolution = load_info(data).resolution
    return resolve_config(args, resolution, data)


def add_run_arguments(parser: argparse.ArgumentParser, name_help: str) -> None:
    """Where a Ray run lives: ``--storage`` / ``--name``."""
    group = parser.add_argument_group("run")
    group.add_argument("--storage", default="runs",
                       help="where runs live: a local or shared path, or s3://bucket/prefix")
    group.add_argument("--name", help=name_help)


def add_worker_arguments(parser: argparse.ArgumentParser, what: str = "training run") -> None:
    group = parser.add_argument_group("Ray Train workers")
    alias(group.add_argument, "--workers", old=("--workers-per-trial",), dest="workers", type=int,
                       default=1, help=f"data-parallel (DDP) workers per {what}")
    group.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="GPUs per worker; 0 = CPU training with gloo")
    group.add_argument("--cpus-per-worker", type=float, default=1.0,
                       help="CPUs per worker; also its torch threads")
    add_placement_arguments(group)


def add_placement_arguments(group) -> None:
    group.add_argument("--autoscaler-config",
                       help="the cluster's autoscaler config (cluster.yaml): requests its node "
                            "types can never hold fail at once (default: "
                            "$RAYDIFF_AUTOSCALER_CONFIG, else ~/ray_bootstrap_config.yaml)")
    group.add_argument("--placement-timeout", type=float,
                       help="seconds to wait for new nodes when the cluster cannot place the "
                            "workers now; 0 refuses at once (default: $RAYDIFF_PLACEMENT_TIMEOUT, "
                            "else 600 with an autoscaler config, 0 without)")


def add_actor_arguments(parser: argparse.ArgumentParser, batch_help: str | None) -> None:
    group = parser.add_argument_group("Ray Data actors")
    group.add_argument("--actors", type=int, default=1, help="actors in the pool")
    group.add_argument("--gpus-per-actor", type=float, default=0.0,
                       help="GPUs per actor; 0 = CPU")
    group.add_argument("--cpus-per-actor", type=float, default=1.0,
                       help="CPUs per actor; also its torch threads")
    if batch_help:
        alias(group.add_argument, "--actor-batch", old=("--batch-size",), dest="actor_batch",
                           type=int, help=batch_help)


def add_inception_arguments(parser: argparse.ArgumentParser, per_class_default=None) -> None:
    group = parser.add_argument_group("feature extractor")
    group.add_argument("--inception-weights", metavar="PATH",
                       help="torch-fidelity's inception-v3-compat weights file (default: the "
                            "torch.hub cache, downloaded on first use)")
    group.add_argument("--no-download", action="store_true",
                       help="never download the Inception weights")
    group.add_argument("--reference-per-class", type=int, default=per_class_default,
                       help="use only the first N reference images of each class" + (
                           "" if per_class_default else " (default: all)"))


# --- verbs ------------------------------------------------------------------------------------

def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print a resolved config (preset + overrides)")
    add_config_arguments(p)
    p.set_defaults(run="raydiff.cli:_run_config")


def _run_config(args: argparse.Namespace) -> int:
    print(resolve_config(args).to_json())
    return 0


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="build a long-tailed dataset as Parquet shards",
        description="Build a long-tailed training split and a balanced reference split as "
                    "Parquet shards plus dataset.json. Sources: shapes (built in, no input), "
                    "cifar10/cifar100 (--root with the pickle folder), imagenet-lt/places-lt "
                    "(--root with the images and split lists), imagefolder (--root with one "
                    "subfolder per class).")
    add = p.add_argument
    add("source", choices=SOURCES, help="which dataset to build")
    add("--out", required=True,
        help="output folder (must not exist or be empty), or an s3:// / gs:// URI (built in a "
             "local temporary folder, then uploaded)")
    add("--root", type=Path, help="input folder: CIFAR pickles, image root, or class tree")
    add("--imbalance-ratio", type=float,
        help="n_max / n_min (default: cifar 100, shapes 10, class tree: no cut)")
    add("--resolution", type=int, help="output side in pixels (default: cifar/shapes 32, "
                                       "others 64)")
    add("--seed", type=int, default=0, help="selection and row-order seed (0 = released code)")
    alias(add, "--reference-from", old=("--reference",), dest="reference",
        help="the source split the balanced reference split comes from (default: cifar train, "
             "lists val; or test)")
    add("--train-list", help="list file of the training split (default: standard name in --root)")
    add("--reference-list", help="list file of the reference split (default: standard name)")
    add("--reference-root", type=Path, help="imagefolder: balanced tree to use as the reference split")
    add("--num-classes", type=int, help="shapes: kinds of object (default 10); lists: label range")
    add("--images-per-class", type=int,
        help="n_max: shapes pool size (default 500); imagefolder cap")
    alias(add, "--processes", old=("--workers",), dest="workers", type=int, metavar="N",
        help="decode/encode processes on this machine (default: its CPUs)")
    add("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD, help="rows per Parquet file")
    add("--overwrite", action="store_true", help="replace an existing prepared dataset at --out")
    group = p.add_argument_group("latents (for latent-space backbones such as SiT)")
    group.add_argument("--latents", metavar="VAE",
                       help="also store the training split's VAE latents: sd-vae-ft-ema (the "
                            "paper's; downloaded once into $RAYDIFF_VAE_CACHE, default "
                            "~/.cache/raydiff/vae) or a folder with config.json and "
                            "diffusion_pytorch_model.safetensors; encoded in Ray Data actors, "
                            "one per GPU when the cluster has GPUs")
    group.add_argument("--latent-scale", type=float,
                       help="latents = VAE posterior x this (default: 0.18215)")
    group.add_argument("--latent-dtype", choices=LATENT_DTYPES,
                       help="storage type of the latent columns (default: float16)")
    p.set_defaults(run="raydiff.cli:_run_prepare")


def _run_prepare(args: argparse.Namespace) -> int:
    from raydiff.data import prepare

    encode = None
    if args.latents:  # the Ray layer encodes; a dataset without latents needs no Ray
        from raydiff.distributed.latents import encode_train_split as encode
    return prepare.run(args, encode)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a diffusion model with Ray Train")
    p.add_argument("--data", help="a prepared dataset (default: the built-in shapes dataset)")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's "
                                             "optim.total_steps)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="worker failures to recover from the latest checkpoint; 0 = none")
    add_run_arguments(p, "run name; the same name and storage resume (default: "
                         "<preset>-<method>)")
    add_config_arguments(p)
    add_worker_arguments(p)
    p.set_defaults(run="raydiff.cli:_run_train")


def _run_train(args: argparse.Namespace) -> int:
    from raydiff.data.parquet import load_info
    from raydiff.data.prepare import builtin_dataset
    from raydiff.distributed.train import TrainJob, fit_config_to_data, run_training

    cfg = config_for_data(args, args.data)
    if args.steps is not None:
        cfg = config_lib.apply_overrides(cfg, {"optim.total_steps": args.steps})
    data = args.data
    if data is None and not args.dry_run:
        data = builtin_dataset(args.storage, cfg.model.resolution)
    if data is not None:
        cfg = fit_config_to_data(cfg, load_info(data), data)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    name = args.name or f"{cfg.preset}-{cfg.loss.method}"
    job = TrainJob(data=data, cfg=cfg, storage=args.storage, name=name, workers=args.workers,
                   gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                   max_failures=args.max_failures)
    result = run_training(job)
    metrics = result.metrics or {}
    print(f"trained {name}: step {metrics.get('step', '?')}, "
          f"loss {metrics.get('loss', float('nan')):.4f}")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate a class-balanced synthetic dataset with Ray Data",
        description="Sample --per-class images of every class (or of --classes) from a "
                    "checkpoint's EMA weights. The same command gives the same images whatever "
                    "--actors or --actor-batch; run again, it samples only what is missing.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--out", required=True, help="output folder (new, or this run's to resume)")
    p.add_argument("--per-class", type=int, required=True, help="images per class")
    p.add_argument("--classes", type=_int_list, help="comma-separated class indices "
                                                     "(default: all)")
    p.add_argument("--sampler", choices=("ddim", "ddpm", "euler", "heun", "sde"),
                   help="ddim or ddpm for DDPM checkpoints; euler, heun (ODE) or sde for flow "
                        "matching ones (default: the checkpoint config's sample.sampler)")
    alias(p.add_argument, "--sample-steps", old=("--steps",), dest="sample_steps", type=int,
                   help="DDIM steps, or the flow sampler's integration steps (default: the "
                        "checkpoint config's sample.steps)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance w in eps_c + w (eps_c - eps_u) (velocities "
                        "under flow matching); 0 = none "
                        "(default: the checkpoint config's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the network in each actor (default: the checkpoint "
                        "config's sample.compile); compiled kernels round differently, so a "
                        "compiled run is another run")
    p.add_argument("--format", choices=SAMPLE_FORMATS, default="parquet",
                   help="parquet shards (always written), plus an imagefolder tree or an ADM npz")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed * 2**32 + i")
    p.add_argument("--forward-batch", type=int, default=32,
                   help="images per network call; fixes the bytes, so part of the run")
    p.add_argument("--shard-size", type=int, default=1024,
                   help="images per Parquet shard: the unit of resume and of an actor's work "
                        "(each actor writes whole shards)")
    add_actor_arguments(p, "images per actor call, rounded down to whole shards (default: "
                           "one shard)")
    p.set_defaults(run="raydiff.cli:_run_sample")


def _run_sample(args: argparse.Namespace) -> int:
    from raydiff.distributed.sample import SampleJob, run_sampling

    job = SampleJob(
        checkpoint=args.checkpoint, out=args.out, per_class=args.per_class, classes=args.classes,
        sampler=args.sampler, steps=args.sample_steps, guidance=args.guidance,
        compile=args.compile, format=args.format, actors=args.actors,
        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
        batch_size=args.actor_batch, forward_batch=args.forward_batch,
        shard_size=args.shard_size, seed=args.seed)
    result = run_sampling(job)
    manifest = result.manifest
    if result.shards_sampled:
        print(f"sampled {result.shards_sampled} shards ({result.images_per_s:.1f} images/s); "
              f"{result.shards_kept} were already on disk")
    else:
        print(f"all {manifest['num_shards']} shards were already on disk")
    print(f"{manifest['num_images']} images, {manifest['identity']['per_class']} per class, "
          f"in {args.out} (formats: {', '.join(manifest['formats'])})")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="FID/KID/IS/PR of a sample folder against a reference split",
        description="Features of the samples and of the reference split in Ray Data actors; "
                    "FID, KID, Inception Score, Precision/Recall (k = 3), copy rate and "
                    "diversity (against the training split's features) overall, per "
                    "head/body/tail group and per class. Writes metrics.json and metrics.png.")
    p.add_argument("--samples", required=True, help="a 'raydiff sample' output folder")
    alias(p.add_argument, "--data", old=("--reference",), dest="data",
                   help="a prepared dataset (required): its balanced reference split, and its "
                        "training counts for the head/body/tail groups")
    p.add_argument("--metrics", type=_name_list, default=EVAL_METRICS,
                   help=f"comma-separated subset of {','.join(EVAL_METRICS)}")
    p.add_argument("--groups", action="store_true",
                   help="also per head / body / tail third and per many / medium / few-shot "
                        "group (empty groups are left out)")
    alias(p.add_argument, "--per-class-fid", old=("--per-class",), dest="per_class_fid",
                   action="store_true", help="also FID per class, and its mean")
    p.add_argument("--metric-subset", type=int, default=METRIC_SUBSET, metavar="N",
                   help="images per set and side for KID, precision/recall, copy rate and "
                        "diversity: a seeded subset, the same on any number of actors (FID, IS "
                        f"and the classifier's top-1 use every image; default: {METRIC_SUBSET:,})")
    p.add_argument("--no-copy-metrics", action="store_true",
                   help="skip the copy rate and diversity of each set (they need the features "
                        "of the dataset's training split, cached like the reference's)")
    p.add_argument("--features", default="inception", metavar="inception|classifier:CKPT",
                   help="feature space: torch-fidelity's Inception (default), or the penultimate "
                        "layer of a 'raydiff classify' checkpoint or run folder (no download; "
                        "also reports its top-1 on the samples per class and group)")
    add_inception_arguments(p)
    p.add_argument("--cache-dir", help="reference feature cache "
                                       "(default: ~/.cache/raydiff/reference-features)")
    p.add_argument("--out", help="where metrics.json and metrics.png go (default: --samples)")
    add_actor_arguments(p, "images per feature batch (default: 128)")
    p.set_defaults(run="raydiff.cli:_run_evaluate")


def _run_evaluate(args: argparse.Namespace) -> int:
    from raydiff.distributed.evaluate import CHART_FILE, METRICS_FILE, EvalJob, run_evaluation
    from raydiff.report import metrics_table
    from raydiff.storage import Folder

    if args.data is None:
        raise RaydiffError("--data DATASET_DIR is required: the dataset whose reference split "
                           "the samples are compared with")
    job = EvalJob(
        samples=args.samples, reference=args.data, metrics=args.metrics, groups=args.groups,
        per_class=args.per_class_fid, features=args.features,
        inception_weights=args.inception_weights,
        download=not args.no_download, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, batch_size=args.actor_batch or EvalJob.batch_size,
        reference_per_class=args.reference_per_class, metric_subset=args.metric_subset,
        cache_dir=args.cache_dir, out=args.out, copying=not args.no_copy_metrics)
    result = run_evaluation(job)
    print(metrics_table(result))
    if "per_class_fid_mean" in result:
        print(f"per-class FID, mean over classes: {result['per_class_fid_mean']:.2f}")
    if "classifier_accuracy" in result:
        accuracy = result["classifier_accuracy"]
        groups = {**accuracy["groups"], **accuracy["shot_groups"]}
        print("classifier top-1 on the generated images: " + ", ".join(
            f"{name} {group['top1']:.3f}" for name, group in groups.items()
            if group["top1"] is not None))
    out = Folder(args.out or args.samples)
    print(f"reference features: cache {result['reference_cache']}; wrote "
          f"{out.uri(METRICS_FILE)} and {out.uri(CHART_FILE)}")
    return 0


def _add_classify(sub) -> None:
    defaults = config_lib.ClassifierConfig()
    p = sub.add_parser(
        "classify", help="train a classifier on real (+ synthetic) data with Ray Train and "
                         "report top-1 per class group",
        description="Train a torchvision ResNet on a prepared dataset's training split, "
                    "optionally with balanced synthetic samples, with Ray Train (DDP); evaluate "
                    "top-1 on the balanced reference split overall, per class, per many (>100 "
                    "training images) / medium / few (<20) shot group and per head/body/tail "
                    "third. Writes results.json and results.png into the run folder "
                    "(--storage/--name); the same command again resumes. --compare RUN_DIR ... "
                    "prints a table of runs.")
    alias(p.add_argument, "--data", old=("--train",), dest="data", metavar="DATASET_DIR",
                   help="a prepared dataset")
    p.add_argument("--synthetic", nargs="+", action="extend", default=[], metavar="SAMPLES_DIR",
                   help="'raydiff sample' folders to mix in (repeatable)")
    p.add_argument("--mix", help=f"{' | '.join(MIX_RULES)}: N synthetic images per class, or "
                                 "every class up to the head count (default: topup with "
                                 "--synthetic, none without)")
    p.add_argument("--split", choices=("train", "reference"), default="train",
                   help="train on the long-tailed split or the balanced reference split, for a "
                        "feature extractor ('evaluate --features classifier:RUN')")
    add_run_arguments(p, "run name (default: classify-<arch>)")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                   help="print (and with --out write comparison.md into OUT) a table of finished "
                        "runs, then exit")
    p.add_argument("--out", help="with --compare: where comparison.md goes; otherwise the run "
                                 "folder itself, in place of --storage/--name")
    p.add_argument("--max-failures", type=int, default=2,
                   help="worker failures to recover from the latest checkpoint; 0 = none")
    group = p.add_argument_group("classifier (defaults: the CIFAR-LT recipe)")
    group.add_argument("--arch", choices=config_lib.CLASSIFIER_ARCHS, default=defaults.arch)
    group.add_argument("--width", type=int, default=defaults.width,
                       help="stem channels, stages x1 x2 x4 x8")
    group.add_argument("--epochs", type=int, default=defaults.epochs)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="global training batch, split over the workers")
    group.add_argument("--lr", type=float, default=defaults.lr or None,
                       help="peak learning rate (default: 0.1 x batch size / 128)")
    group.add_argument("--momentum", type=float, default=defaults.momentum, help=">= 0")
    group.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help=">= 0")
    group.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs,
                       help="linear warm-up, then cosine decay to 0")
    group.add_argument("--crop-padding", type=int,
                       help="random-crop padding in px; 0 = no crop (default: resolution / 8)")
    group.add_argument("--no-hflip", action="store_true", help="no random horizontal flips")
    group.add_argument("--seed", type=int, default=defaults.seed,
                       help="initial weights, epoch order, augmentation")
    group.add_argument("--ckpt-every", type=int, default=defaults.ckpt_every,
                       help="epochs between checkpoints")
    add_worker_arguments(p)
    p.set_defaults(run="raydiff.cli:_run_classify")


def _run_classify(args: argparse.Namespace) -> int:
    from raydiff.distributed.classify import (
        CHART_FILE,
        COMPARISON_FILE,
        RESULTS_FILE,
        ClassifyJob,
        compare,
        run_classify,
    )
    from raydiff.report import comparison_table

    if args.compare:
        print(compare(args.compare, args.out))
        if args.out:
            print(f"wrote {args.out.rstrip('/')}/{COMPARISON_FILE}")
        return 0
    if not args.data:
        raise RaydiffError("--data DATASET_DIR is required (or --compare RUN_DIR ...)")
    cfg = config_lib.ClassifierConfig(
        arch=args.arch, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr or 0.0, momentum=args.momentum, nesterov=args.nesterov,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        crop_padding=-1 if args.crop_padding is None else args.crop_padding,
        hflip=not args.no_hflip, seed=args.seed, ckpt_every=args.ckpt_every)
    out = args.out or f"{args.storage.rstrip('/')}/{args.name or 'classify-' + cfg.arch}"
    job = ClassifyJob(data=args.data, out=out, cfg=cfg, synthetic=tuple(args.synthetic),
                      mix=args.mix, split=args.split, workers=args.workers,
                      gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                      max_failures=args.max_failures)
    results = run_classify(job)
    print(comparison_table([(out, results)]))
    print(f"checkpoint: {results['checkpoint']}; wrote {out.rstrip('/')}/{RESULTS_FILE} and "
          f"{CHART_FILE}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="the whole pipeline on the built-in dataset: prepare, train, sample, "
                     "evaluate, report",
        description="The whole pipeline on the built-in long-tailed shapes dataset (16 px): "
                    "prepare, train the tiny-vpred preset (CCUA) with Ray Train, sample with "
                    "Ray Data, evaluate, and write report.md with a sample grid. Each stage is "
                    "reused when it is already done.")
    add_run_arguments(p, "run name (default: demo)")
    p.set_defaults(name="demo")
    p.add_argument("--steps", type=int, help="training steps (default: the tiny-vpred preset's, "
                                             "1500)")
    p.add_argument("--per-class", type=int, default=20, help="generated images per class")
    p.add_argument("--actors", type=int, default=2, help="sampling and feature actors")
    p.add_argument("--metric-subset", type=int, default=METRIC_SUBSET, metavar="N",
                   help="images per set and side for KID, precision/recall, copy rate and "
                        "diversity: a seeded subset, the same on any number of actors (FID, IS "
                        f"and the classifier's top-1 use every image; default: {METRIC_SUBSET:,})")
    p.add_argument("--no-copy-metrics", action="store_true",
                   help="skip the copy rate and diversity (they need the features of the "
                        "2040 training images too)")
    add_inception_arguments(p, per_class_default=50)
    p.set_defaults(run="raydiff.distributed.demo:run")


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="search loss weights and t_align with Ray Tune")
    add = p.add_argument
    add("--data", required=True, help="a prepared dataset")
    add("--space", help="search space file (YAML or JSON) (default: alpha, gamma, t_align, tau)")
    add("--trials", type=int, default=8, help="trials to sample (grid values multiply this)")
    alias(add, "--objective", old=("--metric",), dest="objective", default="fid_tail",
        help="what to optimise: fid_tail, fid, fid_head, fid_body (Inception features: needs "
             "the weights), fd_pixels_tail, ... (8x8 pixel statistics: no download), "
             "FEATURES:METRIC for the sample metrics in either space (pixels:diversity_tail, "
             "inception:copy_rate_tail), or a training loss (loss, ddpm, ucl, al). Diversity is "
             "maximised, every other metric minimised. Recorded in the search folder: a resumed "
             "search keeps it (default: fid_tail)")
    add("--max-concurrent-trials", type=int,
        help="run at most this many trials at once (default: as many as the cluster can hold, "
             "at its largest when it autoscales)")
    add("--scheduler", default="asha", choices=("asha", "fifo"),
        help="asha stops weak trials early")
    alias(add, "--steps", old=("--max-steps",), dest="steps", type=int, default=2000,
        help="training steps per trial")
    add("--eval-every", type=int, help="steps between evaluations (default: --steps / 4)")
    add("--eval-per-class", type=int, default=10, help="images per class at each evaluation")
    add("--eval-steps", type=int, default=10, help="DDIM steps at each evaluation")
    add("--inception-weights", metavar="PATH",
        help="InceptionV3 weights file (default: the torch.hub cache, or a download)")
    add("--reference-per-class", type=int, default=100,
        help="reference images per class in the reference statistics")
    add_run_arguments(p, "search name; the same name and storage resume the search (default: "
                         "<preset>-search)")
    add_config_arguments(p)
    add_worker_arguments(p, "trial")
    p.set_defaults(run="raydiff.distributed.tune:run", needs_config=True)


def _add_study(sub) -> None:
    p = sub.add_parser(
        "study", help="compare methods x seeds at an equal budget: train (Ray Tune grid), "
                      "sample, evaluate, tabulate",
        description="Train every variant (--methods) once per seed (--seeds) at the same "
                    "budget as a Ray Tune grid, sample the same class-balanced set from each "
                    "and evaluate it on Ray Data, then write study.md (mean and 95% interval "
                    "over seeds per class group, and the difference to the first variant), "
                    "study.json and study.png. The same command again resumes.")
    add = p.add_argument
    add("--data", help="a prepared dataset (default: the built-in shapes dataset)")
    add("--methods", nargs="+", default=["ddpm", "cbdm", "ccua"], metavar="VARIANT",
        help="variants to compare, the first being the baseline of the differences: ddpm, "
             "cbdm, ccua, or LABEL:section.key=value,...")
    add("--seeds", default="0,1,2", help="comma-separated training seeds")
    add("--steps", type=int, help="training steps of every run (default: the preset's)")
    add("--per-class", type=int, default=50, help="generated images per class and run")
    add("--features", default="auto", metavar="auto|inception|classifier:CKPT",
        help="feature space of every evaluation (default auto: Inception when its weights can "
             "be had, else a classifier of the reference split trained by the study)")
    add_run_arguments(p, "study name; the same name and storage resume it (default: "
                         "<preset>-study)")
    add_inception_arguments(p)
    add_config_arguments(p)
    add_worker_arguments(p, "run")
    add_actor_arguments(p, None)
    p.set_defaults(run="raydiff.distributed.study:run", needs_config=True)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="raydiff", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="raydiff's debug logging, Ray's own progress lines, and the "
                             "traceback behind an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (_add_config, _add_prepare, _add_train, _add_sample, _add_evaluate,
                _add_classify, _add_demo, _add_tune, _add_study):
        add(sub)
    return check_numbers(parser)


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except RaydiffError as err:  # argparse's refusal (UsageError): one line, as below
        print(f"raydiff: error: {err}", file=sys.stderr)
        return 2
    # -v: raydiff's own debug lines; other libraries stay at INFO (PIL alone logs two DEBUG
    # lines for every PNG it reads: 14,000 in one `raydiff -v demo`)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("raydiff").setLevel(logging.DEBUG if args.verbose else logging.NOTSET)
    if args.verbose:
        os.environ["RAYDIFF_VERBOSE"] = "1"  # Ray workers started from here inherit it
    try:
        if hasattr(args, "placement_timeout"):
            from raydiff.distributed.runtime import configure

            configure(args.autoscaler_config, args.placement_timeout)
        run = _load(args.run)
        if getattr(args, "needs_config", False):
            return int(run(args, config_for_data(args, args.data)) or 0)
        return int(run(args) or 0)
    except RaydiffError as err:
        if args.verbose:
            traceback.print_exc()
        print(f"raydiff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raydiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
