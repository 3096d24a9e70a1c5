"""``raydiff evaluate``: FID/KID/IS/PR of a sample folder against a prepared reference split.

Pipeline (``run_evaluation``), one Ray Data execution::

    generated images (keyed by index)                 \
    reference images (keyed by position), if not cached  > union --map_batches(FeatureActor,
    training images (copy rate), if not cached        /          ActorPoolStrategy)-->
    driver: feature rows placed by set and key; the generated set's sufficient statistics per
    class group (float64) as batches arrive

Small image sets are read by the driver and handed to Ray Data as blocks, large ones stream
through Ray Data's Parquet readers (``image_rows``).

Features are torch-fidelity's ``inception-v3-compat``, or with ``--features classifier:CKPT``
the penultimate layer of a ``raydiff classify`` checkpoint (``raydiff.features``); the metrics
are finished by ``raydiff.metrics`` with torch-fidelity's own functions. With a classifier, its
top-1 on the generated images (does a tail sample look like its class?) is reported per set and
per class, and IS is computed from its logits (in [1, num_classes]). The generated set is
compared with the reference images of the same classes: overall, and with ``--groups`` for the
head / body / tail thirds of the classes ranked by training count (taken from the reference
dataset's ``dataset.json``), optionally per class (``--per-class``).

Reference features are cached on disk under a key made of the reference's identity (a hash of
its dataset.json and reference shards), the per-class cap, the feature extractor's name and the
hash of its weights (a classifier's: of its weights and config), so a second evaluation against
the same reference skips its feature pass.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydiff import metrics as metrics_lib
from raydiff.data import parquet
from raydiff.data.images import decode_images
from raydiff.data.samples import load_manifest, shard_name, shard_paths
from raydiff.distributed import runtime
from raydiff.errors import RaydiffError
from raydiff.features import Extractor, resolve_extractor
from raydiff.metrics import GROUPS, METRICS, SHOT_GROUPS, FeatureStats
from raydiff.storage import Folder, atomic_path, json_safe, to_buffer

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CHART_FILE = "metrics.png"
CACHE_VERSION = 1


@dataclass(frozen=True)
class EvalJob:
    """A ``raydiff evaluate`` request; the CLI and ``jobs/evaluate.py`` build one."""

    samples: str
    reference: str  # a prepared dataset folder: its reference split and its class counts
    metrics: tuple[str, ...] = METRICS
    groups: bool = False
    per_class: bool = False
    features: str = "inception"  # or classifier:CKPT (a 'raydiff classify' checkpoint or run)
    inception_weights: str | None = None
    download: bool = True
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    # images per actor call: fewer, larger blocks through Ray Data; a GPU wants 128 or more
    batch_size: int = 128
    reference_per_class: int | None = None  # use only the first N reference images per class
    # copy rate and diversity per set: needs the features of the reference dataset's training
    # split (cached like the reference's)
    copying: bool = True
    cache_dir: str | None = None  # default: ~/.cache/raydiff/reference-features
    out: str | None = None  # default: the sample folder


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "raydiff" / \
        "reference-features"


# --- checks -----------------------------------------------------------------------------------

def check_job(job: EvalJob) -> tuple[dict, parquet.DatasetInfo]:
    """The sample manifest and reference info, after checking they can be compared."""
    unknown = [m for m in job.metrics if m not in METRICS]
    if unknown or not job.metrics:
        raise RaydiffError(f"--metrics {','.join(job.metrics)}: expected a comma-separated "
                           f"subset of {','.join(METRICS)}")
    for flag, value in (("--actors", job.actors), ("--batch-size", job.batch_size)):
        if value < 1:
            raise RaydiffError(f"{flag} must be at least 1, got {value}")
    if job.reference_per_class is not None and job.reference_per_class < 2:
        raise RaydiffError("--reference-per-class must be at least 2 (a covariance needs two "
                           f"images), got {job.reference_per_class}")
    manifest = load_manifest(job.samples)
    shard_paths(job.samples)  # refuses an incomplete or damaged folder
    info = parquet.load_info(job.reference)
    parquet.check_split(job.reference, "reference", info)
    if job.copying:
        parquet.check_split(job.reference, "train", info)
    ident = manifest["identity"]
    if ident["resolution"] != info.resolution:
        raise RaydiffError(f"reference {job.reference} is {info.resolution}x{info.resolution} "
                           f"but the samples are {ident['resolution']}x{ident['resolution']}")
    if ident["num_classes"] != info.num_classes:
        raise RaydiffError(f"reference {job.reference} has {info.num_classes} classes but the "
                           f"samples' checkpoint has {ident['num_classes']}")
    return manifest, info


def check_extractor(extractor: Extractor, info: parquet.DatasetInfo) -> None:
    """A classifier must tell the dataset's classes apart at its image side."""
    if extractor.kind != "classifier":
        return
    if extractor.num_classes != info.num_classes:
        raise RaydiffError(f"--features classifier:{extractor.path} has {extractor.num_classes} "
                           f"classes but the reference has {info.num_classes}")
    if extractor.resolution != info.resolution:
        raise RaydiffError(f"--features classifier:{extractor.path} was trained on "
                           f"{extractor.resolution} px images but the reference is "
                           f"{info.resolution} px")


# --- feature extraction in Ray Data actors ----------------------------------------------------

DRIVER_READ_MAX_BYTES = 256 << 20  # image sets this small (their Parquet files) are read here


class FeatureActor:
    """Ray Data actor: PNG bytes -> features (and logits), the extractor loaded once."""

    def __init__(self, extractor: dict, threads: int, use_gpu: bool, with_logits: bool):
        torch.set_num_threads(threads)
        self.net = Extractor(**extractor).load("cuda" if use_gpu else "cpu")
        self.with_logits = with_logits

    def __call__(self, batch: dict) -> dict:
        features, logits = self.net(decode_images(list(batch["image"])))
        out = {name: np.asarray(batch[name], np.int64).copy() for name in ("part", "key", "label")}
        out["feat"] = features
        if self.with_logits:
            out["logits"] = logits
        return out


def key_by_source(batch: dict, positions: dict[str, int]) -> dict:
    """A reference row's position from its unique ``source``; rows left out by the per-class
    cap are dropped."""
    keys = np.array([positions.get(s, -1) for s in batch["source"]], np.int64)
    keep = keys >= 0
    return {"key": keys[keep], "label": np.asarray(batch["label"])[keep],
            "image": np.asarray(batch["image"])[keep]}


def key_by_index(batch: dict) -> dict:
    return {"key": np.asarray(batch["index"], np.int64), "label": np.asarray(batch["label"]),
            "image": np.asarray(batch["image"])}


def _tagged(batch: dict, part: int, keyer, keyer_kwargs: dict) -> dict:
    rows = keyer(batch, **keyer_kwargs)
    return {"part": np.full(len(rows["key"]), part, np.int64), **rows}


def image_rows(folder: Folder, names: list[str], columns: list[str], part: int, keyer,
               rows_per_block: int, keyer_kwargs: dict | None = None):
    """The (part, key, label, image) rows of some Parquet files as a Ray Dataset, in blocks of
    ``rows_per_block`` rows so that every actor of the pool gets work.

    Files that add up to ``DRIVER_READ_MAX_BYTES`` or less are read by this process and handed
    to Ray Data as blocks: Ray Data's read tasks, keying stage and repartition cost seconds of
    task scheduling however few the rows (``benchmarks/eval_start.py``). Larger sets stream
    through Ray Data's readers."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    keyer_kwargs = keyer_kwargs or {}
    paths = [folder.path(name) for name in names]
    size = sum(info.size or 0 for info in folder.fs.get_file_info(paths))
    if size > DRIVER_READ_MAX_BYTES:
        ds = ray.data.read_parquet([folder.uri(name) for name in names]).select_columns(columns)
        ds = ds.map_batches(_tagged, fn_kwargs={"part": part, "keyer": keyer,
                                                "keyer_kwargs": keyer_kwargs},
                            batch_format="numpy", batch_size=None)
        return ds.repartition(target_num_rows_per_block=rows_per_block)
    table = pq.read_table(paths, filesystem=folder.fs, columns=columns)
    rows = _tagged({c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}, part,
                   keyer, keyer_kwargs)
    table = pa.table({"part": rows["part"], "key": rows["key"], "label": rows["label"],
                      "image": pa.array(list(rows["image"]), pa.binary())})
    n = table.num_rows
    return ray.data.from_arrow([table.slice(i, rows_per_block)
                                for i in range(0, max(n, 1), rows_per_block)])


@dataclass
class FeatureSet:
    """Feature rows (and logits) of one image set, in key order, with their labels."""

    features: np.ndarray
    labels: np.ndarray
    logits: np.ndarray | None = None

    @classmethod
    def empty(cls, n: int, extractor: Extractor, with_logits: bool) -> FeatureSet:
        return cls(np.zeros((n, extractor.feature_dim), np.float32), np.full(n, -1, np.int64),
                   np.zeros((n, extractor.logits_dim), np.float32) if with_logits else None)

    def add(self, batch: dict) -> None:
        keys = np.asarray(batch["key"])
        self.features[keys] = batch["feat"]
        self.labels[keys] = batch["label"]
        if self.logits is not None:
            self.logits[keys] = batch["logits"]


@dataclass
class FeaturePass:
    """One image set of a feature pass: a builder of its rows (``image_rows``, given the
    set's part number) and the FeatureSet they fill; ``on_batch`` sees every batch too."""

    name: str
    rows: Callable[[int], Any]
    into: FeatureSet
    on_batch: Callable[[dict], None] | None = None


def extract(job: EvalJob, extractor: Extractor, passes: list[FeaturePass]) -> None:
    """The features of every set in one Ray Data execution: one actor pool, the extractor
    loaded once per actor, however many sets (generated, reference, training) need it."""
    import ray

    if not passes:
        return
    sets = [p.rows(part) for part, p in enumerate(passes)]
    ds = sets[0].union(*sets[1:]) if len(sets) > 1 else sets[0]
    ds = ds.map_batches(
        FeatureActor,
        fn_constructor_kwargs={"extractor": asdict(extractor),
                               "threads": max(1, int(job.cpus_per_actor)),
                               "use_gpu": job.gpus_per_actor > 0,
                               "with_logits": any(p.into.logits is not None for p in passes)},
        compute=ray.data.ActorPoolStrategy(size=job.actors), batch_size=job.batch_size,
        batch_format="numpy", num_cpus=job.cpus_per_actor, num_gpus=job.gpus_per_actor or None)
    for batch in runtime.quiet(ds).iter_batches(batch_size=None, batch_format="numpy"):
        parts = np.asarray(batch["part"])
        for part in np.unique(parts):
            rows = {name: np.asarray(column)[parts == part] for name, column in batch.items()}
            target = passes[int(part)]
            target.into.add(rows)
            if target.on_batch is not None:
                target.on_batch(rows)
    for p in passes:
        if (p.into.labels < 0).any():
            raise RuntimeError(f"{int((p.into.labels < 0).sum())} {p.name} images got no "
                               f"features")


def sample_pass(job: EvalJob, manifest: dict, extractor: Extractor, groups: np.ndarray,
                with_logits: bool) -> tuple[FeaturePass, list[FeatureStats]]:
    """The generated images' pass, and their sufficient statistics per class group,
    accumulated in float64 as batches arrive."""
    stats = [FeatureStats(dim=extractor.feature_dim) for _ in GROUPS]

    def accumulate(batch: dict) -> None:
        batch_groups = groups[np.asarray(batch["label"])]
        for g, group_stats in enumerate(stats):
            group_stats.update(np.asarray(batch["feat"])[batch_groups == g])

    folder = Folder(job.samples)
    names = [shard_name(k) for k in range(manifest["num_shards"])]
    rows = functools.partial(image_rows, folder, names, ["index", "label", "image"],
                             keyer=key_by_index, rows_per_block=job.batch_size)
    into = FeatureSet.empty(manifest["num_images"], extractor, with_logits)
    return FeaturePass("generated", rows, into, accumulate), stats


def reference_identity(reference: str) -> str:
    """sha256 over the reference's dataset.json and the bytes of its reference shards."""
    names = [parquet.INFO_FILE, *parquet.load_info(reference).files["reference"]]
    return Folder(reference).sha256(names, named=True)


def _reference_positions(reference: str, per_class: int | None,
                         split: str = "reference") -> dict[str, int]:
    """Position of each image of ``split`` kept (file order; first ``per_class`` per class)."""
    table = parquet.read_split(reference, split, columns=["label", "source"])
    labels, sources = table.column("label").to_numpy(), table.column("source").to_pylist()
    if len(set(sources)) != len(sources):
        raise RaydiffError(f"{reference}: {split} rows do not have unique 'source' values")
    seen: dict[int, int] = {}
    positions: dict[str, int] = {}
    for label, source in zip(labels.tolist(), sources):
        seen[label] = seen.get(label, 0) + 1
        if per_class is None or seen[label] <= per_class:
            positions[source] = len(positions)
    return positions


def _read_cache(folder: Path, feature_dim: int) -> FeatureSet | None:
    """A cache entry's features, or None when there is none. A damaged entry (unreadable,
    of the wrong shape, not finite) counts as a miss: it is removed and extracted again."""
    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        features = np.load(folder / "features.npy")  # allow_pickle=False: arrays only
        labels = np.load(folder / "labels.npy")
        n = int(meta["num_images"])
        if (features.shape != (n, feature_dim) or labels.shape != (n,)
                or not np.isfinite(features).all()):
            raise ValueError(f"features {features.shape}, labels {labels.shape}, "
                             f"{n} images expected")
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        logger.warning("evaluate: cache entry %s is damaged (%s); extracting again", folder,
                       str(err).splitlines()[0] if str(err) else type(err).__name__)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return FeatureSet(features, labels)


@dataclass
class CachedSplit:
    """The features of one split of the reference dataset: read from the cache (``hit``), or
    to be filled by ``extract`` (``pass_``) and then stored (``store``)."""

    split: str
    key_data: dict
    folder: Path
    features: FeatureSet
    hit: bool
    pass_: FeaturePass | None = None

    def store(self, reference: str) -> None:
        if self.hit:
            return
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        if self.folder.exists():  # another evaluation filled the cache meanwhile
            return
        with atomic_path(self.folder) as tmp:
            tmp.mkdir()
            np.save(tmp / "features.npy", self.features.features)
            np.save(tmp / "labels.npy", self.features.labels)
            (tmp / "meta.json").write_text(json.dumps(
                {**self.key_data, "reference_path": reference,
                 "num_images": len(self.features.labels)}))


def cached_split(job: EvalJob, extractor: Extractor, split: str = "reference") -> CachedSplit:
    """The cache entry of the reference dataset's ``split`` (its reference images cut to
    ``job.reference_per_class``, or its whole training split for the copy rate)."""
    per_class = job.reference_per_class if split == "reference" else None
    key_data = {"version": CACHE_VERSION, "reference": reference_identity(job.reference),
                "per_class": per_class, "extractor": extractor.name,
                "weights_sha256": extractor.sha256,
                **({"split": split} if split != "reference" else {})}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:32]
    folder = Path(job.cache_dir or default_cache_dir()) / key
    cached = _read_cache(folder, extractor.feature_dim)
    if cached is not None:
        logger.info("evaluate: %s features from cache %s", split, folder)
        return CachedSplit(split, key_data, folder, cached, hit=True)
    positions = _reference_positions(job.reference, per_class, split)
    into = FeatureSet.empty(len(positions), extractor, with_logits=False)
    info = parquet.load_info(job.reference)
    rows = functools.partial(image_rows, Folder(job.reference), info.files[split],
                             ["image", "label", "source"], keyer=key_by_source,
                             rows_per_block=job.batch_size, keyer_kwargs={"positions": positions})
    return CachedSplit(split, key_data, folder, into, hit=False,
                       pass_=FeaturePass(split, rows, into))


def reference_features(job: EvalJob, extractor: Extractor,
                       splits: tuple[str, ...] = ("reference",),
                       also: tuple[FeaturePass, ...] = ()) -> tuple[dict[str, CachedSplit],
                                                                     list[FeaturePass]]:
    """The features of the reference dataset's ``splits``: the cached ones read back, the
    others extracted (in one pass with the sets ``also`` asks for) and cached. Returns the
    splits and the passes that ran."""
    found = {split: cached_split(job, extractor, split) for split in splits}
    passes = [c.pass_ for c in found.values() if c.pass_ is not None] + list(also)
    extract(job, extractor, passes)
    for entry in found.values():
        entry.store(job.reference)
    return found, passes


# --- metrics ----------------------------------------------------------------------------------

def compute_all(job: EvalJob, gen: FeatureSet, gen_stats: list[FeatureStats], ref: FeatureSet,
                groups: np.ndarray, classes: list[int], classifier: bool = False,
                train: FeatureSet | None = None, shots: np.ndarray | None = None) -> dict:
    """Overall and per-group metrics, and per-class FID when asked; with ``classifier`` (the
    logits are a classifier's), its top-1 on the generated images of every set; with the
    ``train`` features, each set's copy rate and diversity (``metrics.copy_and_diversity``)."""
    sets = {"overall": list(classes)}
    if job.groups:
        sets.update({name: [c for c in classes if groups[c] == g]
                     for g, name in enumerate(GROUPS)})
        if shots is not None:  # many / medium / few shot, by absolute training count
            sets.update({name: [c for c in classes if shots[c] == g]
                         for g, name in enumerate(SHOT_GROUPS)})
    results = {}
    for name, members in sets.items():
        if not members:
            continue
        in_gen, in_ref = np.isin(gen.labels, members), np.isin(ref.labels, members)
        member_groups = sorted({int(groups[c]) for c in members})
        if set(members) == {c for c in classes if groups[c] in member_groups}:
            stats = gen_stats[member_groups[0]]  # a union of thirds: the streamed float64 sums
            for g in member_groups[1:]:
                stats = stats.merge(gen_stats[g])
        else:
            stats = FeatureStats.of(gen.features[in_gen])
        results[name] = metrics_lib.set_metrics(
            job.metrics, stats, FeatureStats.of(ref.features[in_ref]), gen.features[in_gen],
            ref.features[in_ref], None if gen.logits is None else gen.logits[in_gen])
        results[name]["classes"] = members
        if train is not None:
            results[name].update(metrics_lib.copy_and_diversity(
                gen.features[in_gen], gen.labels[in_gen], train.features, train.labels,
                ref.features, ref.labels, members))
        if classifier:  # its top-1 on the generated images of the set
            results[name]["classifier_top1"] = float(
                (gen.logits[in_gen].argmax(1) == gen.labels[in_gen]).mean())
    out = {"sets": results}
    if job.per_class:
        per_class = metrics_lib.per_class_fid(gen.features, gen.labels, ref.features, ref.labels,
                                              classes)
        out["per_class_fid"] = {str(c): v for c, v in per_class.items()}
        finite = [v for v in per_class.values() if np.isfinite(v)]  # NaN: under 2 images
        out["per_class_fid_mean"] = float(np.mean(finite)) if finite else float("nan")
    return out


def _write_outputs(out: Folder, result: dict) -> None:
    from raydiff.report import metrics_chart

    out.write_json(METRICS_FILE, json_safe(result))
    out.write_bytes(CHART_FILE, to_buffer(lambda f: metrics_chart(result).save(f, format="PNG")))


def run_evaluation(job: EvalJob) -> dict:
    """Extract features, compute the metrics, write metrics.json and metrics.png."""
    manifest, info = check_job(job)
    extractor = resolve_extractor(job.features, job.inception_weights, job.download)
    check_extractor(extractor, info)
    classifier = extractor.kind == "classifier"
    runtime.init_ray(job.actors * job.cpus_per_actor)
    start = time.monotonic()
    groups = metrics_lib.class_groups(info.counts("train"))
    shots = metrics_lib.shot_groups(info.counts("train"))
    generated, gen_stats = sample_pass(job, manifest, extractor, groups,
                                       "isc" in job.metrics or classifier)
    # one Ray Data execution for the samples and every reference split not cached
    cached, passes = reference_features(
        job, extractor, ("reference", "train") if job.copying else ("reference",), (generated,))
    features_seconds = time.monotonic() - start
    ref, gen = cached["reference"].features, generated.into
    train = cached["train"].features if job.copying else None
    classes = [int(c) for c in manifest["identity"]["classes"]]
    result = {
        "samples": str(job.samples), "reference": str(job.reference),
        "feature_extractor": {"name": extractor.name, "weights": extractor.path,
                              "weights_sha256": extractor.sha256,
                              "feature_dim": extractor.feature_dim},
        "settings": {**{k: v for k, v in asdict(job).items()
                        if k in ("metrics", "groups", "per_class", "reference_per_class")},
                     "kid_subsets": metrics_lib.KID_SUBSETS, "isc_splits": metrics_lib.ISC_SPLITS,
                     "prc_neighborhood": metrics_lib.PRC_NEIGHBORHOOD,
                     "prc_max_images": metrics_lib.PRC_MAX_IMAGES,
                     "copy_ratio": metrics_lib.COPY_RATIO if job.copying else None,
                     "diversity_max_rows": metrics_lib.DIVERSITY_MAX_ROWS},
        "groups": {name: [c for c in range(info.num_classes) if groups[c] == g]
                   for g, name in enumerate(GROUPS)},
        "shot_groups": {name: [c for c in range(info.num_classes) if shots[c] == g]
                        for g, name in enumerate(SHOT_GROUPS)},
        **compute_all(job, gen, gen_stats, ref, groups, classes, classifier, train, shots),
        "reference_cache": "hit" if cached["reference"].hit else "miss",
        # images through the feature extractor, per set (a cached set's are not)
        "extracted": {p.name: len(p.into.labels) for p in passes},
        "seconds": {"features": round(features_seconds, 2),
                    "metrics": round(time.monotonic() - start - features_seconds, 2)},
    }
    if classifier:
        result["classifier_accuracy"] = classifier_accuracy(gen, info)
    _write_outputs(Folder(job.out or job.samples), result)
    return result


def classifier_accuracy(gen: FeatureSet, info: parquet.DatasetInfo) -> dict:
    """The classifier's top-1 on the generated images per class, per head/body/tail third and
    per many/medium/few-shot group (groups cut by the real training counts)."""
    from raydiff.classifier import accuracy_report, correct_counts

    correct, total = correct_counts(gen.logits.argmax(1), gen.labels, info.num_classes)
    return accuracy_report(correct, total, info.counts("train"), info.class_names)
