"""How long `raydiff --help` takes, next to a bare interpreter and an `import torch`.

Building the parser imports only the standard library and raydiff.config (raydiff/cli.py), so
`raydiff --help` should cost about what the interpreter itself costs, not what torch costs.
Each command runs ``--repeat`` times in turn; the medians are printed with their ratios.

    python benchmarks/cli_startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "raydiff --help": [shutil.which("raydiff") or "raydiff", "--help"],
    "raydiff train --help": [shutil.which("raydiff") or "raydiff", "train", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeat):  # interleaved, so drift hits every command alike
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["python -c pass"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<28} {median:6.3f} s  ({median / base:4.1f}x the bare interpreter)")


if __name__ == "__main__":
    main()
