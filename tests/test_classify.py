"""``raydiff classify`` and ``evaluate --features classifier:CKPT`` on the session's Ray.

Real Ray Train runs (2 DDP workers on gloo) of a resnet10 of width 16 on the 16 px shapes
fixture (4 classes, 48 .. 12 training images, 48 reference images each), a few epochs of 6-8
steps; synthetic samples come from the tiny diffusion checkpoint (noise, which is all the
plumbing needs). The real-only run is killed after its first checkpoint and finished by a
relaunch, as a user's interrupted run would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from raydiff import cli
from raydiff.classifier import META_FILE, ClassifierConfig
from raydiff.distributed.classify import CHART_FILE, COMPARISON_FILE, RESULTS_FILE, ClassifyJob, run_classify
from raydiff.distributed.evaluate import EvalJob, run_evaluation
from raydiff.distributed.runtime import find_latest_checkpoint, storage_and_name
from raydiff.distributed.sample import SampleJob, run_sampling

pytestmark = pytest.mark.slow

SMALL = ClassifierConfig(arch="resnet10", width=16, epochs=2, batch_size=16, warmup_epochs=0.5)
FLAGS = ["--arch", "resnet10", "--width", "16", "--batch-size", "16", "--warmup-epochs", "0.5"]
REAL_EPOCHS = 20  # 6 steps each: the kill lands well before the end


@pytest.fixture(scope="module")
def samples(ray_local, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("classify") / "samples"
    run_sampling(SampleJob(checkpoint=str(tiny_checkpoint), out=str(out), per_class=6,
                           forward_batch=8, shard_size=24))
    return out


def read_metrics(out: Path) -> list[dict]:
    path = out / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def real_run(ray_local, shapes16, tmp_path_factory) -> tuple[Path, dict, int]:
    """A real-only run whose driver is killed after its first checkpoint, then relaunched:
    (run folder, results, the last step logged before the kill)."""
    out = tmp_path_factory.mktemp("classify") / "real"
    command = [sys.executable, "-m", "raydiff.cli", "classify", "--data", str(shapes16),
               "--out", str(out), "--epochs", str(REAL_EPOCHS), "--workers", "2", *FLAGS]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while find_latest_checkpoint(*storage_and_name(str(out))) is None:
        assert time.monotonic() < deadline and driver.poll() is None, "no checkpoint written"
        time.sleep(0.2)
    driver.kill()  # the whole run dies: driver gone, its Train controller and workers with it
    driver.wait()
    stopped_at = max(m["step"] for m in read_metrics(out))
    cfg = ClassifierConfig(**{**SMALL.to_dict(), "epochs": REAL_EPOCHS})
    results = run_classify(ClassifyJob(data=str(shapes16), out=str(out), cfg=cfg, workers=2))
    return out, results, stopped_at


def test_killed_run_resumes_from_its_last_checkpoint(real_run):
    out, results, stopped_at = real_run
    total = REAL_EPOCHS * 6
    assert stopped_at < total, "the run finished before it was killed"
    metrics = read_metrics(out)
    resumed = [m["resumed_from"] for m in metrics if m["resumed_from"] > 0]
    assert resumed, "the relaunch started from scratch"
    assert resumed[0] % 6 == 0 and resumed[0] <= stopped_at  # an epoch's checkpoint
    assert metrics[-1]["step"] == total and results["step"] == total


def test_real_only_run_reports_top1_per_group(real_run):
    out, results, _ = real_run
    # shapes16 trains on 48, 30, 19, 12 images: no class above 100, two below 20
    assert results["train_counts"] == [48, 30, 19, 12]
    assert results["mix"]["rule"] == "none" and results["mix"]["synthetic_images"] == 0
    evaluation = results["evaluation"]
    assert evaluation["num_images"] == 192 and not evaluation["on_training_data"]
    assert {g: v["classes"] for g, v in evaluation["shot_groups"].items()} == {
        "many": [], "medium": [0, 1], "few": [2, 3]}
    assert evaluation["shot_groups"]["many"]["top1"] is None
    assert {g: v["classes"] for g, v in evaluation["groups"].items()} == {
        "head": [0, 1], "body": [2], "tail": [3]}
    per_class = list(evaluation["per_class"].values())
    assert evaluation["top1"] == pytest.approx(np.mean(per_class))  # balanced reference
    assert evaluation["shot_groups"]["few"]["top1"] == pytest.approx(np.mean(per_class[2:]))
    checkpoint = Path(results["checkpoint"])
    # 109 images: 6 steps of 16 per epoch
    assert checkpoint.parent == out and checkpoint.name == f"checkpoint_{REAL_EPOCHS * 6:09d}"
    meta = json.loads((checkpoint / META_FILE).read_text())
    assert meta["epoch"] == REAL_EPOCHS and sum(meta["evaluation"]["total"]) == 192
    assert json.loads((out / RESULTS_FILE).read_text())["evaluation"]["top1"] == evaluation["top1"]
    assert evaluation["top1"] > 0.4  # chance: 0.25
    assert (out / CHART_FILE).stat().st_size > 1000
    assert read_metrics(out)[-1]["top1"] == pytest.approx(evaluation["top1"])


def test_synthetic_mix_is_recorded_and_runs_compare(real_run, samples, shapes16, tmp_path, capsys):
    mixed = run_classify(ClassifyJob(data=str(shapes16), out=str(tmp_path / "mixed"), cfg=SMALL,
                                     synthetic=(str(samples),), mix="add:6", workers=1))
    assert mixed["synthetic"] == [str(samples)]
    assert [(e["real"], e["synthetic"]) for e in mixed["mix"]["per_class"]] == [
        (48, 6), (30, 6), (19, 6), (12, 6)]
    # 133 images: 8 steps of 16 per epoch
    assert mixed["mix"]["rule"] == "add:6" and mixed["step"] == 16
    # the same command again reuses the finished run
    again = run_classify(ClassifyJob(data=str(shapes16), out=str(tmp_path / "mixed"), cfg=SMALL,
                                     synthetic=(str(samples),), mix="add:6", workers=1))
    assert again["checkpoint"] == mixed["checkpoint"]
    assert again["evaluation"] == mixed["evaluation"]
    real_out = real_run[0]
    assert cli.main(["classify", "--compare", str(real_out), str(tmp_path / "mixed"),
                     "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith(f"| {real_out}") or
            line.startswith(f"| {tmp_path / 'mixed'}")]
    assert len(rows) == 2 and "| add:6 | 109 | 24 |" in rows[1], table
    assert "| many (0) | medium (2) | few (2) | head (2) | body (1) | tail (1) |" in table
    assert (tmp_path / COMPARISON_FILE).read_text().strip() in table


def test_classifier_features_for_evaluate(real_run, samples, shapes16, tmp_path):
    checkpoint = real_run[1]["checkpoint"]
    job = EvalJob(samples=str(samples), reference=str(shapes16), groups=True, per_class=True,
                  features=f"classifier:{real_run[0]}", actors=1, batch_size=16,
                  cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "eval"))
    result = run_evaluation(job)
    extractor = result["feature_extractor"]
    assert extractor["name"] == "classifier:resnet10" and extractor["weights"] == checkpoint
    assert extractor["feature_dim"] == 128
    overall = result["sets"]["overall"]
    assert (overall["num_generated"], overall["num_reference"]) == (24, 192)
    assert overall["fid"] > 0 and 1.0 <= overall["isc_mean"] <= 4.0  # IS over 4 classes
    # the classifier's top-1 on the samples: per set, per class and per group, consistent
    accuracy = result["classifier_accuracy"]
    assert accuracy["num_images"] == 24 and set(accuracy["per_class"]) == {
        "circle", "square", "triangle", "ring"}
    assert overall["classifier_top1"] == pytest.approx(accuracy["top1"])
    assert result["sets"]["tail"]["classifier_top1"] == pytest.approx(
        accuracy["groups"]["tail"]["top1"])
    # the cache keys (the reference split, and the training split for the copy rate) name the
    # extractor and the checkpoint's hash
    metas = [json.loads((entry / "meta.json").read_text())
             for entry in (tmp_path / "cache").iterdir()]
    assert sorted(m.get("split", "reference") for m in metas) == ["reference", "train"]
    for meta in metas:
        assert meta["extractor"] == "classifier:resnet10"
        assert meta["weights_sha256"] == extractor["weights_sha256"]
    assert 0.0 <= overall["copy_rate"] <= 1.0 and overall["diversity"] > 0


def test_job_entry_point_wants_shared_locations():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    try:
        from classify import classify_location_error
    finally:
        sys.path.pop(0)
    assert "--storage and --name are required" in classify_location_error(["--data", "/data"])
    assert "--data must be a URI or an absolute path" in classify_location_error(
        ["--data", "data", "--storage", "/runs", "--name", "x"])
    assert "--storage must be a URI or an absolute path" in classify_location_error(
        ["--data", "/data", "--storage", "runs", "--name", "x"])
    assert "--train must be a URI" in classify_location_error(  # the old spelling
        ["--train", "data", "--out", "/runs/x"])
    assert "--synthetic must be a URI" in classify_location_error(
        ["--data", "/data", "--out", "s3://b/x", "--synthetic", "/s1", "s2"])
    assert classify_location_error(["--data", "s3://b/d", "--out", "/runs/x"]) is None
    assert classify_location_error(["--data", "s3://b/d", "--storage", "/runs",
                                    "--name", "x"]) is None
    assert classify_location_error(["--compare", "a", "b"]) is None


def test_bad_input_is_one_clear_line(real_run, samples, shapes16, shapes_dataset, tmp_path,
                                     cli_error):
    base = ["classify", "--out", str(tmp_path / "bad"), "--epochs", "2", *FLAGS]
    assert "does not exist; run 'raydiff prepare' first" in cli_error(
        base + ["--data", str(tmp_path / "nowhere")])
    # shapes_dataset is 32 px; the samples are 16 px
    line = cli_error(base + ["--data", str(shapes_dataset), "--synthetic",
                                       str(samples)])
    assert f"{samples / 'manifest.json'}: samples are 16 px but {shapes_dataset} is 32 px" in line
    train = base + ["--data", str(shapes16)]
    assert "needs 50 synthetic images of class 0 but" in cli_error(
        train + ["--synthetic", str(samples), "--mix", "add:50"])
    assert "--mix topup needs --synthetic SAMPLES_DIR" in cli_error(train + ["--mix", "topup"])
    assert "fewer than one batch (--batch-size 512)" in cli_error(train + ["--batch-size", "512"])
    assert "does not split evenly over 3 workers" in cli_error(train + ["--workers", "3"])
    assert "warmup_epochs=5.0 is invalid" in cli_error(["classify", "--data", str(shapes16), "--epochs", "3"])
    # a run folder of another network or other data is not resumed
    line = cli_error(["classify", "--data", str(shapes16), "--out", str(real_run[0]),
                                "--epochs", "3", *FLAGS[:2], "--width", "32", *FLAGS[4:]])
    assert "cannot resume" in line and "width: checkpoint 16, requested 32" in line
    assert "not a finished 'raydiff classify' run" in cli_error(["classify", "--compare", str(tmp_path)])
    evaluate = ["evaluate", "--samples", str(samples), "--data", str(shapes16)]
    assert "--features 'vgg': expected inception or classifier:CHECKPOINT" in cli_error(
        evaluate + ["--features", "vgg"])
    assert "neither a classifier checkpoint" in cli_error(
        evaluate + ["--features", f"classifier:{tmp_path}"])
