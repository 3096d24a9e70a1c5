"""The ``raydiff`` command: one subcommand per job, errors as one clear line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from raydiff import config as config_lib
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


def add_cluster_arguments(parser: argparse.ArgumentParser, workers: int = 1) -> None:
    group = parser.add_argument_group("cluster")
    group.add_argument("--workers", type=int, default=workers, help="data-parallel workers")
    group.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="GPUs per worker (0 = CPU training with gloo)")
    group.add_argument("--cpus-per-worker", type=float, default=1.0)
    group.add_argument("--storage", default="runs",
                       help="run storage: a local/NFS path or s3://bucket/prefix (default: runs)")


def _run_train(args: argparse.Namespace) -> int:
    from raydiff.train import TrainJob, fit_config_to_data, run_training
    from raydiff.data.parquet import load_info

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
                   help="worker failures to recover from the latest checkpoint")
    add_config_arguments(p)
    add_cluster_arguments(p)
    p.set_defaults(func=_run_train)


def _add_prepare(subparsers) -> None:
    from raydiff.data import prepare

    p = subparsers.add_parser("prepare", help="build a long-tailed dataset as Parquet shards")
    prepare.add_arguments(p)
    p.set_defaults(func=prepare.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydiff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_config(subparsers)
    _add_prepare(subparsers)
    _add_train(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except RaydiffError as err:
        print(f"raydiff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raydiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
