"""The deployment files: cluster.yaml as `ray up` reads it, the KubeRay RayJob, the upload set.

`ray up` loads the YAML, fills in the provider's defaults (`prepare_config`) and validates the
result against the JSON schema Ray ships (`validate_config`, ray/autoscaler/ray-schema.json)
before it talks to the cloud; these tests run exactly those steps, offline, then check the
properties the cluster must keep: GPU node types that scale from zero, S3 storage, /dev/shm,
Ray 2.60 everywhere, and nothing but SSH open to the internet.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raydiff.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
RAY_VERSION = ".".join(ray.__version__.split(".")[:2])  # 2.60
SHM_SIZE = re.compile(r"--shm-size=(\d+)g$")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load_yaml(REPO / "cluster.yaml")


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def onprem_block() -> dict:
    """The commented on-premise alternative at the end of cluster.yaml, uncommented."""
    tail = (REPO / "cluster.yaml").read_text().split("# --- On premise", 1)[1]
    lines = [line[2:] for line in tail.splitlines() if line.startswith("# ")]
    text = "\n".join(lines)
    return yaml.safe_load(text[text.index("cluster_name:"):])


def test_cluster_yaml_passes_the_launchers_own_validation(cluster):
    jsonschema.validate(cluster, ray_schema())  # the file as written
    prepared = prepare_config(copy.deepcopy(cluster))  # what `ray up` validates
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def test_onprem_alternative_is_a_valid_local_cluster():
    onprem = onprem_block()
    assert onprem["provider"]["type"] == "local"
    assert onprem["provider"]["head_ip"] and onprem["provider"]["worker_ips"]
    validate_config(prepare_config(copy.deepcopy(onprem)))


def test_gpu_node_types_scale_from_zero_and_the_head_runs_no_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    gpu_counts = {}
    for name, spec in types.items():
        if name == cluster["head_node_type"]:
            continue
        assert spec["resources"]["GPU"] >= 1
        assert spec["min_workers"] == 0 and spec["max_workers"] >= 1, name
        gpu_counts[name] = spec["resources"]["GPU"]
    assert sorted(gpu_counts.values()) == [1, 8]
    assert cluster["max_workers"] >= max(s.get("min_workers", 0) for s in types.values())


def test_every_node_gets_ray_260_and_enough_shared_memory(cluster):
    docker = cluster["docker"]
    images = [docker["image"], docker.get("head_image"), docker.get("worker_image")]
    images += [t.get("docker", {}).get("worker_image") for t in cluster["available_node_types"].values()]
    for image in filter(None, images):
        assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}\.\d+-py3\d+-gpu", image)
    assert not docker.get("disable_shm_size_detection")
    head_shm = [SHM_SIZE.match(o) for o in docker["run_options"] + docker["head_run_options"]]
    assert int(next(m for m in head_shm if m).group(1)) >= 8
    for name, spec in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        options = docker["run_options"] + spec["docker"]["worker_run_options"]
        size_gb = int(next(m for m in map(SHM_SIZE.match, options) if m).group(1))
        assert size_gb >= 10 * spec["resources"]["GPU"] or size_gb >= 200, name


def test_storage_is_s3_through_instance_profiles(cluster):
    commands = " ".join(cluster["setup_commands"] + cluster["head_setup_commands"])
    assert "s3://" in commands  # `ray up` checks the bucket is writable
    assert "pip install" in commands and "~/raydiff" in commands
    assert cluster["file_mounts"]["~/raydiff"] == "."
    assert {".gitignore", ".rayignore"} <= set(cluster["rsync_filter"])
    for name, spec in cluster["available_node_types"].items():
        if name != cluster["head_node_type"]:  # the head gets the profile `ray up` creates
            assert spec["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_nothing_but_ssh_is_open_to_the_internet(cluster):
    rules = cluster["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if {"0.0.0.0/0", "::/0"} & set(ranges):
            assert rule["FromPort"] == rule["ToPort"] == 22, rule
    for types in cluster["available_node_types"].values():
        assert "NetworkInterfaces" not in types["node_config"]
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` only
    assert "0.0.0.0" not in json.dumps(cluster)


def test_the_onprem_block_turns_on_token_authentication_on_every_node():
    block = onprem_block()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in block[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key
    # the token made with `ray get-auth-token --generate` reaches every node at Ray's default path
    assert block["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--dashboard-host=127.0.0.1" in " ".join(block["head_start_ray_commands"])


def kuberay_documents() -> dict:
    docs = list(yaml.safe_load_all((REPO / "deploy" / "kuberay-rayjob.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def test_kuberay_rayjob_runs_the_train_job_on_gpu_groups_with_s3():
    docs = kuberay_documents()
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    entry = shlex.split(spec["entrypoint"])
    assert entry[0] == "python" and entry[1].endswith("/jobs/train.py")
    args = build_parser().parse_args(["train", *entry[2:]])  # flags raydiff accepts
    assert args.storage.startswith("s3://") and args.data.startswith("s3://") and args.name
    # the worker groups start empty and the job cannot read their sizes: it waits for nodes
    assert args.placement_timeout and args.placement_timeout >= 300

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith(RAY_VERSION + ".")
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and "enableIngress" not in head
    assert "Ingress" not in docs
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert sorted(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
                  for g in groups.values()) == [1, 8]
    assert all(g["minReplicas"] == 0 for g in groups.values())

    account = docs["ServiceAccount"]["metadata"]
    assert account["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for pod in [head["template"]] + [g["template"] for g in groups.values()]:
        assert pod["spec"]["serviceAccountName"] == account["name"]
        shm = {v["name"] for v in pod["spec"]["volumes"] if v["emptyDir"].get("medium") == "Memory"}
        mounts = pod["spec"]["containers"][0]["volumeMounts"]
        assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in mounts)


def test_kuberay_cluster_has_token_auth_and_admits_only_its_own_pods():
    docs = kuberay_documents()
    assert docs["RayJob"]["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    policy = docs["NetworkPolicy"]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]  # one rule, no ports opened to everyone
    peers = rule["from"]
    assert all("ipBlock" not in peer for peer in peers)
    labels = [peer["podSelector"]["matchLabels"] for peer in peers]
    assert {"ray.io/is-ray-node": "yes"} in labels
    assert {"job-name": docs["RayJob"]["metadata"]["name"]} in labels  # its submitter
    operator = [p for p in peers if "namespaceSelector" in p]
    assert [p["podSelector"]["matchLabels"] for p in operator] == [
        {"app.kubernetes.io/name": "kuberay-operator"}]


def test_the_kuberay_image_is_ray_260_with_the_job_scripts():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{RAY_VERSION}.")
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M)
    sources = [s for line in copied for s in line.split()]
    assert {"raydiff", "jobs", "pyproject.toml"} <= set(sources)
    assert all((REPO / s).exists() for s in sources)
    image = kuberay_documents()["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert image["template"]["spec"]["containers"][0]["image"].startswith("REGISTRY/raydiff:")


# --- the working directory `ray job submit --working-dir .` uploads ---------------------------

def package(directory: Path, tmp_path: Path) -> tuple[list[str], int]:
    """The files and zip size Ray would upload for ``--working-dir directory``."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / "working_dir.zip"
    create_package(str(directory), target, include_gitignore=True,
                   excludes=ray_constants.get_runtime_env_default_excludes())
    return sorted(zipfile.ZipFile(target).namelist()), target.stat().st_size


def test_uploads_leave_out_data_runs_checkpoints_and_caches(tmp_path):
    tree = tmp_path / "repo"
    files = ["raydiff/data/parquet.py", "jobs/train.py", "README.md",  # kept
             "data/cifar10-lt/train/part-00000.parquet", "runs/c10/checkpoint_000000020/model.safetensors",
             "runs/c10/logs/metrics.jsonl", "elsewhere/weights.pt", "notes/shard.parquet",
             ".benchmarks/Linux/0001.json", ".git/objects/ab", "raydiff/__pycache__/cli.cpython-311.pyc",
             "raydiff.egg-info/PKG-INFO", ".pytest_cache/v/cache", "archive.tar.gz"]
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    for ignore in (".gitignore", ".rayignore"):
        (tree / ignore).write_text((REPO / ignore).read_text())
    names, _ = package(tree, tmp_path)
    assert names == [".gitignore", ".rayignore", "README.md", "jobs/train.py",
                     "raydiff/data/parquet.py"]


def test_the_repository_uploads_small(tmp_path):
    names, size = package(REPO, tmp_path)
    assert "jobs/train.py" in names and "raydiff/distributed/train.py" in names
    assert size < 5 * 2**20, f"the working directory zips to {size / 2**20:.1f} MiB"
