"""``raydiff tune`` as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --data s3://BUCKET/raydiff/datasets/cifar10-lt --preset cifar32 \
        --trials 16 --steps 20000 --workers 1 --gpus-per-worker 1 \
        --storage s3://BUCKET/raydiff/searches --name c10-ccua-search

It takes the arguments of ``raydiff tune`` and runs the same code. ``--storage`` (a URI or an
absolute path every node shares) and ``--name`` are required, as for ``jobs/train.py``: a job
submitted again with the same storage and name restores the search (``Tuner.restore``),
keeps every finished trial and resumes the others from their checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import run_location_error  # noqa: E402  (jobs/ is not a package)

from raydiff.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    error = None if {"-h", "--help", "--dry-run"} & set(argv) else run_location_error(argv)
    if error:
        print(f"jobs/tune.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["tune", *argv]))
