"""What every Ray command shares: starting or joining Ray, whether the cluster can place a
request, the TorchTrainer factory, reporting from workers, and the run registry.

Placement
---------

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

Runs
----
A run is Ray Train's ``storage_path/name`` folder (a path or a URI). Ray's own record of it
(``ray.train.Result.from_path``), not a directory listing, says which checkpoint is the latest
complete one: ``find_latest_checkpoint`` and ``latest_step`` read it. Workers report through
``report``: every rank calls it (a report is a barrier), rank 0 writes the checkpoint and the
run's logs. ``torch_trainer`` builds the ``TorchTrainer`` of ``raydiff train`` and
``raydiff classify`` with the same scaling, failure, checkpoint and logging settings, and
``fit`` turns a failed run or a worker's non-finite-loss stop into one ``RaydiffError`` line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import posixpath
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydiff.errors import RaydiffError
from raydiff.storage import is_uri

logger = logging.getLogger(__name__)

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
    env = {"RAY_API_SERVER_ADDRESS": f"http://{url}", **quiet_ray_environment()}
    os.environ.update({k: v for k, v in env.items() if k != "RAY_API_SERVER_ADDRESS"})
    context = ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=port, runtime_env={"env_vars": env},
                       logging_level=logging.INFO if verbose() else logging.WARNING)
    if context.dashboard_url != url:
        raise RuntimeError(f"local Ray's dashboard started at {context.dashboard_url}, not {url}")


def quiet_ray_environment() -> dict[str, str]:
    """What a local Ray's processes get so that the console shows raydiff's own lines: Ray
    Data's per-dataset lines go to its log file (``ray_data_logging.yaml``), Ray's own
    deprecation warnings are not shown, and Ray Train runs no preemption watcher (there are
    no cloud nodes to watch on one machine). Nothing with ``raydiff -v``."""
    if verbose():
        return {}
    return {"RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
            "PYTHONWARNINGS": "ignore::DeprecationWarning",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


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


# --- the run registry ------------------------------------------------------------------------

def run_dir(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def storage_and_name(run: str) -> tuple[str, str]:
    """Ray Train's (storage_path, name) for a run folder (path or URI)."""
    if is_uri(run):
        parent, name = posixpath.split(run.rstrip("/"))
        return parent, name
    path = Path(run).resolve()
    return str(path.parent), path.name


def latest_registered(storage: str, name: str) -> tuple[str, int] | None:
    """(folder name, step) of the newest checkpoint Ray Train registered for a run.

    Ray's own record of a run, not a directory listing, says which checkpoints are complete
    and what Ray resumes from: a folder whose upload was cut short is never registered.
    """
    from ray.train import Result

    location = run_dir(storage, name)
    try:
        result = Result.from_path(location if is_uri(storage) else str(Path(location).resolve()))
    except RuntimeError:  # no run folder, or no checkpoint registered in it yet
        return None
    except ValueError:  # Ray's record read while Ray rewrote it: the run is still going
        return None
    if result.checkpoint is None or "step" not in (result.metrics or {}):
        return None
    return posixpath.basename(result.checkpoint.path.rstrip("/")), int(result.metrics["step"])


def find_latest_checkpoint(storage: str, name: str) -> str | None:
    """Path or URI of the checkpoint a relaunch of this run resumes from, if any."""
    latest = latest_registered(storage, name)
    return f"{run_dir(storage, name)}/{latest[0]}" if latest else None


def latest_step(storage: str, name: str) -> int:
    """The step of a run's newest registered checkpoint; 0 for a run without one."""
    latest = latest_registered(storage, name)
    return latest[1] if latest else 0


def log_dir_for(storage: str, name: str) -> str:
    """Where rank 0's metrics.jsonl and TensorBoard events go: ``<run>/logs`` in the storage
    (a URI: staged on its node and uploaded at every checkpoint, ``raydiff.runlog``)."""
    if is_uri(storage):
        return f"{run_dir(storage, name)}/logs"
    return str(Path(run_dir(storage, name), "logs").resolve())


# --- the trainer and its workers -------------------------------------------------------------

@dataclass(frozen=True)
class Scaling:
    """A Ray Train request: how many workers, what each holds, how many failures to survive."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.cpus_per_worker))

    def check(self) -> None:
        """Fail before scheduling when the cluster can never place the workers; wait while an
        autoscaler adds the nodes for workers it can place."""
        check_placement(f"{self.workers} workers", self.workers,
                        {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker})


class WorkerLoop:
    """A Ray Train worker function named by ``"module:function"``, imported where it runs.

    Ray Train's controller unpickles the worker function too; a function pickled by
    reference makes it import the function's module, and with it torch and the engine, in a
    process that only coordinates (seconds of each run's start on a small machine)."""

    def __init__(self, target: str):
        self.target = target

    def __call__(self, loop_config: dict):
        import importlib

        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)(loop_config)


def torch_trainer(loop: str, loop_config: dict, scaling: Scaling,
                  storage: str, name: str, num_to_keep: int | None,
                  datasets: dict | None = None, callbacks: list | None = None):
    """The ``TorchTrainer`` of a raydiff run, whose workers run ``loop`` (``"module:function"``):
    ``storage/name`` is its run folder."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = storage if is_uri(storage) else str(Path(storage).resolve())
    gpus = scaling.gpus_per_worker
    return TorchTrainer(
        WorkerLoop(loop),
        train_loop_config={**loop_config, "torch_threads": scaling.torch_threads,
                           "log_dir": log_dir_for(storage, name), "verbose": verbose()},
        scaling_config=ScalingConfig(
            num_workers=scaling.workers, use_gpu=gpus > 0,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(
            name=name, storage_path=storage, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            # raydiff's own progress line says what matters; Ray's per-report lines repeat it
            logging_config=LoggingConfig(log_level="WARNING")),
        datasets=datasets,
    )


def verbose() -> bool:
    """``raydiff -v``: Ray's own per-report and per-task lines on the console too."""
    return os.environ.get("RAYDIFF_VERBOSE") == "1"


class _RayInfo(logging.Filter):
    """Ray's own records below WARNING (its per-report lines, from Ray's modules)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}ray{os.sep}" not in record.pathname


def worker_runlog(loop_config: dict, cfg, start_step: int, rank: int):
    """A Ray Train worker's run log: rank 0's ``RunLog`` (None on other ranks), with Ray's
    INFO lines routed off the console (``route_worker_logs``)."""
    from raydiff.runlog import RunLog

    runlog = RunLog(loop_config["log_dir"], cfg, start_step) if rank == 0 else None
    route_worker_logs(loop_config, runlog.dir if runlog is not None else None)
    return runlog


def route_worker_logs(loop_config: dict, log_dir: Path | None) -> None:
    """In a Ray Train worker: Ray's INFO lines (e.g. "Reporting training result ...") leave
    the console unless ``raydiff -v``; rank 0 (``log_dir``: its run's local log folder) keeps
    them in ``ray.log`` there, uploaded with the run's other logs."""
    if loop_config.get("verbose"):
        return
    root = logging.getLogger()
    for source in (root, logging.getLogger("ray.train")):
        for handler in source.handlers:
            if not isinstance(handler, logging.FileHandler) and \
                    type(handler).__name__ != "SessionFileHandler":
                handler.addFilter(_RayInfo())
    if log_dir is not None:
        handler = logging.FileHandler(log_dir / "ray.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(lambda record: not _RayInfo().filter(record))
        root.addHandler(handler)


def all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    """Sum (or max) of a list of numbers over the workers; the list itself on one worker."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def mean_over_workers(sums: dict[str, float], count: int, device) -> dict[str, float]:
    """Each worker's sums over ``count`` steps -> the means over every worker's steps."""
    names = sorted(sums)
    totals = all_reduce([sums[n] for n in names] + [count], device)
    return {n: v / totals[-1] for n, v in zip(names, totals[:-1])}


def report(metrics: dict, step: int, total_steps: int, runlog,
           save: Callable[[str], Any] | None = None) -> None:
    """A worker's report at ``step``. Every rank calls it (it is a barrier); rank 0 (the one
    with a ``runlog``) writes the log line and, with ``save``, the checkpoint folder that
    ``save(directory)`` writes, uploaded by Ray as ``checkpoint_<step>``."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if save is not None and runlog is not None:
            directory = os.path.join(tmp, "ckpt")
            save(directory)
            checkpoint = Checkpoint.from_directory(directory)
        if runlog is not None:
            runlog.write(metrics, total_steps)
            if save is not None:
                runlog.sync()  # object storage: the logs so far, uploaded with the checkpoint
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint_{step:09d}" if save else None)


def stop_on_error(runlog, error: Exception) -> dict[str, str]:
    """A worker's return value when every worker stops at the same step (a non-finite loss:
    the gradients are shared, so all see it), with no report left unmatched, instead of Ray
    retrying a failure that would repeat. Rank 0's return value reaches the driver."""
    if runlog is not None:
        runlog.error(str(error))
        runlog.close()
    return {"error": str(error)}


def tune_can_resume(location: str) -> bool:
    """Whether Tune left an experiment to resume at ``location`` (a folder or a URI).

    Tune writes ``tuner.pkl`` first and its experiment state only once trials exist; a driver
    killed in between leaves a folder ``Tuner.can_restore`` accepts, whose restore runs one
    trial with an empty config. Such a folder starts afresh."""
    from ray import tune

    from raydiff.storage import Folder

    return (tune.Tuner.can_restore(location)
            and bool(Folder(location).names(pattern="experiment_state-*.json")))


def reserved_placement_groups() -> dict[str, str]:
    """Placement groups not yet removed: hex id -> hex id of the job that made it (a group's
    id ends with its job's)."""
    import ray

    return {pg: pg[-8:] for pg, info in ray.util.placement_group_table().items()
            if info["state"] != "REMOVED"}


def remove_placement_group_by_id(pg: str) -> None:
    """Remove a placement group by its hex id, freeing what it reserved."""
    import ray
    from ray.util.placement_group import PlacementGroup

    ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg)))


@contextlib.contextmanager
def releasing_placement_groups(wait_s: float = 10.0):
    """Every placement group this driver's job makes inside the block is gone after it.

    A Tune trial that ends, or that a scheduler stops, takes its Ray Train run's controller
    with it; Ray Train's cleaner actor then removes the run's placement group once the state
    API says the controller is dead. When that does not happen, the group keeps its CPUs
    reserved for as long as the driver lives (seen once in a full test run, at the end of an
    ASHA search run in the test process). Groups made in the block and still reserved
    ``wait_s`` after it are removed here, with a warning that names them."""
    import ray

    job = ray.get_runtime_context().get_job_id()

    def reserved() -> set[str]:
        return {pg for pg, owner in reserved_placement_groups().items() if owner == job}

    before = reserved()
    try:
        yield
    finally:
        start = time.monotonic()
        while (left := reserved() - before) and time.monotonic() < start + wait_s:
            time.sleep(0.5)
        logger.debug("placement groups of the block: %d still reserved after %.1f s",
                     len(left), time.monotonic() - start)
        for pg in sorted(left):
            remove_placement_group_by_id(pg)
        if left:
            logger.warning("removed %d placement group(s) still reserved %.0f s after the "
                           "trials ended: %s", len(left), wait_s, ", ".join(sorted(left)))


def fit(trainer):
    """Run a trainer; a failure or a worker's error stop becomes one RaydiffError line."""
    import ray.train

    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise RaydiffError(f"training failed: {lines[-1]}") from err
    error = (result.return_value or {}).get("error")
    if error:
        kept = result.checkpoint.path if result.checkpoint else "none yet"
        raise RaydiffError(f"{error}; last good checkpoint: {kept}")
    return result


# --- Ray Data ----------------------------------------------------------------------------------

def quiet(ds):
    """No progress bars or execution banners (unless ``raydiff -v``): raydiff's own lines say
    how far it is."""
    if not verbose():
        ds.context.enable_progress_bars = False
        ds.context.print_on_execution_start = False
    return ds
