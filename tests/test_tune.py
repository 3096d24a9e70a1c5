"""Hyperparameter search: the space file, the objective, and real Ray Tune searches."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raydiff import config as config_lib
from raydiff.errors import RaydiffError
from raydiff.tune import (DEFAULT_SPACE, SearchJob, load_space, resolve_objective, run_search,
                          validate_space)

BASE = config_lib.resolve("tiny", overrides=[
    "optim.batch_size=16", "optim.warmup_steps=5", "sample.steps=4"])


@pytest.mark.parametrize("space,message", [
    ({"loss.alpha": {"uniform": [0, 1]}}, "unknown config key 'loss.alpha'"),
    ({"loss.ucl_weight": {"uniform": [1, 1]}}, "empty range [1, 1]"),
    ({"loss.ucl_weight": {"loguniform": [0, 1]}}, "loguniform needs low > 0"),
    ({"loss.t_align": {"choice": []}}, "choice needs a non-empty list"),
    ({"loss.t_align": {"choice": [0, "late"]}}, "loss.t_align='late' is invalid"),
    ({"loss.t_align": {"normal": [0, 1]}}, "expected one of uniform, loguniform, choice, grid"),
    ({"loss.t_align": {"choice": [0, 1000]}}, "loss.t_align=1000 is invalid"),
])
def test_bad_space_is_rejected_with_key_and_value(space, message):
    with pytest.raises(RaydiffError) as err:
        validate_space(space, BASE, "space.yaml")
    assert message in str(err.value) and str(err.value).startswith("space.yaml: ")


def test_default_space_is_valid_and_covers_the_design():
    validate_space(DEFAULT_SPACE, BASE, "default")
    assert DEFAULT_SPACE["loss.t_align"] == {"choice": [0, 250, 500, 750]}
    assert DEFAULT_SPACE["loss.ucl_weight"] == {"loguniform": [1e-3, 2.0]}


def test_space_files_in_yaml_and_json(tmp_path):
    (tmp_path / "s.yaml").write_text("loss.al_weight:\n  loguniform: [0.01, 1]\n"
                                     "optim.lr:\n  grid: [0.0001, 0.0002]\n")
    assert load_space(tmp_path / "s.yaml")["optim.lr"] == {"grid": [0.0001, 0.0002]}
    (tmp_path / "s.json").write_text(json.dumps({"loss.t_align": {"choice": [0, 500]}}))
    assert load_space(tmp_path / "s.json") == {"loss.t_align": {"choice": [0, 500]}}
    (tmp_path / "bad.yaml").write_text("loss.al_weight:\n  loguniform: [0.01, 1\n")
    with pytest.raises(RaydiffError, match=r"bad.yaml line \d"):
        load_space(tmp_path / "bad.yaml")


def _offline(monkeypatch):
    from raydiff import features

    def unavailable(path=None, download=True):
        raise features.WeightsUnavailable("no weights on this machine")
    monkeypatch.setattr(features, "resolve_weights", unavailable)


def test_offline_objective_says_which_metric_it_uses(monkeypatch, caplog, tmp_path):
    _offline(monkeypatch)
    job = SearchJob(data="unused", base=BASE, storage=str(tmp_path), name="s", space=DEFAULT_SPACE)
    spec, metric = resolve_objective(job)
    assert (spec.feature, metric) == ("pixels", "fd_pixels_tail")
    assert "fd_pixels" in caplog.text and "instead of FID" in caplog.text
    with pytest.raises(RaydiffError, match="metric 'recall' is never reported"):
        resolve_objective(SearchJob(data="unused", base=BASE, storage=str(tmp_path), name="s",
                                    space=DEFAULT_SPACE, metric="recall"))


def _search(data, storage, name, **kw) -> SearchJob:
    return SearchJob(data=str(data), base=BASE, storage=str(storage), name=name,
                     space=DEFAULT_SPACE, **{"trials": 4, "max_steps": 20, "eval_every": 5,
                                             "eval_per_class": 6, "eval_steps": 4,
                                             "reference_per_class": 24, **kw})


def _rows(storage: Path, name: str) -> list[dict]:
    with (storage / name / "results.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_search_stops_weak_trials_and_writes_a_usable_best_config(
        ray_local, shapes16, tmp_path, monkeypatch):
    _offline(monkeypatch)
    summary = run_search(_search(shapes16, tmp_path, "asha"))
    rows = _rows(tmp_path, "asha")
    assert len(rows) == 4 and summary["metric"] == "fd_pixels_tail"
    values = [float(r["fd_pixels_tail"]) for r in rows]
    assert values == sorted(values), "the table is best first"
    assert any(int(r["reports"]) < 4 for r in rows), "ASHA stopped no trial early"
    assert {"loss", "fd_pixels", "loss.ucl_weight", "loss.t_align"} <= set(rows[0])
    best = config_lib.load_json(tmp_path / "asha" / "best_config.json")
    assert best.loss.t_align == int(rows[0]["loss.t_align"])
    assert best.loss.ucl_weight == pytest.approx(float(rows[0]["loss.ucl_weight"]))
    from raydiff.cli import main

    assert main(["train", "--config", str(tmp_path / "asha" / "best_config.json"),
                 "--data", str(shapes16), "--storage", str(tmp_path), "--name", "best",
                 "--set", "optim.total_steps=5", "--set", "train.log_every=5"]) == 0
    trained = config_lib.load_json(tmp_path / "best" / "checkpoint_000000005" / "config.json")
    assert trained.loss == best.loss


def _terminated_trials(storage: Path, name: str) -> set[str]:
    """Trials Tune has recorded as finished in its experiment state."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(str(storage / name)).trials
    except (FileNotFoundError, ValueError, RuntimeError):
        return set()  # no experiment state written yet
    return {t.trial_id for t in trials if t.status == "TERMINATED"}


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(
        ray_local, shapes16, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "TORCH_HOME": str(tmp_path / "no-weights")}
    cmd = [sys.executable, "-m", "raydiff.cli", "tune", "--data", str(shapes16),
           "--storage", str(tmp_path), "--name", "resume", "--scheduler", "fifo",
           "--trials", "2", "--max-steps", "10", "--eval-every", "5", "--eval-per-class", "6",
           "--eval-steps", "4", "--reference-per-class", "24", "--preset", "tiny",
           "--set", "optim.batch_size=16", "--set", "optim.warmup_steps=5",
           "--set", "sample.steps=4"]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while not _terminated_trials(tmp_path, "resume"):
        assert time.monotonic() < deadline and driver.poll() is None, "no trial finished"
        time.sleep(0.5)
    driver.kill()  # the search driver dies mid-search
    driver.wait()
    finished = _terminated_trials(tmp_path, "resume")
    logs = {t: (tmp_path / "resume" / "trials" / t / "logs" / "metrics.jsonl").read_text()
            for t in finished}
    run_search(_search(shapes16, tmp_path, "resume", scheduler="fifo", trials=2,
                       max_steps=10))
    rows = _rows(tmp_path, "resume")
    assert len(rows) == 2 and all(r["fd_pixels_tail"] for r in rows)
    for trial, text in logs.items():
        after = (tmp_path / "resume" / "trials" / trial / "logs" / "metrics.jsonl").read_text()
        assert after == text, f"finished trial {trial} was run again"
