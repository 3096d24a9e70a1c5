"""A cluster that starts with no worker nodes: resource checks, Ray jobs and Tune on it.

The placement arithmetic is checked without Ray; then jobs are submitted with `ray job submit`
to Ray's real autoscaler over its ``fake_multinode`` provider (``autoscaling_head`` in
tests/conftest.py): a 0-CPU head like cluster.yaml's and one 2-CPU worker type at
``min_workers: 0``, so every CPU a job uses comes from a node the autoscaler adds for it.
The jobs run the scripts where they are installed (as the KubeRay image does) rather than from
an uploaded working directory: the fake nodes share one session folder, where one node's
runtime-env agent deleted a working directory another node's job was still using
(`--working-dir` uploads are tested on the session's cluster, tests/test_jobs.py).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest
from conftest import FAKE_WORKER_TYPE
from test_jobs import submit, wait

from raydiff.distributed import runtime as cluster
from raydiff.distributed.runtime import NodeType, find_latest_checkpoint, largest_placement, load_node_types
from raydiff.errors import RaydiffError

REPO = Path(__file__).resolve().parents[1]
TINY = ["optim.batch_size=16", "optim.warmup_steps=5", "train.log_every=5",
        "train.ckpt_every=10", "train.preview_per_class=0", "sample.steps=4"]


def test_repository_cluster_yaml_node_types_and_their_largest_placement():
    types, max_workers, head = load_node_types(REPO / "cluster.yaml")
    by_name = {t.name: t for t in types}
    assert head == "head" and by_name["head"].resources == {"CPU": 0.0}
    assert by_name["gpu-1x"].resources == {"CPU": 8.0, "GPU": 1.0}
    # workers of 1 GPU and 8 CPUs: 2 gpu-8x nodes hold 8 each, and the cluster's other
    # 8 worker nodes (max_workers: 10) are gpu-1x nodes holding 1 each
    assert max_workers == 10
    assert largest_placement(types, max_workers, head, {"CPU": 8.0, "GPU": 1.0}) == 2 * 8 + 8
    assert largest_placement(types, max_workers, head, {"CPU": 1.0, "GPU": 9.0}) == 0


@pytest.mark.parametrize("bundle,expected", [
    ({"CPU": 1.0}, 1 * 0 + 3 * 2),  # head holds none; 3 nodes x 2
    ({"CPU": 2.0}, 3),
    ({"CPU": 3.0}, 0),  # bigger than any node
    ({"CPU": 0.5, "GPU": 1.0}, 0),  # no node type has a GPU
    ({"CPU": 1.5}, 3),  # a node holds one: 1.5 + 1.5 > 2
])
def test_largest_placement_counts_whole_bundles_per_node(bundle, expected):
    types = [NodeType("head", {"CPU": 0.0}, 1), NodeType("cpu-2", {"CPU": 2.0}, 3)]
    assert largest_placement(types, 10, "head", bundle) == expected
    assert largest_placement(types, 1, "head", {"CPU": 1.0}) == 2  # the cluster's max_workers


def test_cluster_settings_come_from_flags_or_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDIFF_PLACEMENT_TIMEOUT", "soon")
    with pytest.raises(RaydiffError, match="RAYDIFF_PLACEMENT_TIMEOUT='soon' is not a number"):
        cluster.configure()
    monkeypatch.setenv("RAYDIFF_PLACEMENT_TIMEOUT", "12")
    config = tmp_path / "c.yaml"
    config.write_text("available_node_types:\n  w: {resources: {CPU: 4}, max_workers: 2}\n")
    monkeypatch.setenv("RAYDIFF_AUTOSCALER_CONFIG", str(config))
    cluster.configure()
    assert cluster._settings == cluster.Settings(str(config), 12.0)
    cluster.configure(placement_timeout=0.0)  # the flag wins
    assert cluster._settings.placement_timeout == 0.0
    monkeypatch.delenv("RAYDIFF_AUTOSCALER_CONFIG")
    monkeypatch.delenv("RAYDIFF_PLACEMENT_TIMEOUT")
    cluster.configure()
    assert cluster._settings == cluster.Settings()


# --- on the autoscaling cluster ---------------------------------------------------------------

def _nodes(head) -> list:
    from ray.util.state import list_nodes

    return list_nodes(address=head.dashboard_url, detail=True, limit=100)


@pytest.mark.slow
def test_train_job_from_zero_worker_nodes_and_a_request_no_node_type_holds(
        autoscaling_head, shapes16, tmp_path):
    head = autoscaling_head
    assert [n.state for n in _nodes(head)] == ["ALIVE"], "the cluster starts with its head alone"
    flags = ["--autoscaler-config", str(head.autoscaler_config)]

    # larger than the node types can ever provide: refused at once, in one line
    started = time.monotonic()
    job_id, _ = submit(head.dashboard_url, "jobs/train.py", "--data", str(shapes16),
                       "--storage", str(tmp_path), "--name", "huge", "--preset", "tiny",
                       "--workers", "4", "--cpus-per-worker", "3", *flags, working_dir=False)
    logs = wait(head.dashboard_url, job_id, expected="FAILED")
    assert time.monotonic() - started < 120
    refusal = [line for line in logs.splitlines() if "error:" in line]
    assert len(refusal) == 1 and ("4 workers: 4 x (3 CPUs) requested, but the node types of "
                                  f"{head.autoscaler_config} can place at most 0") in refusal[0]
    assert not (tmp_path / "huge").exists()

    # two workers on a cluster that has no CPU: the autoscaler adds nodes, the run finishes
    job_id, _ = submit(head.dashboard_url, "jobs/train.py", "--data", str(shapes16),
                       "--storage", str(tmp_path), "--name", "scaled", "--preset", "tiny",
                       "--workers", "2", *flags, *[a for o in TINY for a in ("--set", o)],
                       "--set", "optim.total_steps=10", working_dir=False)
    logs = wait(head.dashboard_url, job_id)
    assert "trained scaled: step 10" in logs
    assert find_latest_checkpoint(str(tmp_path), "scaled").endswith("checkpoint_000000010")
    workers = [n for n in _nodes(head) if not n.is_head_node]
    assert workers, "no worker node was added"
    assert {n.resources_total.get("CPU") for n in workers} == {FAKE_WORKER_TYPE["resources"]["CPU"]}


@pytest.mark.slow
def test_tune_job_runs_its_trials_on_nodes_the_autoscaler_adds_and_writes_to_s3(
        autoscaling_head, shapes16, s3_bucket, tmp_path):
    """A search submitted as a job, its trials on added nodes, its storage the test's S3
    server: every file of the search lands in the bucket."""
    from test_s3 import jsonl, listing, read, s3_client

    from raydiff import config as config_lib

    head, s3 = autoscaling_head, s3_client()
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"loss.ucl_weight": {"grid": [0.5, 1.0]}}))
    storage = f"{s3_bucket}/searches"
    job_id, _ = submit(
        head.dashboard_url, "jobs/tune.py", "--data", str(shapes16), "--storage", storage,
        "--name", "search", "--preset", "tiny", "--scheduler", "fifo", "--trials", "1",
        "--space", str(space), "--objective", "fd_pixels_tail", "--steps", "10",
        "--eval-every", "5", "--eval-per-class", "4", "--eval-steps", "4",
        "--reference-per-class", "12", "--autoscaler-config", str(head.autoscaler_config),
        *[a for o in TINY for a in ("--set", o)], working_dir=False)
    logs = wait(head.dashboard_url, job_id)
    assert "best config:" in logs
    assert any(not n.is_head_node for n in _nodes(head))

    search = f"{storage}/search"
    rows = list(csv.DictReader(io.StringIO(read(s3, f"{search}/results.csv").decode())))
    assert len(rows) == 2 and all(r["status"] == "done" and float(r["fd_pixels_tail"]) > 0
                                  for r in rows)
    assert sorted(float(r["loss.ucl_weight"]) for r in rows) == [0.5, 1.0]
    assert json.loads(read(s3, f"{search}/objective.json")) == {
        "objective": "pixels:fd_pixels_tail"}
    best = config_lib.from_dict(json.loads(read(s3, f"{search}/best_config.json")))
    assert best.loss.ucl_weight == float(rows[0]["loss.ucl_weight"])  # the table is best first
    files = listing(s3, search)
    for row in rows:
        trial = row["trial"]
        assert f"trials/{trial}/checkpoint_000000010/state.json" in files
        logged = jsonl(read(s3, f"{search}/trials/{trial}/logs/metrics.jsonl"))
        # reports at steps 5 and 10; each evaluation arrives with the next report (rank 0
        # computes it beside training), the last one in an extra report after step 10
        assert [(m["step"], m.get("eval_step")) for m in logged] == [
            (5, None), (10, 5), (10, 10)]
