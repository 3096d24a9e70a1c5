"""jobs/*.py submitted with `ray job submit --working-dir .` to a real `ray start --head` cluster.

The session's cluster (tests/conftest.py) takes these jobs as a user's cluster does: the
`ray job submit` command uploads the repository minus what .gitignore and .rayignore leave out,
the job's driver runs the script from that copy on the head node, and everything the job
produces lands in the storage it names. Submitting a job again with the same storage and name
must pick up where the last one stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from raydiff.data.parquet import load_info
from raydiff.distributed.runtime import find_latest_checkpoint
from raydiff.storage import Folder

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 600
TINY = ["optim.batch_size=16", "optim.warmup_steps=5", "train.log_every=5",
        "train.ckpt_every=10", "train.preview_per_class=0", "sample.steps=4"]


def submit(dashboard_url: str, script: str, *args: str,
           working_dir: bool = True) -> tuple[str, str]:
    """`ray job submit --working-dir . -- python jobs/...`, as the README says; returns the
    submission id and the command's output. Without ``working_dir`` the job runs the script
    where it is installed, as the KubeRay image does."""
    submission_id = f"raydiff-test-{uuid.uuid4().hex[:8]}"
    upload = ["--working-dir", "."] if working_dir else []
    command = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
               "--address", dashboard_url, *upload, "--submission-id", submission_id,
               "--no-wait", "--", sys.executable,
               script if working_dir else str(REPO / script), *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return submission_id, done.stdout + done.stderr


def wait(dashboard_url: str, submission_id: str, expected: str = "SUCCEEDED") -> str:
    """Wait for a job to end; returns its logs, or fails with them unless it ended as expected."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard_url)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not (status := client.get_job_status(submission_id)).is_terminal():
            assert time.monotonic() < deadline, f"job {submission_id} still {status}"
            time.sleep(0.25)
    finally:
        if not client.get_job_status(submission_id).is_terminal():
            client.stop_job(submission_id)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus(expected), f"job {submission_id} {status}:\n{logs[-4000:]}"
    return logs


def run_job(dashboard_url: str, script: str, *args: str) -> str:
    return wait(dashboard_url, submit(dashboard_url, script, *args)[0])


def test_the_uploaded_working_directory_is_the_code_alone(ray_head, dataset_uri):
    """What `--working-dir .` sent, as the cluster unpacked it for the job above."""
    resources = ray_head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    packages = [d for d in resources.glob("_ray_pkg_*") if d.is_dir()]
    assert packages
    for package in packages:
        files = [f for f in package.rglob("*") if f.is_file()]
        names = {f.relative_to(package).as_posix() for f in files}
        assert {"jobs/train.py", "jobs/prepare.py", "raydiff/data/parquet.py"} <= names
        assert not [n for n in names if n.split("/")[0] in {".git", "runs", "data", ".pytest_cache"}
                    or n.endswith((".parquet", ".safetensors", ".pyc"))]
        size = sum(f.stat().st_size for f in files)
        print(f"working directory uploaded: {len(files)} files, {size / 2**20:.2f} MiB unpacked")
        assert size < 5 * 2**20


def test_prepare_job_uploads_a_dataset_and_keeps_it_when_resubmitted(ray_dashboard_url,
                                                                     dataset_uri):
    info = load_info(dataset_uri)
    assert (info.num_classes, info.resolution) == (4, 16)
    assert list(info.counts("train")) == [48, 30, 19, 12]
    same = ["shapes", "--out", dataset_uri, "--resolution", "16", "--num-classes", "4",
            "--images-per-class", "48", "--imbalance-ratio", "4"]
    logs = run_job(ray_dashboard_url, "jobs/prepare.py", *same)
    assert "already holds a prepared dataset; keeping it" in logs
    # asked for another dataset, the job refuses the one there in one line
    logs = wait(ray_dashboard_url, submit(ray_dashboard_url, "jobs/prepare.py",
                                          *same[:-1], "8")[0], expected="FAILED")
    assert "does not match: it holds --imbalance-ratio 4.0, not 8.0; --overwrite rebuilds it" in logs


def read_metrics(run: Path) -> list[dict]:
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_train_job_checkpoints_to_storage_and_a_resubmitted_job_resumes(trained_in_bucket):
    job = trained_in_bucket
    assert f"trained {job.name}: step 10" in job.first_logs
    assert job.first_checkpoint == f"{job.run}/checkpoint_000000010"
    assert Folder(job.first_checkpoint).is_file("config.json")

    # The same job again, asked to go further: it starts from the checkpoint, not from zero.
    assert f"resuming run {job.name} from step 10" in job.second_logs
    assert f"trained {job.name}: step 15" in job.second_logs
    assert find_latest_checkpoint(job.storage, job.name).endswith("checkpoint_000000015")
    lines = Folder(job.run).read_bytes("logs/metrics.jsonl").decode().splitlines()
    resumed = [m for m in map(json.loads, lines) if m.get("resumed_from") == 10]
    assert resumed and min(m["step"] for m in resumed) == 15 and resumed[-1]["step"] == 15


def test_train_job_refuses_storage_that_dies_with_the_job(ray_dashboard_url):
    # A relative --storage would land in the job's temporary copy of the repository.
    submission_id, _ = submit(ray_dashboard_url, "jobs/train.py", "--name", "x",
                              "--storage", "runs")
    logs = wait(ray_dashboard_url, submission_id, expected="FAILED")
    assert "--storage must be a URI" in logs


def test_sample_job_writes_a_balanced_set_and_a_resubmitted_job_keeps_it(ray_dashboard_url,
                                                                        tmp_path):
    from raydiff import config as config_lib
    from raydiff.engine import Engine

    cfg = config_lib.resolve("tiny", overrides=["model.resolution=16", "model.num_classes=4"])
    checkpoint = Engine(cfg).save(tmp_path / "run" / "checkpoint_000000000")
    out = tmp_path / "samples"
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--per-class", "3",
            "--sample-steps", "3", "--forward-batch", "4", "--shard-size", "8"]
    logs = run_job(ray_dashboard_url, "jobs/sample.py", *args)
    assert "12 images, 3 per class" in logs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == 12
    logs = run_job(ray_dashboard_url, "jobs/sample.py", *args)
    assert "shards were already on disk" in logs
