"""``raydiff train`` as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --data s3://BUCKET/raydiff/datasets/cifar10-lt --preset cifar32 \
        --workers 8 --gpus-per-worker 1 --storage s3://BUCKET/raydiff --name c10-ccua

It takes the arguments of ``raydiff train`` and runs the same code. Two of them are required
here: ``--storage``, a URI (``s3://``, ``gs://``) or an absolute path that every node shares,
because the job's working directory is a temporary copy on one node that Ray deletes after the
job; and ``--name``. The driver keeps no state of its own, so a job submitted again with the same
storage and name, after a failure, a ``ray job stop`` or with a larger ``optim.total_steps``,
resumes from the latest checkpoint there (Ray's fault-tolerance pattern for drivers).
"""

from __future__ import annotations

import argparse
import sys

from raydiff.cli import main


def run_location_error(argv: list[str]) -> str | None:
    """Why ``argv`` does not name a run on shared storage, or None when it does."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--storage")
    parser.add_argument("--name")
    args, _ = parser.parse_known_args(argv)
    if not args.storage or not ("://" in args.storage or args.storage.startswith("/")):
        return ("--storage must be a URI (s3://bucket/prefix) or an absolute path that every "
                "node shares")
    if not args.name:
        return "--name is required: a job submitted again with the same name resumes that run"
    return None


if __name__ == "__main__":
    argv = sys.argv[1:]
    error = None if {"-h", "--help", "--dry-run"} & set(argv) else run_location_error(argv)
    if error:
        print(f"jobs/train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["train", *argv]))
