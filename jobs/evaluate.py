"""``raydiff evaluate`` as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --samples s3://BUCKET/raydiff/samples/c10-ccua \
        --data s3://BUCKET/raydiff/datasets/cifar10-lt --groups --per-class-fid \
        --inception-weights /shared/weights-inception-2015-12-05-6726825d.pth \
        --actors 4 --gpus-per-actor 1

It takes the arguments of ``raydiff evaluate`` and runs the same code. ``--samples`` (and
``--out``, ``--cache-dir``, ``--inception-weights`` and the checkpoint of ``--features
classifier:CKPT`` when given) must be URIs or absolute paths that every node shares (the
weights and the cache: paths). Reference features are cached under
``--cache-dir`` (default: the driver node's ~/.cache/raydiff), so an evaluation submitted again
skips the reference's feature pass; metrics.json and metrics.png are written whole.
"""

from __future__ import annotations

import argparse
import sys

from sample import location_error  # jobs/sample.py: the script's folder is on sys.path

from raydiff.cli import main


def features_location_error(argv: list[str]) -> str | None:
    """Why a ``--features classifier:CKPT`` checkpoint is not shared, or None."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--features", default="inception")
    kind, _, checkpoint = parser.parse_known_args(argv)[0].features.partition(":")
    if kind != "classifier" or not checkpoint:
        return None
    return location_error(["--features", checkpoint], ("--features",))


if __name__ == "__main__":
    argv = sys.argv[1:]
    error = None if {"-h", "--help"} & set(argv) else (location_error(
        argv, ("--samples", "--out", "--cache-dir", "--inception-weights"))
        or features_location_error(argv))
    if error:
        print(f"jobs/evaluate.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["evaluate", *argv]))
