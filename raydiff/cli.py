"""The ``raydiff`` command: one subcommand per job, errors as one clear line."""

from __future__ import annotations

import argparse
import logging
import sys

from raydiff.errors import RaydiffError


def _add_prepare(subparsers) -> None:
    from raydiff.data import prepare

    p = subparsers.add_parser("prepare", help="build a long-tailed dataset as Parquet shards")
    prepare.add_arguments(p)
    p.set_defaults(func=prepare.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydiff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
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
