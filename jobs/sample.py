"""``raydiff sample`` as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sample.py --checkpoint s3://BUCKET/raydiff/c10-ccua \
        --out s3://BUCKET/raydiff/samples/c10-ccua --per-class 5000 \
        --actors 8 --gpus-per-actor 1 --forward-batch 256 --actor-batch 1024

It takes the arguments of ``raydiff sample`` and runs the same code. ``--checkpoint`` and
``--out`` must be URIs (``s3://``, ``gs://``) or absolute paths that every node shares: the
job's working directory is a temporary copy on one node, and actors on any node load the
checkpoint and write their shards to ``--out``. The driver keeps no state of its own: a job
submitted again with the same arguments, after a failure or a ``ray job stop``, samples only
the shards that are missing.
"""

from __future__ import annotations

import argparse
import sys

from raydiff.cli import main


def location_error(argv: list[str], flags: tuple[str, ...]) -> str | None:
    """Why one of ``flags`` in ``argv`` names no shared location (an absolute path or a URI),
    or None when all do."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in flags:
        parser.add_argument(flag)
    args, _ = parser.parse_known_args(argv)
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and not (value.startswith("/") or "://" in value):
            return (f"{flag} must be a URI or an absolute path that every node shares, "
                    f"got {value!r}")
    return None


if __name__ == "__main__":
    argv = sys.argv[1:]
    error = None if {"-h", "--help"} & set(argv) else location_error(argv, ("--checkpoint",
                                                                            "--out"))
    if error:
        print(f"jobs/sample.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["sample", *argv]))
