"""Every command with its outputs in S3: a real S3 API server (moto, the ``s3_bucket`` fixture)
that the session's Ray and all its workers reach through AWS_ENDPOINT_URL (conftest.py).

First ``RunLog`` alone (no Ray): with a URI it stages its files locally and uploads each whole
at ``sync`` (every checkpoint) and ``close``. Then one chain, marked slow, each stage reading
what the one before left in the bucket: ``train`` (a Ray job, tests/test_jobs.py, trained to
step 10 and resubmitted to resume from its checkpoint in the bucket to step 15), ``sample``
from that run folder, ``classify`` with those samples mixed in, ``classify --compare`` and
``evaluate`` in the classifier's feature space (no Inception download); ``tune`` writes
into the bucket from the autoscaling cluster (tests/test_autoscaling.py). Outputs are read back
with pyarrow's own S3 client, not through ``raydiff.storage``, and their content checked.
"""

from __future__ import annotations

import io
import json
import os
import struct
from urllib.parse import urlsplit

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydiff import cli

CLASSIFY = ["--arch", "resnet10", "--width", "16", "--batch-size", "16", "--warmup-epochs", "0.5",
            "--epochs", "2", "--ckpt-every", "1"]


def s3_client() -> pafs.S3FileSystem:
    """pyarrow's S3 client, told the endpoint explicitly: an oracle independent of raydiff."""
    return pafs.S3FileSystem(endpoint_override=urlsplit(os.environ["AWS_ENDPOINT_URL"]).netloc,
                             scheme="http")


@pytest.fixture(scope="module")
def s3(s3_bucket) -> pafs.S3FileSystem:
    return s3_client()


def key(uri: str) -> str:
    return uri.removeprefix("s3://").rstrip("/")


def read(s3: pafs.S3FileSystem, uri: str) -> bytes:
    with s3.open_input_stream(key(uri)) as stream:
        return stream.read()


def listing(s3: pafs.S3FileSystem, uri: str) -> list[str]:
    """Every object under ``uri``, relative to it."""
    infos = s3.get_file_info(pafs.FileSelector(key(uri), recursive=True, allow_not_found=True))
    return sorted(i.path[len(key(uri)) + 1:] for i in infos if i.type == pafs.FileType.File)


def jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def scalars(events: bytes, tag: str) -> dict[int, float]:
    """{step: value} of one scalar in a TensorBoard events file (TFRecord framing)."""
    from tensorboardX.proto.event_pb2 import Event

    found, at = {}, 0
    while at < len(events):
        (length,) = struct.unpack("<Q", events[at:at + 8])
        event = Event.FromString(events[at + 12:at + 12 + length])
        at += 16 + length
        for value in event.summary.value:
            if value.tag == tag:
                found[event.step] = value.simple_value
    return found


def run_cli(args: list[str]) -> None:
    assert cli.main(args) == 0, args


def test_runlog_uploads_its_files_at_each_sync_and_continues_after_a_resume(s3, s3_bucket):
    from raydiff import config as config_lib
    from raydiff.runlog import RunLog

    cfg, logs = config_lib.resolve("tiny"), f"{s3_bucket}/unit/logs"

    def steps() -> list:
        return [m.get("step", "error") for m in jsonl(read(s3, f"{logs}/metrics.jsonl"))]

    runlog = RunLog(logs, cfg, start_step=0)
    runlog.write({"step": 1, "loss": 1.0}, total_steps=3)
    assert listing(s3, logs) == []  # staged until the first sync (checkpoint)
    runlog.sync()
    assert steps() == [1] and "config.json" in listing(s3, logs)
    runlog.write({"step": 2, "loss": 0.5}, total_steps=3)
    runlog.add_image(np.full((8, 8, 3), 7, np.uint8), step=2)
    assert steps() == [1]  # the object is the last whole upload, never a part of the file
    runlog.close()
    files = listing(s3, logs)
    assert steps() == [1, 2] and "samples_000000002.png" in files
    assert [f for f in files if f.startswith("events.out.tfevents.")]
    assert not runlog.dir.exists()  # the staging folder goes with close

    resumed = RunLog(logs, cfg, start_step=2)  # a relaunch continues the same metrics.jsonl
    resumed.write({"step": 3, "loss": 0.25}, total_steps=3)
    resumed.error("non-finite loss at step 4")  # the NaN stop: error, then close
    resumed.close()
    assert steps() == [1, 2, 3, "error"]


@pytest.fixture(scope="module")
def trained(ray_local, trained_in_bucket) -> str:
    """A run trained to step 10 by a Ray job, then resubmitted to step 15: it resumes from the
    bucket (tests/test_jobs.py)."""
    return trained_in_bucket.run


@pytest.mark.slow
def test_training_logs_and_checkpoints_land_in_the_bucket(s3, trained):
    files = listing(s3, trained)
    assert "checkpoint_000000015/state.json" in files and "checkpoint_000000015/config.json" in files
    metrics = [m for m in jsonl(read(s3, f"{trained}/logs/metrics.jsonl")) if "step" in m]
    # both sessions' lines, in one file: the relaunch resumed from the step-10 checkpoint
    assert [(m["step"], m["resumed_from"]) for m in metrics] == [(5, 0), (10, 0), (15, 10)]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    events = [f for f in files if f.startswith("logs/events.out.tfevents.")]
    assert len(events) == 2, files  # one per session, each uploaded whole under its own name
    steps = {}
    for name in events:
        steps.update(scalars(read(s3, f"{trained}/{name}"), "train/loss"))
    assert sorted(steps) == [5, 10, 15]
    assert steps[15] == pytest.approx(metrics[-1]["loss"])
    assert json.loads(read(s3, f"{trained}/logs/config.json"))["optim"]["total_steps"] == 15
    grid = Image.open(io.BytesIO(read(s3, f"{trained}/logs/samples_000000015.png")))
    assert grid.size[1] > 4 * 16  # one row per class
    assert not [f for f in files if ".tmp" in f]


@pytest.fixture(scope="module")
def sampled(trained, s3_bucket) -> str:
    out = f"{s3_bucket}/samples/tiny-s3"
    base = ["sample", "--checkpoint", trained, "--out", out, "--per-class", "3",
            "--forward-batch", "4", "--shard-size", "8"]
    run_cli(base + ["--format", "npz"])
    run_cli(base + ["--format", "imagefolder"])  # nothing left to sample: the export alone
    return out


@pytest.mark.slow
def test_samples_land_in_the_bucket(s3, trained, sampled):
    manifest = json.loads(read(s3, f"{sampled}/manifest.json"))
    assert manifest["complete"] and manifest["num_images"] == 12 and manifest["num_shards"] == 2
    assert manifest["class_counts"] == {"0": 3, "1": 3, "2": 3, "3": 3}
    assert manifest["formats"] == ["imagefolder", "npz", "parquet"]
    assert manifest["checkpoint"]["path"] == f"{trained}/checkpoint_000000015"
    assert manifest["checkpoint"]["step"] == 15
    table = pq.read_table([f"{key(sampled)}/shards/shard-0000{k}.parquet" for k in (0, 1)],
                          filesystem=s3)
    assert table.column("index").to_pylist() == list(range(12))
    assert table.column("label").to_pylist() == [0, 1, 2, 3] * 3
    with np.load(io.BytesIO(read(s3, f"{sampled}/samples_12x16x16x3.npz"))) as npz:
        assert npz["arr_0"].shape == (12, 16, 16, 3) and npz["arr_1"].tolist() == [0, 1, 2, 3] * 3
        first = npz["arr_0"][0]
    images = [f for f in listing(s3, sampled) if f.startswith("images/")]
    assert len(images) == 12 and "images/0/00000000.png" in images
    png = np.asarray(Image.open(io.BytesIO(read(s3, f"{sampled}/images/0/00000000.png"))))
    np.testing.assert_array_equal(png, first)


@pytest.fixture(scope="module")
def classified(shapes16, sampled, s3_bucket) -> str:
    run_cli(["classify", "--data", str(shapes16), "--synthetic", sampled, "--mix", "add:3",
             "--storage", f"{s3_bucket}/classify", "--name", "mixed", "--workers", "1",
             *CLASSIFY])
    run_cli(["classify", "--compare", f"{s3_bucket}/classify/mixed", "--out",
             f"{s3_bucket}/compare"])
    return f"{s3_bucket}/classify/mixed"


@pytest.mark.slow
def test_classify_lands_in_the_bucket(s3, classified, sampled, s3_bucket):
    results = json.loads(read(s3, f"{classified}/results.json"))
    assert results["synthetic"] == [sampled] and results["mix"]["synthetic_images"] == 12
    assert results["checkpoint"].startswith(f"{classified}/checkpoint_")
    assert 0.0 <= results["evaluation"]["top1"] <= 1.0
    assert results["evaluation"]["num_images"] == 192
    files = listing(s3, classified)
    step = int(results["step"])
    assert f"checkpoint_{step:09d}/model.safetensors" in files
    logged = jsonl(read(s3, f"{classified}/logs/metrics.jsonl"))
    assert [m["epoch"] for m in logged] == [1, 2] and logged[-1]["step"] == step
    assert logged[-1]["top1"] == pytest.approx(results["evaluation"]["top1"])
    assert [f for f in files if f.startswith("logs/events.out.tfevents.")]
    assert read(s3, f"{classified}/results.png")[:8] == b"\x89PNG\r\n\x1a\n"
    comparison = read(s3, f"{s3_bucket}/compare/comparison.md").decode()
    assert f"| {classified} |" in comparison and "add:3" in comparison


@pytest.mark.slow
def test_evaluate_lands_in_the_bucket(s3, classified, sampled, shapes16, s3_bucket, tmp_path):
    out = f"{s3_bucket}/eval/tiny-s3"
    run_cli(["evaluate", "--samples", sampled, "--data", str(shapes16), "--groups",
             "--features", f"classifier:{classified}", "--actor-batch", "16",
             "--reference-per-class", "8", "--no-copy-metrics",
             "--cache-dir", str(tmp_path / "cache"), "--out", out])
    metrics = json.loads(read(s3, f"{out}/metrics.json"))
    assert metrics["samples"] == sampled
    overall = metrics["sets"]["overall"]
    assert (overall["num_generated"], overall["num_reference"]) == (12, 32)
    for name in ("fid", "kid_mean", "isc_mean", "precision", "recall", "classifier_top1"):
        assert isinstance(overall[name], float) and np.isfinite(overall[name]), name
    assert overall["fid"] > 0 and 1.0 <= overall["isc_mean"] <= 4.0
    assert metrics["feature_extractor"]["weights"].startswith(f"{classified}/checkpoint_")
    assert metrics["classifier_accuracy"]["num_images"] == 12
    chart = Image.open(io.BytesIO(read(s3, f"{out}/metrics.png")))
    assert chart.format == "PNG" and chart.size[0] > 100


def test_prepare_uploads_a_dataset_whole_and_refuses_to_replace_it(s3, s3_bucket, capsys):
    out = f"{s3_bucket}/datasets/shapes16"
    args = ["prepare", "shapes", "--out", out, "--resolution", "16", "--num-classes", "4",
            "--images-per-class", "12", "--imbalance-ratio", "4"]
    run_cli(args)
    info = json.loads(read(s3, f"{out}/dataset.json"))
    assert (info["num_classes"], info["resolution"]) == (4, 16)
    files = listing(s3, out)
    assert set(info["splits"]["train"]["files"] + info["splits"]["reference"]["files"]) == {
        f for f in files if f.endswith(".parquet")}  # every shard it lists is there
    table = pq.read_table([f"{key(out)}/{f}" for f in info["splits"]["train"]["files"]],
                          filesystem=s3)
    counts = np.bincount(np.asarray(table.column("label").to_pylist()), minlength=4)
    assert counts.tolist() == [c["train"] for c in info["classes"]] and counts[0] == 12
    assert not [f for f in files if ".tmp" in f]
    capsys.readouterr()
    assert cli.main(args) == 2  # there already: one line, and the dataset is kept
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a prepared dataset (pass --overwrite" in err[0]
    assert listing(s3, out) == files
