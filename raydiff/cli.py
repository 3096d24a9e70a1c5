"""The ``raydiff`` command: one subcommand per job, errors as one clear line."""

from __future__ import annotations

import argparse
import logging
import sys

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
