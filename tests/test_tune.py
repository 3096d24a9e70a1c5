"""Hyperparameter search: the space file, the objective, and real Ray Tune searches."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raydiff import config as config_lib
from raydiff.distributed.tune import (
    DEFAULT_SPACE,
    FLOW_SPACE,
    SearchJob,
    load_space,
    parse_objective,
    record_objective,
    resolve_objective,
    run_search,
    validate_space,
)
from raydiff.errors import RaydiffError

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


def test_flow_default_space_is_valid_for_sit_and_the_ddpm_one_is_not():
    sit = config_lib.preset("sit-tiny")
    validate_space(FLOW_SPACE, sit, "default")
    assert FLOW_SPACE["loss.flow_weight_end"] == {"choice": ["data", "noise"]}
    with pytest.raises(RaydiffError, match="loss.t_align=250 is invalid"):
        validate_space(DEFAULT_SPACE, sit, "default")


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


@pytest.mark.parametrize("text,feature,metric", [
    ("fid_tail", "inception", "fid_tail"),
    ("fid", "inception", "fid"),
    ("fd_pixels_tail", "pixels", "fd_pixels_tail"),
    ("pixels:fd_pixels", "pixels", "fd_pixels"),
    ("pixels:diversity_tail", "pixels", "diversity_tail"),
    ("inception:copy_rate_tail", "inception", "copy_rate_tail"),
    ("loss", "pixels", "loss"),
    ("inception:ucl", "inception", "ucl"),
])
def test_objective_names_its_feature_space(text, feature, metric):
    objective = parse_objective(text)
    assert (objective.feature, objective.metric) == (feature, metric)
    assert parse_objective(str(objective)) == objective


@pytest.mark.parametrize("text,message", [
    ("diversity_tail", "name the feature space, e.g. inception:diversity_tail"),
    ("pixels:fid_tail", "fid_tail is measured in the inception space"),
    ("inception:fd_pixels", "fd_pixels is measured in the pixels space"),
    ("recall", "metric 'recall' is never reported"),
    ("pixels:recall", "metric 'recall' is never reported"),
    ("vgg:fid", "name the feature space"),
])
def test_bad_objective_is_refused_with_one_line(text, message):
    with pytest.raises(RaydiffError, match=message):
        parse_objective(text)


def test_inception_objective_without_weights_is_refused_not_switched(monkeypatch, tmp_path):
    _offline(monkeypatch)
    job = SearchJob(data="unused", base=BASE, storage=str(tmp_path), name="s", space=DEFAULT_SPACE)
    with pytest.raises(RaydiffError, match="needs the Inception weights .*--objective fd_pixels_tail"):
        resolve_objective(job)
    spec, metric = resolve_objective(dataclasses.replace(job, objective="fd_pixels_tail"))
    assert (spec.feature, spec.weights, metric) == ("pixels", None, "fd_pixels_tail")


def test_resumed_search_refuses_another_objective(tmp_path, inception_weights):
    job = SearchJob(data="unused", base=BASE, storage=str(tmp_path), name="s", space=DEFAULT_SPACE,
                    objective="fd_pixels_tail")
    spec, metric = resolve_objective(job)
    record_objective(job, spec, metric)
    assert json.loads((tmp_path / "s" / "objective.json").read_text()) == {
        "objective": "pixels:fd_pixels_tail"}
    assert resolve_objective(dataclasses.replace(job, objective="pixels:fd_pixels_tail"))[1] == \
        "fd_pixels_tail"  # the same objective, spelt out
    other = dataclasses.replace(job, objective="fid_tail", inception_weights=str(inception_weights))
    with pytest.raises(RaydiffError, match=r"optimises --objective pixels:fd_pixels_tail, not "
                                           r"inception:fid_tail"):
        resolve_objective(other)


def _search(data, storage, name, **kw) -> SearchJob:
    return SearchJob(data=str(data), base=BASE, storage=str(storage), name=name,
                     **{"space": DEFAULT_SPACE, "trials": 4, "max_steps": 20, "eval_every": 5,
                                             "objective": "fd_pixels_tail",
                                             "eval_per_class": 6, "eval_steps": 4,
                                             "reference_per_class": 24, **kw})


def _rows(storage: Path, name: str) -> list[dict]:
    with (storage / name / "results.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_search_stops_weak_trials_and_writes_a_usable_best_config(
        ray_local, shapes16, tmp_path, capsys):
    # One trial at a time, so ASHA's decisions are reproducible: the learning rate that
    # learns runs first and reaches every rung; the one that cannot learn (its network stays
    # at its initial weights) has the higher loss at its first rungs and is stopped there.
    space = {"optim.lr": {"grid": [2e-3, 1e-9]}}
    summary = run_search(_search(shapes16, tmp_path, "asha", space=space, trials=1,
                                 objective="loss", max_concurrent_trials=1))
    rows = _rows(tmp_path, "asha")
    assert len(rows) == 2 and summary["metric"] == "loss"
    assert [float(r["optim.lr"]) for r in rows] == [2e-3, 1e-9], "the table is best first"
    assert float(rows[0]["loss"]) < float(rows[1]["loss"])
    assert int(rows[0]["reports"]) == 4 and int(rows[1]["reports"]) < 4, \
        "ASHA did not stop the trial that cannot learn"
    # evaluated off the report barrier, the last objective still comes with its own step
    assert int(rows[0]["step"]) == 20
    assert {"fd_pixels_tail", "copy_rate_tail", "diversity_tail", "ddpm"} <= set(rows[0])
    assert json.loads((tmp_path / "asha" / "objective.json").read_text()) == {
        "objective": "pixels:loss"}
    best = config_lib.load_json(tmp_path / "asha" / "best_config.json")
    assert best.optim.lr == 2e-3
    # `raydiff train --config` takes it as it is: the config a run on the same data would
    # train with (what happens after that is every training run's path, tested in
    # test_train.py) is the best trial's, given the dataset's 4 classes
    from raydiff.cli import main

    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "asha" / "best_config.json"),
                 "--data", str(shapes16), "--dry-run"]) == 0
    assert config_lib.from_dict(json.loads(capsys.readouterr().out)) == \
        config_lib.apply_overrides(best, {"model.num_classes": 4})


@pytest.mark.slow
def test_placement_groups_made_during_a_search_are_released_after_it(ray_local, caplog):
    # A group a search's trials left reserved, in miniature: made inside the block and never
    # removed by its maker. One made before the block is not the search's and stays.
    from ray.util.placement_group import placement_group, remove_placement_group

    from raydiff.distributed.runtime import releasing_placement_groups

    kept = placement_group([{"CPU": 0.01}])
    ray_local.get(kept.ready())
    with caplog.at_level(logging.WARNING, logger="raydiff"):
        with releasing_placement_groups(wait_s=1.0):
            leaked = placement_group([{"CPU": 0.01}])
            ray_local.get(leaked.ready())
    table = ray_local.util.placement_group_table()
    assert table[leaked.id.hex()]["state"] == "REMOVED"
    assert table[kept.id.hex()]["state"] == "CREATED"
    assert f"removed 1 placement group(s) still reserved 1 s after the trials ended: " \
           f"{leaked.id.hex()}" in caplog.text
    remove_placement_group(kept)


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
           "--objective", "fd_pixels_tail",
           "--trials", "2", "--steps", "10", "--eval-every", "5", "--eval-per-class", "6",
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
