"""``raydiff study``: methods x seeds at an equal budget, sampled and evaluated alike.

One command for the comparison a paper reports: every variant (``ddpm``, ``cbdm``, ``ccua`` or a
named variant with its own config overrides) is trained once per seed with the same preset,
steps and batch, on one dataset. Training is a Ray Tune grid over (variant, seed); each trial
is a ``TorchTrainer`` (DDP over ``--workers-per-trial``) whose Train run is named
``<variant>-seed<k>``, so an interrupted study resumes: Tune restores its grid, an unfinished
run continues from its latest checkpoint and a finished one is not trained again. Then every
run samples the same class-balanced set (same count per class, same sampler, same seeds) on
Ray Data and is evaluated on Ray Data in one feature space (Inception when its weights can be
had, otherwise a classifier of the reference split trained here, as the demo does), and the
study writes:

- ``study.json``: every run's metrics and, per variant, set and metric, the mean over seeds,
  its 95% t-interval and the difference to the first variant with its 95% Welch interval;
- ``study.md``: those numbers as tables, one per metric;
- ``study.png``: one panel per metric, one bar per variant and set, with the intervals.

The sets are the overall set, the head / body / tail thirds and the many / medium / few-shot
groups (docs/METHOD.md, "Evaluation").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raydiff import config as config_lib
from raydiff.config import Config
from raydiff.data import parquet
from raydiff.data.prepare import builtin_dataset
from raydiff.distributed import runtime
from raydiff.distributed.demo import feature_classifier
from raydiff.distributed.evaluate import METRICS_FILE, EvalJob, run_evaluations
from raydiff.distributed.runtime import find_latest_checkpoint, latest_step, tune_can_resume
from raydiff.distributed.sample import SampleJob, run_samplings
from raydiff.distributed.train import (
    TrainJob,
    build_trainer,
    check_resume,
    fit_config_to_data,
    prepare_job,
    shared_split,
)
from raydiff.distributed.tune import max_concurrent
from raydiff.errors import RaydiffError
from raydiff.features import CLASSIFIER_PREFIX, WeightsUnavailable, resolve_extractor, resolve_weights
from raydiff.metrics import GROUPS, SHOT_GROUPS
from raydiff.storage import Folder, json_safe, to_buffer

logger = logging.getLogger(__name__)

SPEC_FILE = "study_spec.json"
JSON_FILE, MARKDOWN_FILE, CHART_FILE = "study.json", "study.md", "study.png"
SETS = ("overall", *GROUPS, *SHOT_GROUPS)
# (metrics.json key, label, better, format): the study's tables and chart, in this order
METRICS = (
    ("fid", "FID", "lower", "{:.2f}"),
    ("classifier_top1", "Classifier top-1", "higher", "{:.3f}"),
    ("recall", "Recall", "higher", "{:.3f}"),
    ("precision", "Precision", "higher", "{:.3f}"),
    ("copy_rate", "Copy rate", "lower", "{:.3f}"),
    ("diversity", "Diversity", "higher", "{:.3f}"),
)
_DRIVER_CPU = 0.01


@dataclass(frozen=True)
class Variant:
    """A named training recipe: a method and any config overrides on top of the study's base."""

    label: str
    overrides: dict[str, Any]


def parse_variant(text: str, base: Config) -> Variant:
    """``ddpm``, ``cbdm``, ``ccua``, or ``LABEL:section.key=value,section.key=value``; a label
    that is not a method must set ``loss.method``."""
    label, sep, rest = text.partition(":")
    label = label.strip()
    if not label or not all(ch.isalnum() or ch in "-_." for ch in label):
        raise RaydiffError(f"variant {text!r}: the label must be letters, digits, '-', '_' or "
                           f"'.' (it names the run folders)")
    overrides: dict[str, Any] = dict(config_lib.parse_overrides(
        [part for part in rest.split(",") if part.strip()])) if sep else {}
    if label in config_lib.METHODS:
        overrides.setdefault("loss.method", label)
    elif "loss.method" not in overrides:
        raise RaydiffError(f"variant {text!r}: {label!r} is not one of "
                           f"{', '.join(config_lib.METHODS)}, so it must set loss.method "
                           f"(e.g. {label}:loss.method=ccua,loss.t_align=500)")
    if "train.seed" in overrides:
        raise RaydiffError(f"variant {text!r}: the seeds come from --seeds, not train.seed")
    try:
        config_lib.apply_overrides(base, overrides)
    except RaydiffError as err:
        raise RaydiffError(f"variant {text!r}: {err}") from None
    return Variant(label, overrides)


@dataclass(frozen=True)
class StudyJob:
    data: str
    base: Config  # every variant's starting point: preset, steps, batch, sampler
    storage: str
    name: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    per_class: int = 50  # generated images per class and run
    features: str = "auto"  # auto | inception | classifier:CKPT
    inception_weights: str | None = None
    download: bool = True
    reference_per_class: int | None = None
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0

    @property
    def dir(self) -> Path:
        return Path(self.storage) / self.name

    @property
    def runs_storage(self) -> str:
        return str(self.dir / "runs")

    def run_name(self, label: str, seed: int) -> str:
        return f"{label}-seed{seed}"

    def config(self, variant: Variant, seed: int) -> Config:
        return config_lib.apply_overrides(self.base, {**variant.overrides, "train.seed": seed})

    def spec(self) -> dict[str, Any]:
        """What the study measures; a rerun under the same name must ask for the same."""
        data = self.data if "://" in self.data else str(Path(self.data).resolve())
        return {"data": data, "base": self.base.to_dict(),
                "variants": {v.label: v.overrides for v in self.variants},
                "seeds": list(self.seeds), "per_class": self.per_class}


# --- checks ---------------------------------------------------------------------------------

def check_study(job: StudyJob) -> None:
    if "://" in job.storage:
        raise RaydiffError("--storage must be a path (on a cluster, one every node mounts, "
                           "e.g. NFS or EFS): raydiff study keeps its runs and tables there")
    if not job.variants:
        raise RaydiffError("--methods needs at least one variant")
    labels = [v.label for v in job.variants]
    if len(set(labels)) != len(labels):
        raise RaydiffError(f"--methods repeats a label: {', '.join(labels)}")
    if not job.seeds or len(set(job.seeds)) != len(job.seeds) or min(job.seeds) < 0:
        raise RaydiffError(f"--seeds must be distinct integers >= 0, got {list(job.seeds)}")
    if job.per_class < 2:
        raise RaydiffError(f"--per-class must be at least 2, got {job.per_class}")
    parquet.check_split(job.data, "reference")
    prepare_job(_train_job(job), cluster=False)  # the training split and the batch
    if job.features == "inception" or job.features.startswith(CLASSIFIER_PREFIX):
        resolve_extractor(job.features, job.inception_weights, job.download)  # weights checked
    spec_path = job.dir / SPEC_FILE
    if spec_path.is_file():
        found, wanted = json.loads(spec_path.read_text()), json.loads(json.dumps(job.spec()))
        if found != wanted:
            changed = sorted(k for k in wanted if found.get(k) != wanted[k])
            raise RaydiffError(f"study {job.dir} was started with other settings "
                               f"({', '.join(changed)} differ); rerun it unchanged to resume, "
                               f"or choose another --name")


def _write_spec(job: StudyJob) -> None:
    folder = Folder(job.dir)
    if not folder.is_file(SPEC_FILE):
        folder.write_json(SPEC_FILE, job.spec())


# --- training: a Tune grid over (variant, seed) -----------------------------------------------

def trial_driver(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """One (variant, seed): a TorchTrainer over its config, its Train run named after both."""
    from ray.tune.integration.ray_train import TuneReportCallback

    study: StudyJob = setup["study"]
    variant = next(v for v in study.variants if v.label == params["variant"])
    seed = int(params["seed"])
    if _run_done(study, variant.label, seed):
        # finished before the study's driver died, but not yet recorded as finished by Tune:
        # its Train run holds the last checkpoint, so starting its workers again is waste
        logger.info("run %s is trained", study.run_name(variant.label, seed))
        return
    cfg = fit_config_to_data(study.config(variant, seed), setup["info"])
    job = dataclasses.replace(setup["job"], cfg=cfg, name=study.run_name(variant.label, seed))
    runtime.fit(build_trainer(job, setup["info"], callbacks=[TuneReportCallback()]))


def _train_job(job: StudyJob):
    return TrainJob(data=job.data, cfg=job.base, storage=job.runs_storage, name="study",
                    workers=job.workers_per_trial, gpus_per_worker=job.gpus_per_worker,
                    cpus_per_worker=job.cpus_per_worker, max_failures=1)


def _run_done(job: StudyJob, label: str, seed: int) -> bool:
    return latest_step(job.runs_storage, job.run_name(label, seed)) >= job.base.optim.total_steps


def train_all(job: StudyJob) -> None:
    """Fit (or resume) the Tune grid; every run ends with a checkpoint at the last step."""
    from ray import tune

    train_job = _train_job(job)
    _, info, _ = prepare_job(train_job)  # batch, data and cluster resources
    for variant in job.variants:  # a run of another network under this name fails here
        for seed in job.seeds:
            check_resume(dataclasses.replace(
                train_job, cfg=fit_config_to_data(job.config(variant, seed), info),
                name=job.run_name(variant.label, seed)))
    if all(_run_done(job, v.label, s) for v in job.variants for s in job.seeds):
        logger.info("every run of study %s is trained", job.name)
        return
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, setup={
            "study": job, "job": shared_split(train_job, info), "info": info}),
        {"CPU": _DRIVER_CPU})
    path = str(job.dir.resolve())
    if tune_can_resume(path):
        logger.info("resuming the training grid of study %s", job.name)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        concurrent = max_concurrent(job.workers_per_trial, job.cpus_per_worker,
                                    job.gpus_per_worker)
        tuner = tune.Tuner(
            trainable,
            param_space={"variant": tune.grid_search([v.label for v in job.variants]),
                         "seed": tune.grid_search(list(job.seeds))},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=job.name, storage_path=str(job.dir.parent.resolve()),
                                      failure_config=tune.FailureConfig(max_failures=1)))
    with runtime.releasing_placement_groups():
        grid = tuner.fit()
    failed = [f"{r.config.get('variant')}-seed{r.config.get('seed')}: {r.error}"
              for r in grid if r.error]
    if failed:
        raise RaydiffError("training failed: " + "; ".join(failed))
    missing = [job.run_name(v.label, s) for v in job.variants for s in job.seeds
               if not _run_done(job, v.label, s)]
    if missing:
        raise RaydiffError(f"runs without a final checkpoint: {', '.join(missing)}")


# --- sampling and evaluation: every run the same way ----------------------------------------

def resolve_features(job: StudyJob) -> tuple[str, str | None]:
    """The feature space every run is measured in, and the Inception weights if used.

    ``auto``: Inception when its weights can be had, otherwise a classifier of the reference
    split, trained once per study (``raydiff.distributed.demo.feature_classifier``)."""
    if job.features not in ("auto", "inception"):
        return job.features, None
    try:
        return "inception", str(resolve_weights(job.inception_weights, download=job.download))
    except WeightsUnavailable as err:
        if job.features == "inception":
            raise RaydiffError(f"Inception weights unavailable: {err}") from None
        checkpoint, top1 = feature_classifier(job.data, job.dir / "feature-classifier")
        logger.warning("Inception weights unavailable (%s): every run is measured in the "
                       "feature space of a classifier of the reference split (top-1 %.3f on "
                       "held-out reference images)", err, top1)
        return CLASSIFIER_PREFIX + checkpoint, None


def sample_and_evaluate(job: StudyJob, features: str, weights: str | None) -> list[dict]:
    """Sample and evaluate every run (a run whose metrics.json exists is read back): all runs'
    sampling in one pass of one actor pool, then all their evaluations in another, so each
    pool starts once and the feature extractor loads once per actor for the whole study."""
    cells = [(variant, seed, job.run_name(variant.label, seed))
             for variant in job.variants for seed in job.seeds]
    todo = [name for _, _, name in cells
            if not (job.dir / "eval" / name / METRICS_FILE).is_file()]
    checkpoints = {name: find_latest_checkpoint(job.runs_storage, name) for _, _, name in cells}
    pool = {"actors": job.actors, "cpus_per_actor": job.cpus_per_actor,
            "gpus_per_actor": job.gpus_per_actor}
    # the same per-class count, sampler and seeds for every run: the noise that starts
    # image i is the same whichever method drew it
    run_samplings([SampleJob(checkpoint=checkpoints[name], out=str(job.dir / "samples" / name),
                             per_class=job.per_class, seed=0, **pool) for name in todo])
    results = dict(zip(todo, run_evaluations([EvalJob(
        samples=str(job.dir / "samples" / name), reference=job.data, groups=True,
        features=features, inception_weights=weights, download=job.download,
        reference_per_class=job.reference_per_class, out=str(job.dir / "eval" / name), **pool)
        for name in todo])))
    runs = []
    for variant, seed, name in cells:
        result = results.get(name) or json.loads(
            (job.dir / "eval" / name / METRICS_FILE).read_text())
        runs.append({"variant": variant.label, "seed": seed, "run": name,
                     "checkpoint": checkpoints[name], "samples": str(job.dir / "samples" / name),
                     "metrics": {s: {k: v.get(k) for k, *_ in METRICS}
                                 for s, v in result["sets"].items()},
                     "feature_extractor": result["feature_extractor"]["name"]})
    return runs


# --- statistics -----------------------------------------------------------------------------

def t_quantile(df: float) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def mean_interval(values: list[float]) -> dict[str, Any]:
    """Mean and the half-width of its 95% t-interval (None with fewer than 2 values)."""
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return {"mean": None, "ci95": None, "n": 0}
    half = (t_quantile(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    return {"mean": float(x.mean()), "ci95": half, "n": len(x)}


def difference_interval(values: list[float], baseline: list[float]) -> dict[str, Any]:
    """mean(values) - mean(baseline) and the half-width of its 95% Welch interval."""
    a, b = np.asarray(values, np.float64), np.asarray(baseline, np.float64)
    if len(a) == 0 or len(b) == 0:
        return {"mean": None, "ci95": None}
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return {"mean": diff, "ci95": None}
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"mean": diff, "ci95": 0.0}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return {"mean": diff, "ci95": t_quantile(df) * se}


def summarise(runs: list[dict], labels: list[str]) -> dict[str, Any]:
    """{variant: {set: {metric: mean, ci95, n, values, diff}}}; diff is to labels[0]."""
    def values(label: str, set_name: str, metric: str) -> list[float]:
        found = [r["metrics"].get(set_name, {}).get(metric) for r in runs if r["variant"] == label]
        return [v for v in found if v is not None and math.isfinite(v)]

    summary: dict[str, Any] = {}
    for label in labels:
        summary[label] = {}
        for set_name in SETS:
            cells = {}
            for metric, *_ in METRICS:
                vals = values(label, set_name, metric)
                if not vals:
                    continue
                cells[metric] = {**mean_interval(vals), "values": vals}
                if label != labels[0]:
                    cells[metric]["diff"] = difference_interval(
                        vals, values(labels[0], set_name, metric))
            if cells:
                summary[label][set_name] = cells
    return summary


# --- outputs --------------------------------------------------------------------------------

def _cell(stat: dict | None, fmt: str, with_diff: bool) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    text = fmt.format(stat["mean"])
    if stat.get("ci95") is not None:
        text += " ± " + fmt.format(stat["ci95"])
    diff = stat.get("diff")
    if with_diff and diff and diff.get("mean") is not None:
        sign = "+" if diff["mean"] >= 0 else "−"
        text += f" ({sign}{fmt.format(abs(diff['mean']))}"
        text += f" ± {fmt.format(diff['ci95'])})" if diff.get("ci95") is not None else ")"
    return text


def markdown(study: dict) -> str:
    """One table per metric: a row per variant, a column per set that has values."""
    labels, summary, spec = study["variants"], study["summary"], study["spec"]
    base = spec["base"]
    flow = base["diffusion"].get("process") == "flow"  # studies written before flow: DDPM
    prediction = "velocity" if flow else base["diffusion"]["prediction"]
    lines = [
        f"# Study {study['name']}", "",
        f"- data: `{spec['data']}`",
        f"- budget, every run: preset `{base['preset']}`, {base['optim']['total_steps']} steps "
        f"of batch {base['optim']['batch_size']}, {prediction}-prediction",
        "- variants: " + "; ".join(
            f"`{label}` ({', '.join(f'{k}={v}' for k, v in spec['variants'][label].items())})"
            for label in labels),
        f"- seeds: {', '.join(map(str, spec['seeds']))}; sampling: {spec['per_class']} images "
        f"per class, {base['sample']['sampler'].upper()}-{base['sample']['steps']}, guidance "
        f"{base['sample']['guidance']}, the same noise for every run",
        f"- features: {study['feature_extractor']}",
        "",
        f"Cells: mean ± half-width of the 95% t-interval over seeds; in brackets, the "
        f"difference to `{labels[0]}` ± its 95% Welch interval. Sets: the head / body / tail "
        f"thirds of the classes by training count, and many (> 100) / medium / few (< 20) "
        f"shot groups where non-empty.",
    ]
    for metric, label, better, fmt in METRICS:
        sets = [s for s in SETS if any(summary[v].get(s, {}).get(metric) for v in labels)]
        if not sets:
            continue
        lines += ["", f"## {label} ({better} is better)", "",
                  "| variant | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
        for i, variant in enumerate(labels):
            cells = [_cell(summary[variant].get(s, {}).get(metric), fmt, i > 0) for s in sets]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", f"![study]({CHART_FILE})", ""]
    return "\n".join(lines)


_VARIANT_COLOURS = [(70, 70, 70), (31, 119, 180), (214, 39, 40), (44, 160, 44),
                    (148, 103, 189), (255, 127, 14), (140, 86, 75), (227, 119, 194)]


def chart(study: dict):
    """One panel per metric; in each, the overall and head / body / tail sets side by side,
    one bar per variant (its colour in the legend), a line over each bar for its interval."""
    from PIL import Image, ImageDraw, ImageFont

    labels, summary = study["variants"], study["summary"]
    sets = ("overall", *GROUPS)
    panels = [(m, label) for m, label, *_ in METRICS
              if any(summary[v].get(s, {}).get(m) for v in labels for s in sets)]
    width, height, pad = 60 + 30 * len(labels) * len(sets), 230, 30
    image = Image.new("RGB", (width * max(len(panels), 1), height + 16 * len(labels)), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for p, (metric, title) in enumerate(panels):
        x0 = p * width
        draw.text((x0 + 8, 6), title, fill=(0, 0, 0), font=font)
        stats = [[summary[v].get(s, {}).get(metric) for v in labels] for s in sets]
        tops = [st["mean"] + (st["ci95"] or 0) for row in stats for st in row if st]
        top = max([abs(t) for t in tops] + [1e-12])
        base_y, span = height - pad, height - 2 * pad - 10
        draw.line([(x0 + 8, base_y), (x0 + width - 8, base_y)], fill=(0, 0, 0))
        bar = 22
        for g, (set_name, row) in enumerate(zip(sets, stats)):
            left0 = x0 + 20 + g * (bar + 6) * len(labels) + g * 10
            draw.text((left0, base_y + 4), set_name, fill=(0, 0, 0), font=font)
            for i, st in enumerate(row):
                if not st:
                    continue
                left = left0 + i * (bar + 6)
                h = int(span * abs(st["mean"]) / top)
                draw.rectangle([left, base_y - h, left + bar, base_y],
                               fill=_VARIANT_COLOURS[i % len(_VARIANT_COLOURS)])
                if st.get("ci95"):
                    mid, d = left + bar // 2, int(span * st["ci95"] / top)
                    draw.line([(mid, base_y - h - d), (mid, base_y - h + d)], fill=(0, 0, 0),
                              width=2)
    for i, label in enumerate(labels):  # the legend
        y = height + 16 * i
        draw.rectangle([8, y + 2, 20, y + 12], fill=_VARIANT_COLOURS[i % len(_VARIANT_COLOURS)])
        draw.text((26, y), label, fill=(0, 0, 0), font=font)
    return image


def write_outputs(job: StudyJob, study: dict) -> None:
    """study.json, study.md and study.png, each written whole."""
    folder = Folder(job.dir)
    folder.write_json(JSON_FILE, json_safe(study))
    folder.write_bytes(MARKDOWN_FILE, markdown(study).encode("utf-8"))
    folder.write_bytes(CHART_FILE, to_buffer(lambda f: chart(study).save(f, format="PNG")))


# --- the command ----------------------------------------------------------------------------

def run_study(job: StudyJob) -> dict:
    """Train (or resume) every run, sample and evaluate each, write the study's files."""
    check_study(job)
    runtime.init_ray(max(job.workers_per_trial * job.cpus_per_worker, job.actors * job.cpus_per_actor))
    _write_spec(job)
    start = time.monotonic()
    train_all(job)
    trained = time.monotonic()
    features, weights = resolve_features(job)
    runs = sample_and_evaluate(job, features, weights)
    labels = [v.label for v in job.variants]
    study = {"name": job.name, "spec": job.spec(), "variants": labels,
             "feature_extractor": runs[0]["feature_extractor"], "runs": runs,
             "summary": summarise(runs, labels),
             "seconds": {"train": round(trained - start, 1),
                         "sample_and_evaluate": round(time.monotonic() - trained, 1)}}
    write_outputs(job, study)
    return study


def job_from_args(args, base: Config) -> StudyJob:
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise RaydiffError(f"--seeds must be comma-separated integers, got {args.seeds!r}") \
            from None
    if args.steps is not None:
        base = config_lib.apply_overrides(base, {"optim.total_steps": args.steps})
    data = args.data or builtin_dataset(args.storage, base.model.resolution)
    return StudyJob(
        data=data, base=base, storage=args.storage, name=args.name or f"{base.preset}-study",
        variants=tuple(parse_variant(text, base) for text in args.methods), seeds=seeds,
        per_class=args.per_class, features=args.features,
        inception_weights=args.inception_weights, download=not args.no_download,
        reference_per_class=args.reference_per_class, workers_per_trial=args.workers,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
        actors=args.actors, cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor)


def run(args, base: Config) -> int:
    job = job_from_args(args, base)
    if args.dry_run:
        print(json.dumps(job.spec(), indent=2))
        return 0
    study = run_study(job)
    print(markdown(study))
    print(f"wrote {job.dir / JSON_FILE}, {job.dir / MARKDOWN_FILE} and {job.dir / CHART_FILE}")
    return 0
