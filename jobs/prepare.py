"""``raydiff prepare`` as a Ray job, writing to local, shared or object storage.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prepare.py cifar10 --root /home/ray/data \
        --out s3://BUCKET/raydiff/datasets/cifar10-lt

It takes the arguments of ``raydiff prepare`` and runs the same code on the node the job's
driver runs on (the head node, unless the submission asks for resources), so ``--root`` is a
path there. ``--out`` may also be a URI (``s3://``, ``gs://``): the dataset is then built in a
local temporary folder and uploaded, its ``dataset.json`` last, so a reader that finds that
file finds every shard it lists (``raydiff.data.prepare.upload_dataset``). A job submitted
again finds the complete dataset and keeps it, so a failed pipeline can simply be submitted
again; a dataset there that was prepared with other content options (source, resolution,
imbalance ratio, seed, classes, images per class, reference split, latents and their scale
and storage type) or lacks a shard is refused in one line (``--overwrite`` rebuilds it).
"""

from __future__ import annotations

import argparse
import sys

from raydiff.cli import build_parser
from raydiff.cli import main as raydiff_main
from raydiff.data.parquet import load_info
from raydiff.data.prepare import options_from_args, reuse_problem
from raydiff.errors import RaydiffError


def kept_dataset(argv: list[str], out: str) -> bool:
    """True when ``out`` already holds the complete dataset ``argv`` asks for; a different or
    incomplete one there is refused (--overwrite rebuilds it)."""
    try:
        info = load_info(out)
    except RaydiffError:
        return False  # nothing prepared there yet (or a dataset.json a rebuild replaces)
    args = build_parser().parse_args(["prepare", *argv])
    problem = reuse_problem(out, options_from_args(args), info)
    if problem:
        raise RaydiffError(f"{out} holds a prepared dataset that does not match: {problem}; "
                           "--overwrite rebuilds it")
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--out")
    parser.add_argument("--overwrite", action="store_true")
    args, _ = parser.parse_known_args(argv)
    if args.out is None or {"-h", "--help"} & set(argv):
        return raydiff_main(["prepare", *argv])  # its usage message or help
    try:
        keep = not args.overwrite and kept_dataset(argv, args.out)
    except RaydiffError as err:
        print(f"raydiff: error: {err}", file=sys.stderr)
        return 2
    if keep:
        print(f"{args.out} already holds a prepared dataset; keeping it (--overwrite rebuilds it)")
        return 0
    status = raydiff_main(["prepare", *argv])  # a URI --out is built locally and uploaded
    if status == 0 and "://" in args.out:
        print(f"uploaded to {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
