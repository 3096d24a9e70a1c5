"""What the test suite costs the machine: wall time next to CPU time, per test and in all.

Runs the suite (or the pytest arguments given after ``--``) in this process with a recorder
that reads the machine's busy CPU time (``/proc/stat``, every core, every process: the Ray
workers a test starts are not its children) before and after each test, setup and teardown
included. The sum over tests divided by the core count is the floor no scheduling can beat on
this machine, however its tests are spread over processes (``pytest -n``): a suite whose
tests need C CPU-seconds cannot end in less than C / cores seconds. Nothing else should run
on the machine meanwhile; what does is counted too.

With ``--processes`` a thread also reads every process's CPU time in ``/proc`` four times a
second and adds it up by kind of process (Ray Train's controller, its workers, Ray's daemons,
the C++ compiler torch's inductor runs, ...): where the CPU-seconds go. A process that starts
and ends between two readings is missed (the table says how much of the machine's busy time
it covers). A second table splits the Ray actors and tasks of no kind of their own by their
titles (``ray::MapWorker(MapBatches(FeatureActor))`` is one of Ray Data's actors). The
readings cost this process about 2% of a core with 70 processes running, and more with more.

    python benchmarks/suite_cost.py --top 25
    python benchmarks/suite_cost.py --processes -- -m "not slow"
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import threading
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


OTHER_RAY = "other Ray actors and tasks (Ray Data's operators, ...)"
# Kinds of process, by the first pattern their command line (``ray::`` titles included) matches.
KINDS = [
    ("Ray Train workers", r"^ray::RayTrainWorker"),
    ("Ray Train controllers", r"^ray::TrainController"),
    ("Ray Train placement-group cleaners", r"^ray::PlacementGroupCleaner"),
    ("Ray Train dataset managers", r"^ray::DatasetManager"),
    ("Ray Train synchronization actors", r"^ray::SynchronizationActor"),
    ("Ray Tune trial actors", r"^ray::(ImplicitFunc|_QueueActor)"),
    ("Ray job supervisors", r"^ray::JobSupervisor"),
    ("Ray workers started, never given work", r"^ray::IDLE"),
    ("Ray's daemons (GCS, raylet, dashboard, agents, monitors)",
     r"gcs_server|raylet|^ray::(DashboardAgent|RuntimeEnvAgent)|ray-dashboard|dashboard\.py|"
     r"agent\.py|monitor\.py|ray\.util\.client\.server|runtime_env/agent"),
    (OTHER_RAY, r"^ray::"),
    ("Ray workers starting (no title yet)", r"default_worker\.py|setup_worker\.py"),
    ("ray command line (ray start, ray job)", r"-m ray\.scripts\.scripts"),
    ("raydiff and job drivers in subprocesses", r"raydiff|jobs/\w+\.py|python\S* -c"),
    ("C++ compiler and linker (torch inductor)", r"^(\S*/)?(cc1plus|g\+\+|c\+\+|gcc|cc|as|ld|collect2)\b"),
    ("S3 server (moto)", r"moto"),
]


class ProcessSampler:
    """Every process's CPU time, read from ``/proc`` every ``interval`` s in a thread, summed
    by kind (``KINDS``; this process is ``pytest``) once ``stop`` is called."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self._stop = interval, threading.Event()
        self._seen: dict[tuple[int, str], list] = {}  # (pid, start) -> [title, cpu, cpu at start]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.machine = busy_cpu_seconds()

    def start(self) -> None:
        self._thread.start()

    def _read(self, first: bool) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            cpu = (int(fields[11]) + int(fields[12])) / tick
            title = " ".join(a.decode(errors="replace") for a in argv if a)
            seen = self._seen.setdefault((int(entry), fields[19]), ["", 0.0, cpu if first else 0.0])
            # A Ray worker's title names its work, and turns back to IDLE between tasks;
            # an exiting process has none.
            working = seen[0].startswith("ray::") and seen[0] != "ray::IDLE"
            if title and not (working and title == "ray::IDLE"):
                seen[0] = title
            elif not seen[0]:
                seen[0] = stat[stat.index("(") + 1:stat.rindex(")")]
            seen[1] = cpu

    def _run(self) -> None:
        self._read(first=True)
        while not self._stop.wait(self.interval):
            self._read(first=False)

    def stop(self) -> tuple[float, dict[str, list[float]], dict[str, list[float]]]:
        """(machine busy CPU-s meanwhile, {kind: [CPU-s, processes]}, {title: [CPU-s,
        processes]} of the processes of kind ``OTHER_RAY``, titles with their numbers as N)."""
        self._stop.set()
        self._thread.join()
        machine = busy_cpu_seconds() - self.machine
        kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        titles: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        for (pid, _), (title, cpu, at_start) in self._seen.items():
            kind = "pytest (this process)" if pid == os.getpid() else next(
                (name for name, pattern in KINDS if re.search(pattern, title)), "other")
            if cpu - at_start > 0:
                kinds[kind][0] += cpu - at_start
                kinds[kind][1] += 1
                if kind == OTHER_RAY:  # which actor or task: Ray Data names its operators
                    short = re.sub(r"\d+", "N", title.split(" ")[0])
                    titles[short][0] += cpu - at_start
                    titles[short][1] += 1
        return machine, kinds, titles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=20, help="tests listed, by CPU time")
    parser.add_argument("--processes", action="store_true",
                        help="also sum CPU time by kind of process, read from /proc")
    parser.add_argument("pytest_args", nargs="*", help="after --: arguments for pytest")
    args = parser.parse_args()
    if not Path("/proc/stat").is_file():
        print("error: suite_cost.py reads /proc/stat: Linux only", file=sys.stderr)
        return 2
    os.chdir(REPO)
    recorder = Recorder()
    sampler = ProcessSampler() if args.processes else None
    if sampler:
        sampler.start()
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
    if sampler:
        machine, kinds, titles = sampler.stop()
        total = sum(used for used, _ in kinds.values())
        print(f"\n{'CPU s':>7} {'share':>6} {'procs':>6}  kind of process ({total:.1f} CPU-s read "
              f"from /proc, {total / machine:.0%} of the machine's {machine:.1f} busy CPU-s)")
        for kind, (used, count) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
            print(f"{used:7.1f} {used / total:6.1%} {count:6d}  {kind}")
        print(f"\n{'CPU s':>7} {'procs':>6}  {OTHER_RAY.split(' (')[0]}, by title (top 10)")
        for title, (used, count) in sorted(titles.items(), key=lambda kv: -kv[1][0])[:10]:
            print(f"{used:7.1f} {count:6d}  {title[:100]}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
