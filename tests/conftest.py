"""Shared fixtures: a local Ray cluster, CIFAR-format files, and a small prepared dataset.

Nothing here downloads: CIFAR fixtures are written in the exact pickle layout torchvision
downloads (same file names, keys and dtypes), with synthetic pixels.
"""

from __future__ import annotations

import os
import pickle
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Token authentication, explicitly and with a token of this session: Ray 2.60 turns it on for
# a `ray start` only when ~/.ray/auth_token happens to exist, so without this the same suite
# would run authenticated on a developer machine and unauthenticated on a fresh CI runner.
# Every Ray process, job driver and `ray job` command started from here inherits both.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# Ray Train's controller collects the workers' reports when it polls them, every 2 s by
# default, and a worker's next report waits for the last to be collected: the suite's runs
# report every few steps of milliseconds, so each report would wait out the poll. Every Train
# run started from here (in-process, a subprocess driver, a submitted job) polls every 0.2 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray Train's preemption watcher (an actor per run that watches for draining cloud nodes)
# has nothing to watch on one machine; it is one process start fewer per run.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Caches (reference features, torch.hub) of this session alone, never the developer's.
_CACHE_HOME = tempfile.mkdtemp(prefix="raydiff-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_HOME, ignore_errors=True)

CIFAR_ROW_BYTES = 3 * 32 * 32


# Fixtures that start or join a Ray cluster: a test that uses one is `slow` whatever its own
# marks say, so `pytest -m "not slow"` (the inner loop) never starts Ray.
RAY_FIXTURES = {"ray_head", "ray_local", "ray_dashboard_url", "autoscaling_head"}


# With `-n 2 --dist loadgroup --no-loadscope-reorder` the suite runs on two pytest workers, each
# with its own session cluster. A module is one unit of work, so its module fixtures (a shared run,
# a sample folder) are made once; modules that share a session fixture made by a job are one
# unit too. Units start longest first (as measured on the 2-core machine), so that both
# workers end at about the same time.
SAME_UNIT = {"test_s3": "test_jobs"}  # both read the session's training job in the bucket
LONGEST_FIRST = ["test_study", "test_train", "test_autoscaling", "test_tune", "test_jobs",
                 "test_engine", "test_classify", "test_evaluate", "test_latents", "test_demo",
                 "test_sample"]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if not getattr(config.option, "loadgroup", False):  # set by xdist for --dist loadgroup
        return  # one process: the modules run in their usual order

    def unit(item):
        return SAME_UNIT.get(item.module.__name__, item.module.__name__)

    for item in items:
        item.add_marker(pytest.mark.xdist_group(unit(item)))
    # stable: the order within a module and among the rest is kept
    items.sort(key=lambda item: LONGEST_FIRST.index(unit(item)) if unit(item) in LONGEST_FIRST
               else len(LONGEST_FIRST))


@pytest.fixture(autouse=True)
def _nothing_left_reserved(request):
    """After a test on the session cluster, every placement group it made is removed (within
    30 s: Ray Train removes a finished run's group, and its cleaner the group of a run whose
    controller was killed). CPUs a test leaves reserved would make a later test wait forever.

    Only groups made during the test count. A group whose creating job has ended is Ray's to
    remove, not raydiff's (raydiff makes no detached groups): once in a full run such a group
    (of job 08, a driver subprocess of the study test, which SIGKILLs its driver and reruns it)
    stayed reserved for the rest of the session and failed every later test. Such a group is
    removed here with a warning; a group of a job still alive (this process's) fails the test."""
    if not RAY_FIXTURES & set(request.fixturenames):
        yield
        return
    from raydiff.distributed.runtime import (
        remove_placement_group_by_id,
        reserved_placement_groups,
    )

    ray = sys.modules.get("ray")
    before = set(reserved_placement_groups()) if ray and ray.is_initialized() else set()
    yield
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    deadline = time.monotonic() + 30
    while held := {pg: job for pg, job in reserved_placement_groups().items()
                   if pg not in before}:
        if time.monotonic() > deadline:
            ended = {job["JobID"] for job in ray._private.state.state.job_table()
                     if job["IsDead"]}
            orphans = [pg for pg, job in held.items() if job in ended]
            for pg in orphans:
                remove_placement_group_by_id(pg)
            if orphans:
                warnings.warn(f"removed placement groups of ended jobs that Ray kept: {orphans}",
                              stacklevel=2)
            if live := sorted(set(held) - set(orphans)):
                pytest.fail(f"placement groups still reserved 30 s after the test: {live}")
            return
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# S3: the suite's own endpoint and dummy credentials, set before any Ray starts, so the
# session's `ray start` and every worker it spawns inherit them; the `s3_bucket` fixture starts
# a real S3 API server (moto) there. A developer's AWS settings never reach a real bucket.
# The port stays bound by this process (not listening) until the server starts: the Ray
# clusters the suite starts before then cannot take it.
_S3_RESERVATION = socket.socket()
_S3_RESERVATION.bind(("127.0.0.1", 0))
S3_PORT = _S3_RESERVATION.getsockname()[1]
os.environ.update({
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "raydiff-test",
    "AWS_SECRET_ACCESS_KEY": "raydiff-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no credential lookups against an EC2 endpoint
})


def _cluster_pids(session_id: int, temp_dir: Path) -> list[int]:
    """Processes of one `ray start`: its session, plus job drivers (their own session) by cwd."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, _pgrp, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            in_cluster = int(session) == session_id or Path(
                os.readlink(entry / "cwd")).is_relative_to(temp_dir)
        except (OSError, ValueError):
            continue
        if in_cluster and state != "Z":
            pids.append(int(entry.name))
    return pids


def _stop_cluster(session_id: int, temp_dir: Path, grace_s: float = 1.0) -> None:
    """`ray stop` for this cluster alone: `ray stop` itself ends every Ray on the machine.
    A test cluster has nothing to save: what has not exited a second after SIGTERM (some of
    Ray's daemons take 5 s and more) is killed."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in _cluster_pids(session_id, temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while _cluster_pids(session_id, temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)


def _cluster_environment(dashboard_port: int) -> dict[str, str]:
    """The environment of a test cluster's `ray start`, which all its processes inherit.

    Ray Train's placement-group cleaner (an actor of every run) asks the state API whether its
    run's controller lives. Without an address it finds the API by scanning the machine for
    Ray instances, which fails while another runs beside this one (a second pytest worker's,
    the autoscaling test's, a test's own): its check then dies and the placement group of a
    run whose controller was killed (a trial stopped by ASHA, a killed driver) stays reserved,
    and a later test waits forever for those CPUs. `raydiff`'s own local Ray does the same
    (``runtime.init_ray``)."""
    return {**os.environ, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}


@dataclass(frozen=True)
class RayHead:
    gcs_address: str  # what `ray.init(address=...)` and RAY_ADDRESS take
    dashboard_url: str  # what `ray job submit --address` and JobSubmissionClient take
    temp_dir: Path  # logs under session_latest/logs


@pytest.fixture(scope="session")
def ray_head() -> RayHead:
    """A real single-node Ray cluster, started with `ray start --head` and its dashboard.

    4 logical CPUs on a 2-core box. Every port is picked free and the temp dir is private, so
    the suite runs beside other Ray instances on the same machine; at the end exactly this
    cluster's processes are stopped.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="raydiff-ray-"))  # short: Unix socket paths
    dashboard_port = _free_port()
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--num-cpus=4",
        f"--port={_free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    # A session of its own (its id = its pid): the daemons it leaves behind stay in it.
    starter = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True,
                               env=_cluster_environment(dashboard_port))
    try:
        output = starter.communicate(timeout=300)[0]
        if starter.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{output}")
        yield RayHead(gcs_address=(temp_dir / "ray_current_cluster").read_text().strip(),
                      dashboard_url=f"http://127.0.0.1:{dashboard_port}", temp_dir=temp_dir)
    finally:
        _stop_cluster(starter.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class AutoscalingHead(RayHead):
    autoscaler_config: Path  # the cluster-launcher config its autoscaler runs


# A cluster like cluster.yaml's, in miniature: a head that advertises 0 CPUs (it schedules no
# work), and one worker type the autoscaler starts on demand, from zero, up to 3 nodes.
FAKE_WORKER_TYPE = {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0,
                    "max_workers": 3}


@pytest.fixture(scope="module")
def autoscaling_head() -> AutoscalingHead:
    """Ray's real autoscaler over its ``fake_multinode`` provider (worker nodes are local
    raylets it starts and stops), started from zero worker nodes.

    ``ray.cluster_utils.AutoscalingCluster`` does the same but reads a config file the wheel
    does not ship and runs ``ray stop --force`` (every Ray on the machine); so its steps are
    taken here, and exactly this cluster's processes are stopped at the end.
    """
    import json

    temp_dir = Path(tempfile.mkdtemp(prefix="raydiff-as-"))
    port, dashboard_port = _free_port(), _free_port()
    ip = "127.0.0.1"
    config = {
        # Nodes are not removed while the tests run: fake nodes share the head's session
        # folder (on real nodes each has its own), and what one node's agents clean up there
        # another may still be using.
        "cluster_name": "raydiff-fake", "max_workers": 3, "idle_timeout_minutes": 30,
        "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": f"{ip}:{port}"},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu-2": FAKE_WORKER_TYPE,
        },
    }
    config_file = temp_dir / "autoscaler.yaml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--num-cpus=0",
        f"--port={port}", f"--node-ip-address={ip}", f"--autoscaling-config={config_file}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    env = {**_cluster_environment(dashboard_port), "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    starter = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, env=env)
    try:
        output = starter.communicate(timeout=300)[0]
        if starter.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{output}")
        yield AutoscalingHead(gcs_address=f"{ip}:{port}",
                              dashboard_url=f"http://127.0.0.1:{dashboard_port}",
                              temp_dir=temp_dir, autoscaler_config=config_file)
    finally:
        _stop_cluster(starter.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(ray_head):
    """The test process connected to the session's Ray cluster; yields the ``ray`` module.

    Starting Ray takes seconds, so every test that needs it shares this one cluster.
    """
    import ray

    ray.init(address=ray_head.gcs_address)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_dashboard_url(ray_head) -> str:
    """The session cluster's dashboard, once its job API answers (it starts after the head)."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:
        try:
            JobSubmissionClient(ray_head.dashboard_url).list_jobs()
            return ray_head.dashboard_url
        except (ConnectionError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory) -> str:
    """A bucket on a real S3 API server (moto's, a subprocess on the suite's S3 port); yields
    ``s3://<bucket>``. The server is stopped at the end of the session."""
    from urllib.parse import urlsplit

    import pyarrow.fs as pafs

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    _S3_RESERVATION.close()
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        fs = pafs.S3FileSystem(endpoint_override=urlsplit(os.environ["AWS_ENDPOINT_URL"]).netloc,
                               scheme="http", allow_bucket_creation=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                fs.create_dir("raydiff-test")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto_server did not answer:\n{log.read_text()}") from None
                time.sleep(0.2)
        yield "s3://raydiff-test"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def cli_error(capsys):
    """``cli_error(argv)``: runs ``raydiff ARGV`` in this process, which must exit with 2 and
    one ``raydiff: error: ...`` line on stderr; returns that line."""
    from raydiff import cli

    def run(argv: list[str]) -> str:
        assert cli.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("raydiff: error: "), lines
        return lines[0]

    return run


def _cifar_pixels(n: int, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).bytes(n * CIFAR_ROW_BYTES)
    return np.frombuffer(noise, np.uint8).reshape(n, CIFAR_ROW_BYTES)


def _dump(path: Path, obj: dict) -> None:
    # Protocol 2, as the real (Python 2 cPickle) files; keys and names are bytes as there.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


_LAYOUTS = {
    # name: (folder, label key, names key, classes, train files, test file, meta file)
    "cifar10": ("cifar-10-batches-py", b"labels", b"label_names", 10,
                [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"),
    "cifar100": ("cifar-100-python", b"fine_labels", b"fine_label_names", 100,
                 ["train"], "test", "meta"),
}  # fmt: skip


def write_cifar(
    root: Path, name: str, train_labels: np.ndarray, test_labels: np.ndarray, seed: int = 0
) -> Path:
    """Write a CIFAR-10 (5 train batches) or CIFAR-100 folder under ``root``; returns it."""
    layout = _LAYOUTS[name]
    folder_name, label_key, names_key, num_classes, train_files, test_file, meta_file = layout
    folder = root / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    pixels = _cifar_pixels(len(train_labels), seed)
    batches = np.array_split(np.arange(len(train_labels)), len(train_files))
    for file_name, rows in zip(train_files, batches):
        batch = {b"batch_label": file_name.encode(), label_key: train_labels[rows].tolist()}
        _dump(folder / file_name, {**batch, b"data": pixels[rows]})
    test = {b"batch_label": b"test", label_key: np.asarray(test_labels).tolist()}
    _dump(folder / test_file, {**test, b"data": _cifar_pixels(len(test_labels), seed + 1)})
    _dump(folder / meta_file, {names_key: [f"class{c}".encode() for c in range(num_classes)]})
    return folder


@pytest.fixture
def make_cifar():
    """``write_cifar`` for tests that need their own small CIFAR folder."""
    return write_cifar


def cifar_full_labels(num_classes: int, train_total: int = 50000, seed: int = 0) -> np.ndarray:
    """Balanced labels in a shuffled order, as in the real training batches."""
    labels = np.repeat(np.arange(num_classes), train_total // num_classes)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _released_selection(targets: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """LDAM-DRW's ``IMBALANCECIFAR10.gen_imbalanced_data`` restated, global numpy RNG and all.

    The released code seeds with ``np.random.seed(rand_number)`` (0) in ``__init__`` and then
    shuffles each class's indices in class order; returns the kept indices, sorted.
    """
    np.random.seed(seed)
    kept = []
    for the_class, the_img_num in zip(np.unique(targets), counts):
        idx = np.where(targets == the_class)[0]
        np.random.shuffle(idx)
        kept.extend(idx[:the_img_num].tolist())
    return np.sort(np.array(kept))


@pytest.fixture
def released_selection():
    """The released code's selection rule, as an independent oracle for ours."""
    return _released_selection


@pytest.fixture(scope="session")
def cifar10_full(tmp_path_factory) -> Path:
    """A CIFAR-10 root with the full 50,000-image training layout and a small test batch."""
    root = tmp_path_factory.mktemp("cifar10_full")
    test_labels = np.repeat(np.arange(10), 3)
    write_cifar(root, "cifar10", cifar_full_labels(10), test_labels)
    return root


@pytest.fixture(scope="session")
def cifar100_full(tmp_path_factory) -> Path:
    """A CIFAR-100 root with the full 50,000-image training layout and a small test file."""
    root = tmp_path_factory.mktemp("cifar100_full")
    write_cifar(root, "cifar100", cifar_full_labels(100), np.arange(100))
    return root


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> Path:
    """A tiny prepared shapes dataset (4 classes, 24 .. 6 training images) for any test."""
    from raydiff.data.prepare import PrepareOptions, prepare_dataset

    out = tmp_path_factory.mktemp("shapes") / "shapes-lt"
    options = PrepareOptions(
        source="shapes", out=out, num_classes=4, images_per_class=24, imbalance_ratio=4.0
    )
    prepare_dataset(options)
    return out


def _write_photo(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def imagenet_lt_root(tmp_path) -> Path:
    """An ImageNet-LT-shaped root: 3 classes with 5, 3, 2 training JPEGs, 2 val images each.

    List files carry the standard names and live in the root; images vary in size and aspect,
    so cropping and resizing are exercised. Training images sit in per-class folders (their
    names become the class names); val images sit in one flat folder, as in ImageNet.
    """
    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537", "n01484850"]
    train_lines, val_lines = [], []
    for label, (wnid, count) in enumerate(zip(wnids, (5, 3, 2))):
        colour = (80 * label, 255 - 80 * label, 128)
        for i in range(count):
            relative = f"train/{wnid}/{wnid}_{i}.JPEG"
            _write_photo(root / relative, (40 + 7 * i, 30 + 5 * label), colour)
            train_lines.append(f"{relative} {label}")
        for i in range(2):
            relative = f"val/ILSVRC2012_val_{label}{i}.png"
            _write_photo(root / relative, (33, 47), colour)
            val_lines.append(f"{relative} {label}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "ImageNet_LT_val.txt").write_text("\n".join(val_lines) + "\n")
    return root


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """A class-per-folder tree: 3 classes with 8 PNGs each (nested, as TinyImageNet's train)."""
    root = tmp_path / "tree"
    for label, name in enumerate(["cat", "dog", "emu"]):
        for i in range(8):
            colour = (30 * i, 80 * label, 200)
            _write_photo(root / name / "images" / f"{name}_{i}.png", (24, 20), colour)
    (root / "cat" / "cat_boxes.txt").write_text("not an image\n")
    return root


# --- sampling and evaluation (tests/test_sample*.py, test_evaluate*.py, test_demo*.py) -------

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny-preset checkpoint (4 classes, 16 px, DDIM 4 steps) after 3 steps: made in
    seconds without Ray; good for sampling plumbing, not for pretty pictures."""
    import torch

    from raydiff import config as config_lib
    from raydiff.engine import Engine

    cfg = config_lib.resolve("tiny", overrides=[
        "model.num_classes=4", "optim.batch_size=8", "sample.steps=4", "optim.warmup_steps=0"])
    engine = Engine(cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        engine.train_step(torch.rand(8, 3, 16, 16, generator=g) * 2 - 1,
                          torch.randint(0, 4, (8,), generator=g))
    return engine.save(tmp_path_factory.mktemp("tiny-ckpt") / "checkpoint_000000003")


@pytest.fixture(scope="session")
def shapes16_tiny(tmp_path_factory) -> Path:
    """A prepared 16 px shapes dataset matching ``tiny_checkpoint``: 4 classes, 8 reference
    images each, 8 .. 2 training images."""
    from raydiff.data.prepare import PrepareOptions, prepare_dataset

    out = tmp_path_factory.mktemp("shapes16") / "shapes16"
    prepare_dataset(PrepareOptions(source="shapes", out=out, resolution=16, num_classes=4,
                                   images_per_class=8, imbalance_ratio=4.0))
    return out


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A random but non-degenerate ``inception-v3-compat`` weights file (PLATFORM.md):
    torch-fidelity's real weights are a download (``write_random_inception_weights``)."""
    from raydiff.features import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception")
                                          / "inception-random.pth")


@pytest.fixture(scope="session")
def shapes16(tmp_path_factory) -> Path:
    """Shapes at 16 px, 4 classes, 48 .. 12 training images: for tests that train on Ray."""
    from raydiff.data.prepare import PrepareOptions, prepare_dataset

    out = tmp_path_factory.mktemp("shapes16") / "shapes16"
    prepare_dataset(PrepareOptions(source="shapes", out=out, resolution=16, num_classes=4,
                                   images_per_class=48, imbalance_ratio=4.0))
    return out


# --- the jobs flow on object storage (tests/test_jobs.py, tests/test_s3.py) -----------------

@pytest.fixture(scope="session")
def dataset_uri(ray_dashboard_url, s3_bucket) -> str:
    """A dataset prepared by jobs/prepare.py and uploaded to the test's S3 server (moto)."""
    uri = f"{s3_bucket}/jobs/datasets/shapes16"
    from test_jobs import run_job

    logs = run_job(ray_dashboard_url, "jobs/prepare.py", "shapes", "--out", uri,
                   "--resolution", "16", "--num-classes", "4", "--images-per-class", "48",
                   "--imbalance-ratio", "4", "--processes", "1")
    assert f"uploaded to {uri}" in logs
    return uri


# The session's one training job on object storage: tests/test_s3.py samples, classifies and
# evaluates from the run it leaves in the bucket.
S3_TRAIN = ["optim.batch_size=16", "optim.warmup_steps=5", "train.log_every=5",
            "train.ckpt_every=5", "train.preview_per_class=1", "sample.steps=4"]


@dataclass(frozen=True)
class TrainedInBucket:
    storage: str
    name: str
    first_logs: str  # the job that trained to step 10
    first_checkpoint: str | None  # the latest checkpoint after it
    second_logs: str  # the same job submitted again, asked for step 15

    @property
    def run(self) -> str:
        return f"{self.storage}/{self.name}"


@pytest.fixture(scope="session")
def trained_in_bucket(ray_dashboard_url, dataset_uri, s3_bucket) -> TrainedInBucket:
    """jobs/train.py with 2 DDP workers, dataset and storage on the S3 server: trained to step
    10, then the same job submitted again with a larger budget, to step 15."""
    storage, name = f"{s3_bucket}/runs", "tiny-s3"
    args = ["--data", dataset_uri, "--storage", storage, "--name", name,
            "--preset", "tiny", "--workers", "2"] + [a for o in S3_TRAIN for a in ("--set", o)]
    from test_jobs import run_job

    first = run_job(ray_dashboard_url, "jobs/train.py", *args, "--set", "optim.total_steps=10")
    from raydiff.distributed.runtime import find_latest_checkpoint

    checkpoint = find_latest_checkpoint(storage, name)
    second = run_job(ray_dashboard_url, "jobs/train.py", *args, "--set", "optim.total_steps=15")
    return TrainedInBucket(storage, name, first, checkpoint, second)
