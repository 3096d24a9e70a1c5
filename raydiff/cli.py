"""The ``raydiff`` command: one subcommand per job, errors as one clear line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from raydiff import config as config_lib
from raydiff.argcheck import OneLineParser, check_numbers
from raydiff.errors import RaydiffError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset / --config / --method / --set, resolved in that order by ``config_from_args``."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", default="tiny", choices=sorted(config_lib.PRESETS),
                       help="named preset (default: tiny)")
    group.add_argument("--config", metavar="FILE",
                       help="a resolved config JSON (e.g. a run's config.json); replaces --preset")
    group.add_argument("--method", choices=config_lib.METHODS,
                       help="objective: ddpm, cbdm or ccua (same as --set loss.method=...)")
    group.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    group.add_argument("--dry-run", action="store_true",
                       help="print the resolved config as JSON and exit")


def config_from_args(args: argparse.Namespace) -> config_lib.Config:
    overrides = ([f"loss.method={args.method}"] if args.method else []) + args.overrides
    return config_lib.resolve(args.preset, args.config, overrides)


def _run_config(args: argparse.Namespace) -> int:
    print(config_from_args(args).to_json())
    return 0


def _add_config(subparsers) -> None:
    p = subparsers.add_parser("config", help="print a resolved config (preset + overrides)")
    add_config_arguments(p)
    p.set_defaults(func=_run_config)


def builtin_dataset(storage: str, resolution: int) -> str:
    """The built-in shapes dataset at ``resolution``, prepared once under ``storage``."""
    from raydiff.data.parquet import INFO_FILE
    from raydiff.data.prepare import PrepareOptions, prepare_dataset

    if "://" in storage:
        raise RaydiffError("--data is required when --storage is a URI")
    out = Path(storage) / "datasets" / f"shapes-{resolution}px"
    if not (out / INFO_FILE).is_file():
        print(f"preparing the built-in shapes dataset at {out}")
        prepare_dataset(PrepareOptions(source="shapes", out=out, resolution=resolution))
    return str(out)


def add_cluster_arguments(parser: argparse.ArgumentParser,
                          workers_flag: str = "--workers") -> None:
    group = parser.add_argument_group("cluster")
    group.add_argument(workers_flag, type=int, default=1, help="data-parallel workers")
    group.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="GPUs per worker (0 = CPU training with gloo)")
    group.add_argument("--cpus-per-worker", type=float, default=1.0)
    group.add_argument("--storage", default="runs",
                       help="run storage: a local/NFS path or s3://bucket/prefix (default: runs)")
    group.add_argument("--autoscaler-config",
                       help="the cluster's autoscaler config (cluster.yaml): requests its node "
                            "types can never hold fail at once (default: "
                            "$RAYDIFF_AUTOSCALER_CONFIG, else ~/ray_bootstrap_config.yaml)")
    group.add_argument("--placement-timeout", type=float,
                       help="seconds to wait for new nodes when the cluster cannot place the "
                            "workers now; 0 refuses at once (default: $RAYDIFF_PLACEMENT_TIMEOUT, "
                            "else 600 with an autoscaler config, 0 without)")


def _run_train(args: argparse.Namespace) -> int:
    from raydiff.data.parquet import load_info
    from raydiff.train import TrainJob, fit_config_to_data, run_training

    cfg = config_from_args(args)
    if args.workers < 1:
        raise RaydiffError(f"--workers must be at least 1, got {args.workers}")
    data = args.data
    if data is None and not args.dry_run:
        data = builtin_dataset(args.storage, cfg.model.resolution)
    if data is not None:
        cfg = fit_config_to_data(cfg, load_info(data))
    if args.dry_run:
        print(cfg.to_json())
        return 0
    name = args.name or f"{cfg.preset}-{cfg.loss.method}"
    job = TrainJob(data=data, cfg=cfg, storage=args.storage, name=name, workers=args.workers,
                   gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                   max_failures=args.max_failures)
    result = run_training(job)
    metrics = result.metrics or {}
    print(f"trained {name}: step {metrics.get('step', '?')}, loss {metrics.get('loss', float('nan')):.4f}")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    return 0


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a diffusion model with Ray Train")
    p.add_argument("--data", help="a prepared dataset (default: the built-in shapes dataset)")
    p.add_argument("--name", help="run name; the same name and storage resume (default: "
                                  "<preset>-<method>)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="worker failures to recover from the latest checkpoint (0 = none)")
    add_config_arguments(p)
    add_cluster_arguments(p)
    p.set_defaults(func=_run_train)


def _add_prepare(subparsers) -> None:
    from raydiff.data import prepare

    p = subparsers.add_parser("prepare", help="build a long-tailed dataset as Parquet shards")
    prepare.add_arguments(p)
    p.set_defaults(func=prepare.run)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _metric_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_actor_arguments(parser: argparse.ArgumentParser, batch_help: str) -> None:
    group = parser.add_argument_group("Ray Data actors")
    group.add_argument("--actors", type=int, default=1, help="actors in the pool (default: 1)")
    group.add_argument("--gpus-per-actor", type=float, default=0.0,
                       help="GPUs per actor (0 = CPU)")
    group.add_argument("--cpus-per-actor", type=float, default=1.0,
                       help="CPUs per actor; also its torch threads (default: 1)")
    group.add_argument("--batch-size", type=int, help=batch_help)


def _run_sample(args: argparse.Namespace) -> int:
    from raydiff.sample import SampleJob, run_sampling

    job = SampleJob(
        checkpoint=args.checkpoint, out=args.out, per_class=args.per_class, classes=args.classes,
        sampler=args.sampler, steps=args.steps, guidance=args.guidance, format=args.format,
        actors=args.actors, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
        forward_batch=args.forward_batch, shard_size=args.shard_size, seed=args.seed)
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


def _add_sample(subparsers) -> None:
    from raydiff.sample import FORMATS

    p = subparsers.add_parser(
        "sample", help="generate a class-balanced synthetic dataset with Ray Data",
        description="Sample --per-class images of every class (or of --classes) from a "
                    "checkpoint's EMA weights. The same command gives the same images whatever "
                    "--actors or --batch-size; run again, it samples only what is missing.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--out", required=True, help="output folder (new, or this run's to resume)")
    p.add_argument("--per-class", type=int, required=True, help="images per class")
    p.add_argument("--classes", type=_int_list, help="comma-separated class indices (default: all)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"),
                   help="default: the checkpoint config's sample.sampler")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the checkpoint config's)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance w in eps_c + w (eps_c - eps_u) (default: config)")
    p.add_argument("--format", choices=FORMATS, default="parquet",
                   help="parquet shards (always written), plus an imagefolder tree or an ADM npz")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed * 2**32 + i")
    p.add_argument("--forward-batch", type=int, default=32,
                   help="images per network call; fixes the bytes, so part of the run (default 32)")
    p.add_argument("--shard-size", type=int, default=1024,
                   help="images per Parquet shard, the unit of resume (default 1024)")
    add_actor_arguments(p, "rows per Ray Data batch (default: 4 x --forward-batch)")
    p.set_defaults(func=_run_sample)


def _run_evaluate(args: argparse.Namespace) -> int:
    from raydiff.evaluate import CHART_FILE, METRICS_FILE, EvalJob, run_evaluation
    from raydiff.storage import Folder
    from raydiff.report import metrics_table

    job = EvalJob(
        samples=args.samples, reference=args.reference, metrics=args.metrics, groups=args.groups,
        per_class=args.per_class, features=args.features,
        inception_weights=args.inception_weights,
        download=not args.no_download, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size or 32,
        reference_per_class=args.reference_per_class, cache_dir=args.cache_dir, out=args.out,
        copying=not args.no_copy_metrics)
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


def add_inception_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inception-weights", metavar="PATH",
                        help="torch-fidelity's inception-v3-compat weights file (default: the "
                             "torch.hub cache, downloaded on first use)")
    parser.add_argument("--no-download", action="store_true",
                        help="never download the Inception weights")
    parser.add_argument("--reference-per-class", type=int,
                        help="use only the first N reference images of each class")


def _add_evaluate(subparsers) -> None:
    from raydiff.metrics import METRICS

    p = subparsers.add_parser(
        "evaluate", help="FID/KID/IS/PR of a sample folder against a reference split",
        description="Inception features of the samples and of the reference split in Ray Data "
                    "actors; FID, KID, Inception Score, Precision/Recall (k = 3), copy rate and "
                    "diversity (against the training split's features) overall, "
                    "per head/body/tail group and per class. Writes metrics.json and metrics.png.")
    p.add_argument("--samples", required=True, help="a 'raydiff sample' output folder")
    p.add_argument("--reference", required=True,
                   help="a prepared dataset: its balanced reference split, and its training "
                        "counts for the head/body/tail groups")
    p.add_argument("--metrics", type=_metric_list, default=METRICS,
                   help=f"comma-separated subset of {','.join(METRICS)} (default: all)")
    p.add_argument("--groups", action="store_true",
                   help="also per head / body / tail third and per many / medium / few-shot "
                        "group (empty groups are left out)")
    p.add_argument("--per-class", action="store_true", help="also FID per class, and its mean")
    p.add_argument("--no-copy-metrics", action="store_true",
                   help="skip the copy rate and diversity of each set (they need the features "
                        "of the reference dataset's training split, cached like the reference's)")
    p.add_argument("--features", default="inception", metavar="inception|classifier:CKPT",
                   help="feature space: torch-fidelity's Inception (default), or the penultimate "
                        "layer of a 'raydiff classify' checkpoint or run folder (no download; "
                        "also reports its top-1 on the samples per class and group)")
    add_inception_arguments(p)
    p.add_argument("--cache-dir", help="reference feature cache "
                                       "(default: ~/.cache/raydiff/reference-features)")
    p.add_argument("--out", help="where metrics.json and metrics.png go (default: --samples)")
    add_actor_arguments(p, "images per Inception batch (default: 32)")
    p.set_defaults(func=_run_evaluate)


def _classifier_config(args: argparse.Namespace):
    from raydiff.classifier import ClassifierConfig

    return ClassifierConfig(
        arch=args.arch, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        crop_padding=args.crop_padding, hflip=not args.no_hflip, seed=args.seed,
        ckpt_every=args.ckpt_every)


def _run_classify(args: argparse.Namespace) -> int:
    from raydiff.classify import CHART_FILE, COMPARISON_FILE, RESULTS_FILE, ClassifyJob, compare, run_classify
    from raydiff.report import comparison_table

    if args.compare:
        print(compare(args.compare, args.out))
        if args.out:
            print(f"wrote {args.out.rstrip('/')}/{COMPARISON_FILE}")
        return 0
    if not args.train:
        raise RaydiffError("--train DATASET_DIR is required (or --compare RUN_DIR ...)")
    cfg = _classifier_config(args)
    out = args.out or f"{args.storage.rstrip('/')}/{args.name or 'classify-' + cfg.arch}"
    job = ClassifyJob(data=args.train, out=out, cfg=cfg, synthetic=tuple(args.synthetic),
                      mix=args.mix, split=args.split, workers=args.workers,
                      gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                      max_failures=args.max_failures)
    results = run_classify(job)
    print(comparison_table([(out, results)]))
    print(f"checkpoint: {results['checkpoint']}; wrote {out.rstrip('/')}/{RESULTS_FILE} and "
          f"{CHART_FILE}")
    return 0


def _add_classify(subparsers) -> None:
    from raydiff.classifier import ARCHS, ClassifierConfig
    from raydiff.data.mixing import RULES

    defaults = ClassifierConfig()
    p = subparsers.add_parser(
        "classify", help="train a classifier on real (+ synthetic) data with Ray Train and "
                         "report top-1 per class group",
        description="Train a torchvision ResNet on a prepared dataset's training split, "
                    "optionally with balanced synthetic samples, with Ray Train (DDP); evaluate "
                    "top-1 on the balanced reference split overall, per class, per many (>100 "
                    "training images) / medium / few (<20) shot group and per head/body/tail "
                    "third. Writes results.json and results.png into the run folder; the same "
                    "command again resumes. --compare RUN_DIR ... prints a table of runs.")
    p.add_argument("--train", metavar="DATASET_DIR", help="a prepared dataset")
    p.add_argument("--synthetic", nargs="+", action="extend", default=[], metavar="SAMPLES_DIR",
                   help="'raydiff sample' folders to mix in (repeatable)")
    p.add_argument("--mix", help=f"{' | '.join(RULES)}: N synthetic images per class, or every "
                                 "class up to the head count (default: topup with --synthetic)")
    p.add_argument("--split", choices=("train", "reference"), default="train",
                   help="train on the long-tailed split (default) or the balanced reference "
                        "split, for a feature extractor ('evaluate --features classifier:RUN')")
    p.add_argument("--out", help="the run folder (default: <storage>/<name>); with --compare, "
                                 "where comparison.md goes")
    p.add_argument("--name", help="run name under --storage when --out is not given "
                                  "(default: classify-<arch>)")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                   help="print (and with --out write) a table of finished runs, then exit")
    p.add_argument("--max-failures", type=int, default=2,
                   help="worker failures to recover from the latest checkpoint (0 = none)")
    group = p.add_argument_group("classifier (defaults: the CIFAR-LT recipe)")
    group.add_argument("--arch", choices=sorted(ARCHS), default=defaults.arch)
    group.add_argument("--width", type=int, default=defaults.width,
                       help=f"stem channels, stages x1 x2 x4 x8 (default {defaults.width})")
    group.add_argument("--epochs", type=int, default=defaults.epochs)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="global batch, split over the workers")
    group.add_argument("--lr", type=float, default=defaults.lr,
                       help="peak learning rate (default: 0.1 x batch size / 128)")
    group.add_argument("--momentum", type=float, default=defaults.momentum, help=">= 0")
    group.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help=">= 0")
    group.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs,
                       help="linear warm-up, then cosine decay to 0")
    group.add_argument("--crop-padding", type=int, default=defaults.crop_padding,
                       help="random-crop padding in px (default: resolution / 8; 0 = no crop)")
    group.add_argument("--no-hflip", action="store_true", help="no random horizontal flips")
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--ckpt-every", type=int, default=defaults.ckpt_every,
                       help="epochs between checkpoints")
    add_cluster_arguments(p)
    p.set_defaults(func=_run_classify)


def _add_demo(subparsers) -> None:
    from raydiff import demo

    p = subparsers.add_parser(
        "demo", help="the whole pipeline on the built-in dataset: prepare, train, sample, "
                     "evaluate, report",
        description=demo.__doc__.split("\n\n")[0])
    demo.add_arguments(p)
    add_inception_arguments(p)
    p.set_defaults(func=demo.run)


def _add_tune(subparsers) -> None:
    from raydiff import tune

    p = subparsers.add_parser("tune", help="search loss weights and t_align with Ray Tune")
    tune.add_arguments(p)
    p.add_argument("--name", help="search name; the same name and storage resume the search")
    add_config_arguments(p)
    add_cluster_arguments(p, workers_flag="--workers-per-trial")
    p.set_defaults(func=lambda args: tune.run(args, config_from_args(args)))


def _add_study(subparsers) -> None:
    from raydiff import study

    p = subparsers.add_parser(
        "study", help="compare methods x seeds at an equal budget: train (Ray Tune grid), "
                      "sample, evaluate, tabulate",
        description="Train every variant (--methods) once per seed (--seeds) at the same "
                    "budget as a Ray Tune grid, sample the same class-balanced set from each "
                    "and evaluate it on Ray Data, then write study.md (mean and 95% interval "
                    "over seeds per class group, and the difference to the first variant), "
                    "study.json and study.png. The same command again resumes.")
    study.add_arguments(p)
    add_inception_arguments(p)
    add_config_arguments(p)
    add_cluster_arguments(p, workers_flag="--workers-per-trial")
    p.set_defaults(func=lambda args: study.run(args, config_from_args(args)))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="raydiff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_config(subparsers)
    _add_prepare(subparsers)
    _add_train(subparsers)
    _add_sample(subparsers)
    _add_evaluate(subparsers)
    _add_classify(subparsers)
    _add_demo(subparsers)
    _add_tune(subparsers)
    _add_study(subparsers)
    return check_numbers(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except RaydiffError as err:  # argparse's refusal (UsageError): one line, as below
        print(f"raydiff: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if hasattr(args, "placement_timeout"):
            from raydiff.cluster import configure

            configure(args.autoscaler_config, args.placement_timeout)
        return int(args.func(args) or 0)
    except RaydiffError as err:
        print(f"raydiff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raydiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
