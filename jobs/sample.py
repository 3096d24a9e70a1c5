"""``raydiff sample`` as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sample.py --checkpoint /shared/raydiff/c10-ccua \
        --out /shared/raydiff/samples/c10-ccua-50k --per-class 5000 \
        --actors 8 --gpus-per-actor 1 --forward-batch 256 --batch-size 1024

It takes the arguments of ``raydiff sample`` and runs the same code. ``--checkpoint`` and
``--out`` must be absolute paths that every node shares (NFS or similar): the job's working
directory is a temporary copy on one node, actors on any node load the checkpoint, and the
driver renames each finished shard into ``--out`` (an object store has no rename). The driver
keeps no state of its own: a job submitted again with the same arguments, after a failure or
a ``ray job stop``, samples only the shards that are missing.
"""

from __future__ import annotations

import argparse
import sys

from raydiff.cli import main


def location_error(argv: list[str], flags: tuple[str, ...]) -> str | None:
    """Why one of ``flags`` in ``argv`` is not an absolute path, or None when all are."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in flags:
        parser.add_argument(flag)
    args, _ = parser.parse_known_args(argv)
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and not value.startswith("/"):
            return f"{flag} must be an absolute path that every node shares, got {value!r}"
    return None


if __name__ == "__main__":
    argv = sys.argv[1:]
    error = None if {"-h", "--help"} & set(argv) else location_error(argv, ("--checkpoint",
                                                                            "--out"))
    if error:
        print(f"jobs/sample.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["sample", *argv]))
