"""Hyperparameter search on Ray Tune over the CCUA loss weights and the alignment threshold.

Ray Train V2 pattern: each trial is a driver function (no resources of its own) that fits a
``TorchTrainer`` (DDP over ``workers_per_trial``) whose ``TuneReportCallback`` forwards every
report to Tune. The objective is measured during training: at every report, rank 0 samples a
small class-balanced set with the EMA weights and computes the Frechet distance to the
reference statistics, overall and per class group, with the copy rate and diversity of the
samples (``raydiff.quickeval``); any of them can be the objective. ASHA stops weak
trials early. Each trial's Train run is named after its trial id, so a restored search
(``Tuner.restore``) resumes unfinished trials from their checkpoints and reruns nothing
that finished.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydiff import config as config_lib
from raydiff.config import Config
from raydiff.data import parquet
from raydiff.distributed import runtime
from raydiff.distributed.train import TrainJob, build_trainer, prepare_job, shared_split
from raydiff.errors import RaydiffError
from raydiff.metrics import GROUPS
from raydiff.quickeval import COPY_MAX_TRAIN, FEATURES, EvalSpec, ReferenceStats
from raydiff.storage import Folder

logger = logging.getLogger(__name__)

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "loss.ucl_weight": {"loguniform": [1e-3, 2.0]},
    "loss.al_weight": {"loguniform": [1e-3, 2.0]},
    "loss.t_align": {"choice": [0, 250, 500, 750]},
    "loss.temperature": {"choice": [0.05, 0.1, 0.2]},
}
# Under flow matching t_align (a threshold on DDPM's integer timesteps) does not apply; the
# search asks instead which end of the path the UCL/AL weight should favour.
FLOW_SPACE: dict[str, dict[str, Any]] = {
    **{key: dist for key, dist in DEFAULT_SPACE.items() if key != "loss.t_align"},
    "loss.flow_weight_end": {"choice": ["data", "noise"]},
}
KINDS = ("uniform", "loguniform", "choice", "grid")
LOSS_METRICS = ("loss", "ddpm", "flow", "ucl", "al", "cbdm", "dispersive", "diffrop")
SAMPLE_METRICS = ("copy_rate", "diversity")  # with their _head / _body / _tail versions


FEATURE_PREFIX = {EvalSpec(f).prefix: f for f in FEATURES}  # a distance names its space
OBJECTIVE_FILE = "objective.json"
_DRIVER_CPU = 0.01


def metric_mode(metric: str) -> str:
    """Diversity is maximised; distances, losses and the copy rate are minimised."""
    return "max" if metric.startswith("diversity") else "min"


@dataclass(frozen=True)
class Objective:
    """What a search optimises: a metric and the feature space its samples are measured in."""
    feature: str  # inception | pixels
    metric: str  # a name every report carries, e.g. fid_tail

    def __str__(self) -> str:
        return f"{self.feature}:{self.metric}"


def _reported(feature: str) -> list[str]:
    prefix = EvalSpec(feature).prefix
    groups = ("", *(f"_{g}" for g in GROUPS))
    return [*(f"{prefix}{g}" for g in groups), *(f"{m}{g}" for m in SAMPLE_METRICS for g in groups),
            *LOSS_METRICS]


def parse_objective(text: str) -> Objective:
    """``fid_tail`` / ``fd_pixels_tail`` (the space is in the name), ``FEATURES:METRIC`` for
    the sample metrics measured in either space (``pixels:diversity_tail``), or a loss."""
    feature, _, metric = text.rpartition(":")
    known = list(dict.fromkeys(_reported("inception") + _reported("pixels")))
    if metric not in known:
        raise RaydiffError(f"--objective {text!r}: metric {metric!r} is never reported; choose "
                           f"one of {', '.join(known)}")
    if metric in LOSS_METRICS and not feature:
        feature = "pixels"  # a loss needs no features; the reported distances use pixels
    implied = next((space for prefix, space in FEATURE_PREFIX.items()
                    if metric == prefix or metric.startswith(prefix + "_")), None)
    feature = feature or implied or ""
    if feature not in FEATURES:
        raise RaydiffError(f"--objective {text!r}: name the feature space, e.g. "
                           f"inception:{metric} or pixels:{metric}")
    if implied and implied != feature:
        raise RaydiffError(f"--objective {text!r}: {metric} is measured in the {implied} space")
    return Objective(feature, metric)


@dataclass(frozen=True)
class SearchJob:
    data: str
    base: Config
    storage: str
    name: str
    space: dict[str, dict[str, Any]]
    trials: int = 8
    objective: str = "fid_tail"
    scheduler: str = "asha"
    max_steps: int = 2000
    eval_every: int = 500
    workers_per_trial: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    eval_per_class: int = 10
    eval_steps: int = 10
    reference_per_class: int = 100
    inception_weights: str | None = None
    max_concurrent_trials: int | None = None  # None: as many as the cluster can hold

    @property
    def location(self) -> str:
        """The search folder: Tune's state, trials, results, best config, objective."""
        return f"{self.storage.rstrip('/')}/{self.name}"


# --- the search space -----------------------------------------------------------------------

def load_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """A space file: ``{"section.key": {"loguniform": [lo, hi]}, ...}`` in YAML or JSON."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RaydiffError(f"space file {path} does not exist") from None
    try:
        data = yaml.safe_load(text)  # YAML is a superset of JSON: one parser reads both
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RaydiffError(f"space file {path}{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict) or not data:
        raise RaydiffError(f"space file {path} must map config keys to distributions")
    return data


def validate_space(space: dict[str, dict[str, Any]], base: Config, where: str) -> None:
    """Every key must be a config key, every range non-empty, every value of the key's type."""
    for key, dist in space.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in KINDS:
            raise RaydiffError(f"{where}: {key}: expected one of {', '.join(KINDS)} "
                               f"with its values, got {dist!r}")
        kind, values = next(iter(dist.items()))
        if kind in ("uniform", "loguniform"):
            if not (isinstance(values, list) and len(values) == 2
                    and all(isinstance(v, (int, float)) for v in values)):
                raise RaydiffError(f"{where}: {key}: {kind} takes [low, high], got {values!r}")
            low, high = values
            if not low < high:
                raise RaydiffError(f"{where}: {key}: empty range [{low}, {high}]")
            if kind == "loguniform" and low <= 0:
                raise RaydiffError(f"{where}: {key}: loguniform needs low > 0, got {low}")
            samples = [low, high]
        else:
            if not isinstance(values, list) or not values:
                raise RaydiffError(f"{where}: {key}: {kind} needs a non-empty list of values")
            samples = values
        for value in samples:  # unknown keys, wrong types and invalid values fail here
            try:
                config_lib.apply_overrides(base, {key: value})
            except RaydiffError as err:
                raise RaydiffError(f"{where}: {err}") from None


def to_tune_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ray import tune

    make = {"uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[kind](values) for key, dist in space.items()
            for kind, values in dist.items()}


# --- the objective --------------------------------------------------------------------------

def resolve_objective(job: SearchJob) -> tuple[EvalSpec, str]:
    """The feature space and the metric to optimise, as ``--objective`` names them, checked
    against the objective the search folder records (a resumed search keeps its objective)."""
    from raydiff.features import WeightsUnavailable, check_weights_file, resolve_weights

    objective = parse_objective(job.objective)
    folder = Folder(job.location)
    if folder.is_file(OBJECTIVE_FILE):
        recorded = folder.read_json(OBJECTIVE_FILE).get("objective")
        if recorded != str(objective):
            raise RaydiffError(f"search {folder} optimises --objective {recorded}, not "
                               f"{objective}: resume it with that objective or choose another "
                               f"--name")
    weights = sha256 = None
    if objective.feature == "inception":
        try:
            weights = str(resolve_weights(job.inception_weights))
            sha256 = check_weights_file(weights)  # before any worker loads it, with this hash
        except WeightsUnavailable as err:
            raise RaydiffError(f"--objective {objective} needs the Inception weights ({err}): "
                               f"pass --inception-weights FILE, or optimise a pixel statistic "
                               f"that needs none, e.g. --objective fd_pixels_tail") from None
    spec = EvalSpec(feature=objective.feature, per_class=job.eval_per_class,
                    steps=job.eval_steps, guidance=job.base.sample.guidance, weights=weights,
                    weights_sha256=sha256)
    return spec, objective.metric


def record_objective(job: SearchJob, spec: EvalSpec, metric: str) -> None:
    Folder(job.location).write_json(
        OBJECTIVE_FILE, {"objective": str(Objective(spec.feature, metric))})


# --- the trial driver -----------------------------------------------------------------------

EVAL_PREFIX = "eval/"  # how rank 0 reports its evaluation of an earlier step (SideWork)


def evaluation_reports():
    """A Ray Train callback that hands Tune one report per evaluation, at the step evaluated.

    Rank 0 evaluates the weights of step s off the report barrier and reports the result with
    a later Train report, as ``eval_step`` = s and ``eval/<metric>`` keys
    (``raydiff.distributed.train.SideWork``). This callback keeps the training metrics of each
    report by step and, when the evaluation of s arrives, gives Tune the training metrics of
    step s together with its evaluation, under ``step`` = s: each Tune report is about one
    step, carries the objective, and ASHA's milestones count evaluations, as they did when
    each report evaluated its own step inside the barrier."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvaluationReports(TuneReportCallback):
        def __init__(self):
            super().__init__()
            self.by_step: dict[int, dict] = {}

        def after_report(self, run_context, metrics, checkpoint):
            report = metrics[0]
            trained = {k: v for k, v in report.items()
                       if not k.startswith(EVAL_PREFIX) and k != "eval_step"}
            if len(trained) > 1:  # not the extra report after the loop: only a step
                self.by_step[trained["step"]] = trained
            if "eval_step" not in report:
                return
            step = report["eval_step"]
            merged = {**self.by_step.get(step, {}), "step": step,
                      **{k[len(EVAL_PREFIX):]: v for k, v in report.items()
                         if k.startswith(EVAL_PREFIX)}}
            self.by_step = {s: m for s, m in self.by_step.items() if s > step}
            # the checkpoint of this report holds later weights than the ones evaluated
            super().after_report(run_context, [merged], None)

    return EvaluationReports()


def trial_driver(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: a TorchTrainer over the trial's config, named after the trial."""
    from ray import tune

    job: TrainJob = setup["job"]
    cfg = config_lib.apply_overrides(job.cfg, params)
    trial = dataclasses.replace(job, cfg=cfg, name=tune.get_context().get_trial_id())
    runtime.fit(build_trainer(trial, setup["info"], callbacks=[evaluation_reports()]))


def _trial_job(job: SearchJob) -> TrainJob:
    cfg = config_lib.apply_overrides(job.base, {
        "optim.total_steps": job.max_steps, "train.log_every": job.eval_every,
        "train.ckpt_every": job.eval_every, "train.preview_per_class": 0})
    return TrainJob(data=job.data, cfg=cfg, storage=f"{job.storage}/{job.name}/trials",
                    name="trial", workers=job.workers_per_trial,
                    gpus_per_worker=job.gpus_per_worker, cpus_per_worker=job.cpus_per_worker,
                    max_failures=1)


def max_concurrent(workers_per_trial: int, cpus_per_worker: float, gpus_per_worker: float,
                   limit: int | None = None) -> int:
    """Trials the cluster can run at once, at its largest when it autoscales
    (``raydiff.distributed.runtime``); one CPU a trial is left over for its Ray Data tasks. At most
    ``limit`` (``--max-concurrent-trials``)."""

    bundle = {"CPU": cpus_per_worker + 1 / workers_per_trial, "GPU": gpus_per_worker}
    fit = max(1, runtime.potential_capacity(bundle) // workers_per_trial)
    return min(fit, limit) if limit else fit


def reference_stats(job: SearchJob, info: parquet.DatasetInfo, spec: EvalSpec) -> ReferenceStats:
    """What every trial's evaluation compares with: the features of the reference split (and
    of the training split, for the copy rate) from ``raydiff evaluate``'s cached pipeline."""
    from raydiff.distributed.evaluate import EvalJob, reference_features

    extractor = spec.extractor()
    request = EvalJob(samples="", reference=job.data, reference_per_class=job.reference_per_class)
    with_train = info.num_images("train") <= COPY_MAX_TRAIN
    found, _ = reference_features(request, extractor,
                                  ("reference", "train") if with_train else ("reference",))
    # every trial's objective compares with these in memory (the training split's rows only
    # up to COPY_MAX_TRAIN images)
    ref_rows, ref_labels = found["reference"].rows.load()
    train = found["train"].rows.load() if with_train else None
    return ReferenceStats.of(spec.feature, info.counts("train"), ref_rows, ref_labels, train)


def build_tuner(job: SearchJob, restore: bool, checked: tuple):
    """The Tuner of a search whose trial job and objective were checked before Ray started:
    ``checked`` is ``(train_job, info, spec, metric)`` (``run_search``)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    train_job, info, spec, metric = checked
    reference = reference_stats(job, info, spec)
    train_job = shared_split(dataclasses.replace(train_job, eval=spec,
                                                 eval_reference=ray.put(reference)), info)
    # The driver only waits on its TorchTrainer; Tune refuses an empty request, so it asks
    # for a token share of a CPU and the workers hold the real resources.
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, setup={"job": train_job, "info": info}),
        {"CPU": _DRIVER_CPU})
    path = job.location
    if restore and runtime.tune_can_resume(path):
        logger.info("resuming the search at %s", path)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    reports = max(1, job.max_steps // job.eval_every)
    scheduler = (ASHAScheduler(max_t=reports, grace_period=1, reduction_factor=2)
                 if job.scheduler == "asha" else FIFOScheduler())
    tuner = tune.Tuner(
        trainable, param_space=to_tune_space(job.space),
        tune_config=tune.TuneConfig(metric=metric, mode=metric_mode(metric),
                                    scheduler=scheduler,
                                    num_samples=job.trials,
                                    max_concurrent_trials=max_concurrent(
                                        job.workers_per_trial, job.cpus_per_worker,
                                        job.gpus_per_worker, job.max_concurrent_trials)),
        run_config=tune.RunConfig(name=job.name, storage_path=job.storage,
                                  failure_config=tune.FailureConfig(max_failures=1)))
    return tuner


def check_search(job: SearchJob) -> None:
    validate_space(job.space, job.base, "search space")
    if job.scheduler not in ("asha", "fifo"):
        raise RaydiffError(f"--scheduler must be asha or fifo, got {job.scheduler!r}")
    if job.eval_per_class < 2:
        raise RaydiffError(f"--eval-per-class must be at least 2 (a class's diversity and a "
                           f"group's covariance need two images), got {job.eval_per_class}")
    if job.max_concurrent_trials is not None and job.max_concurrent_trials < 1:
        raise RaydiffError(f"--max-concurrent-trials must be at least 1, got "
                           f"{job.max_concurrent_trials}")
    parse_objective(job.objective)
    if job.trials < 1 or job.max_steps < 1 or not 1 <= job.eval_every <= job.max_steps:
        raise RaydiffError(f"need trials >= 1 and 1 <= eval_every ({job.eval_every}) <= "
                           f"max_steps ({job.max_steps})")
    parquet.check_split(job.data, "reference")  # the trial job checks the training split


def run_search(job: SearchJob) -> dict[str, Any]:
    """Run (or resume) the search; write results.csv and best_config.json; return a summary."""
    check_search(job)
    # data, batch, config, the metric and the Inception weights, all before Ray starts
    train_job, info, _ = prepare_job(_trial_job(job), cluster=False)
    spec, metric = resolve_objective(job)
    runtime.init_ray(job.workers_per_trial * job.cpus_per_worker + 1)
    train_job.scaling.check()
    tuner = build_tuner(job, restore=True, checked=(train_job, info, spec, metric))
    record_objective(job, spec, metric)
    with runtime.releasing_placement_groups():
        grid = tuner.fit()
    return write_results(grid, job, metric)


# --- results --------------------------------------------------------------------------------

def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def write_results(grid, job: SearchJob, metric: str) -> dict[str, Any]:
    """results.csv (every trial, best first) and best_config.json (for ``--config``)."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        params = {k: v for k, v in (result.config or {}).items() if k in job.space}
        rows.append({"trial": metrics.get("trial_id", Path(result.path).name),
                     "status": "error" if result.error else "done",
                     **params, metric: _number(metrics.get(metric)),
                     "step": metrics.get("step"), "reports": metrics.get("training_iteration"),
                     **{k: _number(metrics.get(k)) for k in sorted(metrics)
                        if k not in (metric,) and (k.startswith(("fid", "fd_", *SAMPLE_METRICS))
                                                   or k in LOSS_METRICS)}})
    sign = -1 if metric_mode(metric) == "max" else 1
    rows.sort(key=lambda r: (math.isnan(r[metric]), sign * r[metric]))
    out = Folder(job.location)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    out.write_bytes("results.csv", table.getvalue().encode("utf-8"))
    best = next((r for r in rows if not math.isnan(r[metric])), None)
    if best is None:
        raise RaydiffError(f"no trial reported {metric}; see {out}")
    best_cfg = config_lib.apply_overrides(job.base, {k: best[k] for k in job.space})
    out.write_bytes("best_config.json", best_cfg.to_json().encode("utf-8"))
    return {"metric": metric, "rows": rows, "best": best, "dir": str(out)}


def format_table(summary: dict[str, Any], limit: int = 20) -> str:
    rows = summary["rows"][:limit]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)




# --- command line ---------------------------------------------------------------------------

def job_from_args(args, base: Config) -> SearchJob:
    default = FLOW_SPACE if base.diffusion.process == "flow" else DEFAULT_SPACE
    space = load_space(args.space) if args.space else default
    if args.space:
        validate_space(space, base, f"space file {args.space}")
    return SearchJob(
        data=args.data, base=base, storage=args.storage, name=args.name or f"{base.preset}-search",
        space=space, trials=args.trials, objective=args.objective, scheduler=args.scheduler,
        max_steps=args.steps, eval_every=args.eval_every or max(1, args.steps // 4),
        workers_per_trial=args.workers, gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker, eval_per_class=args.eval_per_class,
        eval_steps=args.eval_steps, reference_per_class=args.reference_per_class,
        inception_weights=args.inception_weights,
        max_concurrent_trials=args.max_concurrent_trials)


def run(args, base: Config) -> int:
    """``raydiff tune``: search, then print the table and where the best config is."""
    job = job_from_args(args, base)
    if args.dry_run:
        print(json.dumps({"base": base.to_dict(), "space": job.space}, indent=2))
        return 0
    summary = run_search(job)
    better = "higher" if metric_mode(summary["metric"]) == "max" else "lower"
    print(f"objective: {summary['metric']} ({better} is better); trials best first:")
    print(format_table(summary))
    print(f"results: {summary['dir']}/results.csv")
    print(f"best config: {summary['dir']}/best_config.json "
          f"(raydiff train --config {summary['dir']}/best_config.json)")
    return 0
