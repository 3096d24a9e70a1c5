"""Ray Train end to end on a local Ray: DDP on 2 CPU workers, faults, resume, bad input.

These tests start real Ray Train runs (controller, worker actors, gloo process group, Ray
Data pipeline) on the session's local Ray instance, with the tiny preset on 16 px shapes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from raydiff import config as config_lib
from raydiff.diffusion import make_process
from raydiff.distributed.runtime import find_latest_checkpoint, latest_step
from raydiff.distributed.train import TrainJob, prepare_job, run_training
from raydiff.engine import load_for_sampling
from raydiff.errors import RaydiffError
from raydiff.samplers import sample_images

pytestmark = pytest.mark.slow

TINY = ["optim.batch_size=16", "optim.warmup_steps=5", "train.log_every=5",
        "train.ckpt_every=20", "train.preview_per_class=2", "sample.steps=4"]


def job(data, storage, name, *overrides, total=40, **kw) -> TrainJob:
    cfg = config_lib.resolve("tiny", overrides=TINY + [f"optim.total_steps={total}", *overrides])
    return TrainJob(data=str(data), cfg=cfg, storage=str(storage), name=name,
                    **{"workers": 2, "cpus_per_worker": 1.0, **kw})


def read_metrics(storage: Path, name: str) -> list[dict]:
    path = storage / name / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_worker_pids(dashboard_url: str) -> list[int]:
    """The Ray Train worker processes of this cluster, as its state API lists them (the other
    pytest worker's cluster on the same machine runs its own)."""
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(address=dashboard_url, filters=[
        ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


def test_two_workers_train_sit_with_ccua_in_sync_and_a_killed_worker_resumes(
        ray_local, ray_dashboard_url, shapes16, tmp_path):
    # One run shows all three: the SiT backbone under flow matching with CCUA's terms, DDP
    # over 2 CPU workers, and a worker process killed mid-run (SIGKILL, not a Python
    # exception) that resumes from the last checkpoint. The UNet's DDP runs are the other
    # tests of this module. Its split streams through Ray Data (a split too large to hold in
    # memory would); every other test run holds its split in memory.
    cfg = config_lib.resolve("sit-tiny", overrides=[
        "optim.batch_size=16", "optim.warmup_steps=5", "optim.total_steps=40",
        "train.log_every=5", "train.ckpt_every=20", "train.preview_per_class=1",
        "sample.steps=2", "train.in_memory_max_images=0"])
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_training(TrainJob(
        data=str(shapes16), cfg=cfg, storage=str(tmp_path), name="fault", workers=2,
        cpus_per_worker=1.0))))
    thread.start()
    deadline = time.monotonic() + 300
    # Past step 25, and the step-20 checkpoint registered with Ray (its snapshot is written
    # after rank 0 logs the step): the kill must find a checkpoint to resume from.
    while not (any(m.get("step", 0) >= 25 for m in read_metrics(tmp_path, "fault"))
               and latest_step(str(tmp_path), "fault") >= 20):
        assert time.monotonic() < deadline and thread.is_alive(), "run never reached step 25"
        time.sleep(0.2)
    pids = _train_worker_pids(ray_dashboard_url)
    assert pids, "no RayTrainWorker process found"
    os.kill(pids[-1], signal.SIGKILL)  # a real process death, not a Python exception
    thread.join(timeout=600)
    assert outcome["result"].metrics["step"] == 40
    steps = [m["step"] for m in read_metrics(tmp_path, "fault") if "step" in m]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    resumed_at = read_metrics(tmp_path, "fault")[restart]["resumed_from"]
    assert resumed_at >= 20, "the step counter restarted instead of resuming"
    assert steps[restart - 1] - resumed_at <= 20, "more than one checkpoint interval redone"
    assert steps[-1] == 40

    result = outcome["result"]
    assert result.metrics["replica_divergence"] == 0.0  # both DDP replicas hold equal weights
    logged = [m for m in read_metrics(tmp_path, "fault") if "flow" in m]
    assert all(m["ucl"] > 0 and m["al"] >= 0 for m in logged), logged
    assert logged[-1]["flow"] < 0.7 * logged[0]["flow"], (logged[0], logged[-1])
    ckpt = Path(result.checkpoint.path)
    assert ckpt.name == "checkpoint_000000040"
    # previews of the checkpoints' EMA weights, drawn by rank 0 off the report barrier
    assert (tmp_path / "fault" / "logs" / "samples_000000040.png").is_file()
    assert list((tmp_path / "fault" / "logs").glob("events.out.tfevents.*"))
    model, loaded = load_for_sampling(ckpt)
    assert type(model).__name__ == "SiT" and loaded.diffusion.process == "flow"
    assert (loaded.model.num_classes, loaded.model.resolution) == (4, 16)
    images = sample_images(model, make_process(loaded.diffusion), [0, 3], [1, 2], loaded.sample)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_stopped_run_resumes_when_relaunched_then_refuses_other_data_and_stops_on_nan(
        ray_local, shapes16, tmp_path):
    cmd = [sys.executable, "-m", "raydiff.cli", "train", "--data", str(shapes16),
           "--storage", str(tmp_path), "--name", "relaunch", "--workers", "2", "--preset", "tiny",
           "--set", "optim.total_steps=40"] + [a for o in TINY for a in ("--set", o)]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while find_latest_checkpoint(str(tmp_path), "relaunch") is None:
        assert time.monotonic() < deadline and driver.poll() is None, "no checkpoint written"
        time.sleep(0.2)
    driver.kill()  # the whole job dies: driver gone, its workers torn down
    driver.wait()
    relaunch = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert "trained relaunch: step 40" in relaunch.stdout
    logged = read_metrics(tmp_path, "relaunch")
    assert max(m["resumed_from"] for m in logged if "resumed_from" in m) >= 20
    # the UNet under DDP over 2 CPU workers: equal replicas at every checkpoint, and learning
    divergence = [m["replica_divergence"] for m in logged if "replica_divergence" in m]
    assert divergence and set(divergence) == {0.0}
    ddpm = [m["ddpm"] for m in logged if "ddpm" in m]
    assert ddpm[-1] < 0.7 * ddpm[0], ddpm
    # a quiet console: raydiff's progress line with its ETA; Ray Train's per-report lines
    # only in the run's logs/ray.log (without -v)
    console = relaunch.stdout + relaunch.stderr
    assert "step 40/40 (100%)" in console and "ETA" in console
    assert "Reporting training result" not in console
    assert "Reporting training result" in (tmp_path / "relaunch" / "logs" / "ray.log").read_text()

    # the run's checkpoints were made for 4 classes: a 3-class dataset cannot resume it
    from raydiff.data.prepare import PrepareOptions, prepare_dataset

    three = tmp_path / "three"
    prepare_dataset(PrepareOptions(source="shapes", out=three, resolution=16, num_classes=3,
                                   images_per_class=16))
    with pytest.raises(RaydiffError, match="num_classes: checkpoint 4, requested 3"):
        prepare_job(job(three, tmp_path, "relaunch"))
    # resumed with a learning rate that overflows: the first non-finite step stops every
    # worker at once, names step and term, and keeps the last good checkpoint
    with pytest.raises(RaydiffError) as err:
        run_training(job(shapes16, tmp_path, "relaunch", "optim.lr=1e30",
                         "optim.warmup_steps=0", total=60))
    message = str(err.value)
    # step 41 still starts from the checkpoint's weights; its update blows them up
    assert "non-finite loss at step 42: loss=nan" in message, message
    assert "last good checkpoint" in message and "checkpoint_000000040" in message
    assert find_latest_checkpoint(str(tmp_path), "relaunch").endswith("checkpoint_000000040")


def test_bad_requests_fail_before_any_worker_starts(ray_local, shapes16, tmp_path):
    with pytest.raises(RaydiffError, match="does not exist; run 'raydiff prepare' first"):
        prepare_job(job(tmp_path / "nowhere", tmp_path, "x"))
    with pytest.raises(RaydiffError, match=r"2 workers: 2 x \(1 CPUs \+ 1 GPUs\) requested, but "
                                           r"the cluster has .*0 GPUs and room for 0"):
        prepare_job(job(shapes16, tmp_path, "x", gpus_per_worker=1.0))
    with pytest.raises(RaydiffError, match="does not split evenly over 3 workers"):
        prepare_job(job(shapes16, tmp_path, "x", workers=3))


LOCAL_RAY_SCRIPT = """
import os, ray
from raydiff.distributed.runtime import init_ray
init_ray(1)

@ray.remote(num_cpus=0)
class Marker:
    def ping(self):
        return True

marker = Marker.options(name="only-in-this-cluster").remote()
ray.get(marker.ping.remote())

@ray.remote
def state_api_from_a_worker():
    from ray.util.state import list_actors
    # found the way Ray Train's placement-group cleaner finds the cluster
    return [a.name for a in list_actors()], os.environ["RAY_API_SERVER_ADDRESS"]

names, url = ray.get(state_api_from_a_worker.remote())
assert "only-in-this-cluster" in names and url.startswith("http://127.0.0.1:"), (names, url)
print("ok")
"""


def test_local_ray_beside_another_tells_its_workers_where_it_is(ray_head):
    # The session's cluster is running, so a scan of the machine finds two Rays; Ray Train's
    # cleaner then dies and leaks each run's placement group (a Tune search hung on it).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", LOCAL_RAY_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
