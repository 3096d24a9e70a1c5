"""``raydiff study``: variants, the statistics of its tables, and a real resumed study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydiff import config as config_lib
from raydiff.distributed.study import (
    StudyJob,
    Variant,
    check_study,
    difference_interval,
    markdown,
    mean_interval,
    parse_variant,
    summarise,
)
from raydiff.errors import RaydiffError

BASE = config_lib.resolve("tiny")


def test_variants_are_methods_or_labelled_overrides():
    assert parse_variant("ccua", BASE) == Variant("ccua", {"loss.method": "ccua"})
    tuned = parse_variant("ccua-t500:loss.method=ccua,loss.t_align=500", BASE)
    assert tuned.label == "ccua-t500"
    assert tuned.overrides == {"loss.method": "ccua", "loss.t_align": "500"}
    assert parse_variant("cbdm:loss.cbdm_tau=0.5", BASE).overrides == {
        "loss.cbdm_tau": "0.5", "loss.method": "cbdm"}


@pytest.mark.parametrize("text,message", [
    ("tuned:loss.t_align=500", "must set loss.method"),
    ("ccua:loss.alpha=1", "unknown config key 'loss.alpha'"),
    ("ccua:loss.t_align=5000", "loss.t_align=5000 is invalid"),
    ("ccua:train.seed=3", "the seeds come from --seeds"),
    ("a/b:loss.method=ddpm", "the label must be"),
])
def test_bad_variants_name_the_problem(text, message):
    with pytest.raises(RaydiffError, match=message):
        parse_variant(text, BASE)


def test_mean_interval_is_the_student_t_interval():
    stat = mean_interval([1.0, 2.0, 3.0])
    # sd 1, n 3: t_{0.975, 2} = 4.3027 -> half-width 4.3027 / sqrt(3)
    assert stat["mean"] == 2.0 and stat["n"] == 3
    assert stat["ci95"] == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert mean_interval([5.0])["ci95"] is None  # one seed: no interval
    assert mean_interval([])["mean"] is None


def test_difference_interval_matches_scipys_welch_test():
    from scipy import stats

    a, b = [3.1, 2.4, 2.9, 3.6], [2.0, 2.6, 1.7]
    got = difference_interval(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert got["mean"] == pytest.approx(np.mean(a) - np.mean(b))
    assert got["mean"] - got["ci95"] == pytest.approx(ci.low)
    assert got["mean"] + got["ci95"] == pytest.approx(ci.high)
    assert difference_interval([1.0, 1.0], [1.0, 1.0]) == {"mean": 0.0, "ci95": 0.0}


def _run(variant: str, seed: int, fid_tail: float, recall: float) -> dict:
    return {"variant": variant, "seed": seed, "metrics": {
        "overall": {"fid": fid_tail - 1, "recall": recall},
        "tail": {"fid": fid_tail, "recall": recall, "copy_rate": None}}}


def test_summary_and_table_of_constructed_runs():
    runs = [_run("ddpm", 0, 10.0, 0.2), _run("ddpm", 1, 12.0, 0.3),
            _run("ccua", 0, 7.0, 0.5), _run("ccua", 1, 8.0, float("nan"))]
    summary = summarise(runs, ["ddpm", "ccua"])
    tail = summary["ccua"]["tail"]
    assert tail["fid"]["mean"] == 7.5 and tail["fid"]["values"] == [7.0, 8.0]
    assert tail["fid"]["diff"]["mean"] == pytest.approx(-3.5)
    assert tail["recall"]["values"] == [0.5]  # a NaN is left out, not averaged
    assert "copy_rate" not in tail  # no run had one
    assert "diff" not in summary["ddpm"]["tail"]["fid"]  # the baseline
    spec = {"data": "d", "base": BASE.to_dict(), "variants": {"ddpm": {}, "ccua": {}},
            "seeds": [0, 1], "per_class": 4}
    text = markdown({"name": "s", "spec": spec, "variants": ["ddpm", "ccua"],
                     "feature_extractor": "f", "summary": summary})
    fid_table = text.split("## FID")[1].split("##")[0]
    assert "| variant | overall | tail |" in fid_table
    assert "| ddpm | 10.00 ± 12.71 | 11.00 ± 12.71 |" in fid_table  # sd 1.41, t(1) = 12.71
    assert "| ccua | 6.50 ± 6.35 (−3.50 ± " in fid_table
    assert "## Copy rate" not in text


def _job(tmp_path: Path, data: Path, **kw) -> StudyJob:
    base = config_lib.apply_overrides(BASE, {"optim.total_steps": 6, "optim.batch_size": 8})
    return StudyJob(data=str(data), base=base, storage=str(tmp_path), name="s",
                    variants=(parse_variant("ddpm", base), parse_variant("ccua", base)),
                    seeds=(0, 1), **kw)


def test_a_study_refuses_to_resume_with_other_settings(tmp_path, shapes16_tiny):
    from raydiff.distributed.study import _write_spec

    job = _job(tmp_path, shapes16_tiny)
    check_study(job)
    _write_spec(job)
    check_study(job)  # unchanged: resumes
    with pytest.raises(RaydiffError, match=r"other settings \(seeds differ\)"):
        check_study(replace(job, seeds=(0, 1, 2)))
    with pytest.raises(RaydiffError, match="--per-class must be at least 2"):
        check_study(replace(job, per_class=1, name="t"))
    with pytest.raises(RaydiffError, match="repeats a label"):
        check_study(replace(job, variants=job.variants * 2, name="t"))
    # what would fail only after Ray started, or after training: refused up front
    with pytest.raises(RaydiffError, match="fewer than one batch"):
        check_study(replace(job, base=config_lib.apply_overrides(job.base, {"optim.batch_size": 64}),
                            name="t"))
    with pytest.raises(RaydiffError, match="does not exist"):
        check_study(replace(job, features="inception", inception_weights=str(tmp_path / "no.pth"),
                            name="t"))


def test_a_tune_folder_killed_before_its_first_trial_starts_afresh(tmp_path):
    """Tune writes tuner.pkl before any experiment state: a study or search whose driver was
    killed in between is started afresh (Tune's restore of it ran one trial with an empty
    config, and every rerun failed), and resumed once the state exists."""
    from ray import tune

    from raydiff.distributed.runtime import tune_can_resume

    (tmp_path / "tuner.pkl").write_bytes(b"")
    assert tune.Tuner.can_restore(str(tmp_path)) and not tune_can_resume(str(tmp_path))
    (tmp_path / "experiment_state-2026-12-03_23-20-26.json").write_text("{}")
    assert tune_can_resume(str(tmp_path))
    assert not tune_can_resume(str(tmp_path / "never-started"))


STUDY_ARGS = ["--preset", "tiny", "--methods", "ddpm", "ccua", "--seeds", "0,1",
              "--steps", "6", "--per-class", "4", "--no-download",
              "--set", "optim.batch_size=16", "--set", "optim.warmup_steps=2",
              "--set", "sample.steps=4", "--set", "train.log_every=3",
              "--set", "train.ckpt_every=3", "--set", "train.preview_per_class=0"]


@pytest.mark.slow
def test_study_end_to_end_resumed_after_its_driver_is_killed(ray_local, shapes16, tmp_path):
    from raydiff.distributed.runtime import latest_step

    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "TORCH_HOME": str(tmp_path / "no-weights")}
    cmd = [sys.executable, "-m", "raydiff.cli", "study", "--data", str(shapes16),
           "--storage", str(tmp_path), "--name", "s", *STUDY_ARGS]
    runs_dir, names = str(tmp_path / "s" / "runs"), [f"{m}-seed{s}" for m in ("ddpm", "ccua")
                                                     for s in (0, 1)]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(latest_step(runs_dir, n) >= 6 for n in names):
        assert time.monotonic() < deadline and driver.poll() is None, "no run finished"
        time.sleep(0.5)
    driver.kill()  # the study's driver dies while its grid is training
    driver.wait()
    finished = [n for n in names if latest_step(runs_dir, n) >= 6]
    assert len(finished) < len(names), "the driver was killed after the grid had finished"
    logs = {n: (tmp_path / "s" / "runs" / n / "logs" / "metrics.jsonl").read_text()
            for n in finished}

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, text in logs.items():
        after = (tmp_path / "s" / "runs" / name / "logs" / "metrics.jsonl").read_text()
        assert after == text, f"finished run {name} was trained again"

    study = json.loads((tmp_path / "s" / "study.json").read_text())
    assert [(r["variant"], r["seed"]) for r in study["runs"]] == [
        ("ddpm", 0), ("ddpm", 1), ("ccua", 0), ("ccua", 1)]
    assert study["feature_extractor"].startswith("classifier")  # offline: the study's own
    for run in study["runs"]:
        cfg = config_lib.load_json(Path(run["checkpoint"]) / "config.json")
        assert (cfg.loss.method, cfg.train.seed) == (run["variant"], run["seed"])
        assert run["checkpoint"].endswith("checkpoint_000000006")
        on_disk = json.loads((tmp_path / "s" / "eval" / run["run"] / "metrics.json").read_text())
        for set_name in ("overall", "head", "tail"):
            for metric in ("fid", "classifier_top1", "copy_rate", "diversity"):
                assert run["metrics"][set_name][metric] == on_disk["sets"][set_name][metric]
    # the summary is the seeds' mean and interval of those numbers
    for variant in ("ddpm", "ccua"):
        tail = [r["metrics"]["tail"]["fid"] for r in study["runs"] if r["variant"] == variant]
        assert tail[0] != tail[1], "two seeds gave the same samples"
        cell = study["summary"][variant]["tail"]["fid"]
        assert cell["mean"] == pytest.approx(np.mean(tail))
        assert cell["ci95"] == pytest.approx(12.7062 * np.std(tail, ddof=1) / np.sqrt(2),
                                             rel=1e-4)
    diff = study["summary"]["ccua"]["overall"]["fid"]["diff"]["mean"]
    assert diff == pytest.approx(study["summary"]["ccua"]["overall"]["fid"]["mean"]
                                 - study["summary"]["ddpm"]["overall"]["fid"]["mean"])
    text = (tmp_path / "s" / "study.md").read_text()
    assert "| ccua |" in text and "## Copy rate (lower is better)" in text
    assert Image.open(tmp_path / "s" / "study.png").size[0] > 300
    # every run sampled the same labels with the same noise seeds
    manifests = [json.loads((Path(r["samples"]) / "manifest.json").read_text())
                 for r in study["runs"]]
    assert len({json.dumps(m["identity"]["per_class"]) for m in manifests}) == 1
