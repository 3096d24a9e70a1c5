"""``raydiff classify`` as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/classify.py --data s3://BUCKET/raydiff/datasets/cifar10-lt \
        --synthetic s3://BUCKET/raydiff/samples/c10-ccua --mix topup \
        --storage s3://BUCKET/raydiff/classify --name c10-ccua-topup \
        --workers 4 --gpus-per-worker 1

It takes the arguments of ``raydiff classify`` and runs the same code. ``--storage`` and
``--name`` are required here (or the run folder as ``--out``), and ``--storage``, ``--data``
and ``--synthetic`` must be URIs (``s3://``, ``gs://``) or absolute paths that every node
shares: the job's working directory is a temporary copy on one node that
Ray deletes after the job. The driver keeps no state of its own, so a job submitted again with
the same arguments, after a failure or a ``ray job stop``, resumes from the run's latest
checkpoint (a finished run is not trained again); ``--compare`` needs no cluster.
"""

from __future__ import annotations

import argparse
import sys

from sample import location_error  # jobs/sample.py: the script's folder is on sys.path

from raydiff.cli import main


def classify_location_error(argv: list[str]) -> str | None:
    """Why ``argv`` does not name shared locations for a classify job, or None."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--out")
    parser.add_argument("--storage")
    parser.add_argument("--name")
    parser.add_argument("--compare", nargs="+")
    parser.add_argument("--synthetic", nargs="+", action="extend", default=[])
    args, _ = parser.parse_known_args(argv)
    if args.compare:
        return None
    if not args.out and not (args.storage and args.name):
        return ("--storage and --name are required: a job submitted again with the same run "
                "resumes it")
    for folder in args.synthetic:
        error = location_error(["--synthetic", folder], ("--synthetic",))
        if error:
            return error
    return location_error(argv, ("--data", "--train", "--storage", "--out"))


if __name__ == "__main__":
    argv = sys.argv[1:]
    error = None if {"-h", "--help"} & set(argv) else classify_location_error(argv)
    if error:
        print(f"jobs/classify.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["classify", *argv]))
