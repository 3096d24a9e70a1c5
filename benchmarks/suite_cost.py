"""What the test suite costs the machine: wall time next to CPU time, per test and in all.

Runs the suite (or the pytest arguments given after ``--``) in this process with a recorder
that reads the machine's busy CPU time (``/proc/stat``, every core, every process: the Ray
workers a test starts are not its children) before and after each test, setup and teardown
included. The sum over tests divided by the core count is the floor no scheduling can beat on
this machine, however its tests are spread over processes (``pytest -n``): a suite whose
tests need C CPU-seconds cannot end in less than C / cores seconds. Nothing else should run
on the machine meanwhile; what does is counted too.

    python benchmarks/suite_cost.py --top 25
    python benchmarks/suite_cost.py -- -m "not slow"
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent outside idle and I/O wait since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Recorder:
    """A pytest plugin: (test id, wall s, machine CPU s) for every test, in run order."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        cpu, start = busy_cpu_seconds(), time.perf_counter()
        yield
        self.rows.append((item.nodeid, time.perf_counter() - start, busy_cpu_seconds() - cpu))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=20, help="tests listed, by CPU time")
    parser.add_argument("pytest_args", nargs="*", help="after --: arguments for pytest")
    args = parser.parse_args()
    if not Path("/proc/stat").is_file():
        print("error: suite_cost.py reads /proc/stat: Linux only", file=sys.stderr)
        return 2
    os.chdir(REPO)
    recorder = Recorder()
    start = time.perf_counter()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *args.pytest_args], plugins=[recorder])
    wall = time.perf_counter() - start
    rows, cores = recorder.rows, os.cpu_count() or 1
    cpu, in_tests = sum(r[2] for r in rows), sum(r[1] for r in rows)

    print(f"\n{len(rows)} tests on {cores} cores: {wall:.1f} s wall (pytest's own run), "
          f"{in_tests:.1f} s in tests, {cpu:.1f} CPU-s in tests")
    print(f"busy cores in tests {cpu / in_tests:.2f} of {cores}; floor {cpu / cores:.1f} s "
          f"(CPU-s / cores); wall / floor {wall / (cpu / cores):.2f}")
    print(f"\n{'wall s':>7} {'CPU s':>7} {'cores':>5}  test (top {args.top} by CPU)")
    for nodeid, seconds, used in sorted(rows, key=lambda r: -r[2])[:args.top]:
        print(f"{seconds:7.1f} {used:7.1f} {used / max(seconds, 1e-9):5.2f}  {nodeid}")
    modules: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for nodeid, seconds, used in rows:
        modules[nodeid.split("::")[0]][0] += seconds
        modules[nodeid.split("::")[0]][1] += used
    print(f"\n{'wall s':>7} {'CPU s':>7} {'cores':>5}  module (over 1 CPU-s)")
    for module, (seconds, used) in sorted(modules.items(), key=lambda kv: -kv[1][1]):
        if used >= 1:
            print(f"{seconds:7.1f} {used:7.1f} {used / max(seconds, 1e-9):5.2f}  {module}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
