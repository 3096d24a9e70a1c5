"""Starting or joining Ray, and whether a cluster can ever place what a command asks for.

A request is a number of equal bundles, one per Ray Train worker or Ray Data actor (its CPUs
and GPUs). Before any worker starts, ``check_placement`` answers two questions:

- Can the cluster place it now? Counted over the alive nodes (``ray.nodes()``), a node
  holding as many bundles as each of its resources allows.
- If not, can it ever? A cluster that autoscales starts small (``cluster.yaml``'s head has
  0 CPUs and its worker types ``min_workers: 0``), so its capacity is what its node types can
  become: the autoscaler config's ``available_node_types`` with their ``max_workers`` (and
  the cluster's ``max_workers``). A request no cluster of those types can hold fails at once
  with one line; one they can hold is asked for with a placement group, which the autoscaler
  sees and scales up for, and fails with one line if it is not placed within
  ``placement_timeout`` seconds.

The autoscaler config is the file given with ``--autoscaler-config`` or
``RAYDIFF_AUTOSCALER_CONFIG``, else the one the cluster launcher leaves on the head
(``~/ray_bootstrap_config.yaml``: jobs run there). Without one (a fixed cluster, or KubeRay,
whose autoscaler reads the RayCluster resource) the current nodes decide, unless
``--placement-timeout`` / ``RAYDIFF_PLACEMENT_TIMEOUT`` allows waiting for new ones.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from raydiff.errors import RaydiffError

BOOTSTRAP_CONFIG = Path.home() / "ray_bootstrap_config.yaml"
DEFAULT_WAIT_S = 600.0  # how long an autoscaling cluster may take to add nodes


@dataclass(frozen=True)
class Settings:
    autoscaler_config: str | None = None
    placement_timeout: float | None = None  # None: DEFAULT_WAIT_S when the cluster autoscales


_settings = Settings()


def configure(autoscaler_config: str | None = None,
              placement_timeout: float | None = None) -> None:
    """The process's cluster settings (the CLI's flags); the environment fills the rest."""
    global _settings
    timeout = placement_timeout
    if timeout is None and os.environ.get("RAYDIFF_PLACEMENT_TIMEOUT"):
        text = os.environ["RAYDIFF_PLACEMENT_TIMEOUT"]
        try:
            timeout = float(text)
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and timeout >= 0):
            raise RaydiffError(f"RAYDIFF_PLACEMENT_TIMEOUT={text!r} is not a number of "
                               f"seconds >= 0")
    config = autoscaler_config or os.environ.get("RAYDIFF_AUTOSCALER_CONFIG")
    if config:
        load_node_types(config)  # a missing or broken file is refused before Ray starts
    _settings = Settings(config, timeout)


# --- starting or joining Ray ----------------------------------------------------------------

def init_ray(num_cpus_hint: float | None = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray sized for this machine."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    # Locally, workers reserve CPUs that Ray Data's decode tasks also need: leave one over.
    cpus = max(os.cpu_count() or 1, math.ceil(num_cpus_hint or 0) + 1)
    # Ray Train's placement-group cleaner finds the cluster's state API through the
    # environment, or else by scanning the machine, which fails when another Ray runs beside
    # this one; it then leaks each finished run's placement group and a later run waits
    # forever for those CPUs. So the dashboard (which serves that API) gets a port chosen
    # here, and every worker is told its address.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"127.0.0.1:{port}"
    context = ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=port,
                       runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://{url}"}})
    if context.dashboard_url != url:
        raise RuntimeError(f"local Ray's dashboard started at {context.dashboard_url}, not {url}")


# --- can the cluster place a request --------------------------------------------------------

@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_count: int


def _fits(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many bundles one node holds."""
    counts = [math.floor(node.get(key, 0.0) / amount + 1e-9)
              for key, amount in bundle.items() if amount > 0]
    return min(counts) if counts else 0


def load_node_types(path: str | Path) -> tuple[list[NodeType], int, str | None]:
    """A cluster-launcher config's node types, its ``max_workers`` and its head type."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise RaydiffError(f"autoscaler config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise RaydiffError(f"autoscaler config {path}: {err}") from None
    types = (config or {}).get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise RaydiffError(f"autoscaler config {path} has no available_node_types")
    head = config.get("head_node_type")
    nodes = []
    for name, spec in types.items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        count = 1 if name == head else int(spec.get("max_workers", spec.get("min_workers", 0)))
        nodes.append(NodeType(name, resources, count))
    return nodes, int(config.get("max_workers", sum(n.max_count for n in nodes))), head


def largest_placement(types: list[NodeType], max_workers: int, head: str | None,
                      bundle: dict[str, float]) -> int:
    """Bundles the largest cluster of these node types holds: the head, then the worker
    types that hold most bundles a node, up to ``max_workers`` worker nodes."""
    total, left = 0, max_workers
    for node in sorted(types, key=lambda t: (t.name != head, -_fits(t.resources, bundle))):
        if node.name == head:
            total += _fits(node.resources, bundle)
            continue
        count = min(node.max_count, left)
        total += count * _fits(node.resources, bundle)
        left -= count
    return total


def _describe(bundle: dict[str, float]) -> str:
    return " + ".join(f"{v:g} {k}s" for k, v in bundle.items() if v > 0)


def _autoscaler_config() -> str | None:
    if _settings.autoscaler_config:
        return _settings.autoscaler_config
    return str(BOOTSTRAP_CONFIG) if BOOTSTRAP_CONFIG.is_file() else None


def current_capacity(bundle: dict[str, float]) -> int:
    """Bundles the alive nodes hold (whether busy or not)."""
    import ray

    return sum(_fits(node["Resources"], bundle) for node in ray.nodes() if node.get("Alive"))


def _node_types_capacity(config: str, bundle: dict[str, float]) -> int | None:
    """Bundles the largest cluster of a config's node types holds; None when a worker type
    leaves its resources to be detected from the instance type."""
    types, max_workers, head = load_node_types(config)
    if any(not t.resources for t in types if t.name != head):
        return None
    return largest_placement(types, max_workers, head, bundle)


def potential_capacity(bundle: dict[str, float]) -> int:
    """Bundles the cluster holds at its largest: its node types' when it autoscales (and
    they are known), else its alive nodes'."""
    now = current_capacity(bundle)
    config = _autoscaler_config()
    ever = _node_types_capacity(config, bundle) if config else None
    return now if ever is None else max(now, ever)


def check_placement(what: str, count: int, bundle: dict[str, float]) -> None:
    """Refuse, in one line, ``count`` bundles the cluster can never place; wait (up to the
    placement timeout) while an autoscaler adds the nodes for ones it can."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {k: float(v) for k, v in bundle.items() if v > 0}
    request = f"{what}: {count} x ({_describe(bundle)})"
    now = current_capacity(bundle)
    if now >= count:
        return
    config = _autoscaler_config()
    timeout = _settings.placement_timeout
    if config is not None:
        ever = _node_types_capacity(config, bundle)
        if ever is not None and max(now, ever) < count:
            raise RaydiffError(f"{request} requested, but the node types of {config} can "
                               f"place at most {ever} such bundles")
        timeout = DEFAULT_WAIT_S if timeout is None else timeout
    if not timeout:
        total = ray.cluster_resources()
        have = ", ".join(f"{total.get(k, 0):g} {k}s" for k in bundle)
        raise RaydiffError(f"{request} requested, but the cluster has {have} and room for "
                           f"{now} such bundles (no autoscaler config; --autoscaler-config or "
                           f"--placement-timeout to wait for new nodes)")
    # A pending placement group is the demand an autoscaler scales up for.
    group = placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
    try:
        if not group.wait(timeout_seconds=timeout):
            raise RaydiffError(f"{request} was not placed within {timeout:g} s: the cluster "
                               f"did not grow to hold it (see `ray status`)")
    finally:
        remove_placement_group(group)
