"""Does ``raydiff demo`` draw its data, and how long does it take?

Runs the demo exactly as a new user does (``raydiff demo``, its defaults, a fresh storage
folder, no Inception weights so the offline feature classifier is the judge), then prints its
wall time and how often the demo's own reference classifier recognises the generated images,
overall and per head / body / tail third, with the copy rate and diversity of each set.

    python benchmarks/demo_quality.py                 # a fresh temporary folder
    python benchmarks/demo_quality.py --storage runs-bench --steps 3000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="demo storage folder (default: a new temporary one)")
    parser.add_argument("--steps", type=int, help="training steps (default: the demo's)")
    args = parser.parse_args()
    storage = args.storage or tempfile.mkdtemp(prefix="raydiff-demo-bench-")
    cmd = [sys.executable, "-m", "raydiff.cli", "demo", "--storage", storage, "--no-download"]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, as a user
    start = time.monotonic()
    subprocess.run(cmd, check=True, env=env)
    wall = time.monotonic() - start
    result = json.loads((Path(storage) / "demo" / "eval" / "metrics.json").read_text())
    accuracy = result["classifier_accuracy"]
    print(f"\ndemo wall time: {wall:.0f} s ({os.cpu_count()} CPUs); storage {storage}")
    print(f"{'set':<8} {'recognised':>10} {'copy rate':>10} {'diversity':>10}")
    for name in ("overall", "head", "body", "tail"):
        top1 = accuracy["top1"] if name == "overall" else accuracy["groups"][name]["top1"]
        s = result["sets"].get(name, {})
        cells = [f"{v:.3f}" if isinstance(v, float) else "n/a"
                 for v in (top1, s.get("copy_rate"), s.get("diversity"))]
        print(f"{name:<8} " + " ".join(f"{c:>10}" for c in cells))


if __name__ == "__main__":
    main()
