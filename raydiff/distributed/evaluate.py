"""``raydiff evaluate``: FID/KID/IS/PR of a sample folder against a prepared reference split.

Pipeline (``run_evaluation``), one Ray Data execution::

    generated images (keyed by index)                 \
    reference images (keyed by position), if not cached  > union --map_batches(FeatureActor,
    training images (copy rate), if not cached        /          ActorPoolStrategy)-->
    driver: the generated rows stream into ``accumulate.GeneratedStream`` (float64 statistics
    per class cell, a seeded subset of ``--metric-subset`` rows per cell, IS sums, top-1
    counts); the reference and training rows are written, row by row, into new cache entries

then the reference split's cache entry is read a chunk at a time into its own
``accumulate.FeatureStream``, and the copy rate reads the training and reference entries the
same way. Driver memory is bounded by the subset size and the feature dimension, not by the
number of images (``benchmarks/eval_memory.py``).

Small image sets are read by the driver and handed to Ray Data as blocks, large ones stream
through Ray Data's Parquet readers (``image_rows``).

Features are torch-fidelity's ``inception-v3-compat``, or with ``--features classifier:CKPT``
the penultimate layer of a ``raydiff classify`` checkpoint (``raydiff.features``); the metrics
are finished by ``raydiff.metrics`` with torch-fidelity's own functions. With a classifier, its
top-1 on the generated images (does a tail sample look like its class?) is reported per set and
per class, and IS is computed from its logits (in [1, num_classes]). The generated set is
compared with the reference images of the same classes: overall, and with ``--groups`` for the
head / body / tail thirds of the classes ranked by training count (taken from the reference
dataset's ``dataset.json``) and the many / medium / few-shot groups, optionally per class
(``--per-class-fid``).

Reference features are cached on disk under a key made of the reference's identity (a hash of
its dataset.json and reference shards), the per-class cap, the feature extractor's name and the
hash of its weights (a classifier's: of its weights and config), so a second evaluation against
the same reference skips its feature pass. An entry holds every row (``features.npy``); it is
read in chunks, never whole.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydiff import accumulate
from raydiff import metrics as metrics_lib
from raydiff.accumulate import CopyRatios, FeatureStream, GeneratedStream, Rows
from raydiff.data import feature_rows, parquet
from raydiff.data.feature_rows import RowsWriter, StoredRows
from raydiff.data.images import decode_images
from raydiff.data.samples import load_manifest, shard_name, shard_paths
from raydiff.distributed import runtime
from raydiff.errors import RaydiffError
from raydiff.features import Extractor, resolve_extractor
from raydiff.metrics import GROUPS, METRICS, RNG_SEED, SHOT_GROUPS
from raydiff.storage import Folder, json_safe, to_buffer

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CHART_FILE = "metrics.png"
CACHE_VERSION = 1
# seeds of the metric subsets' priorities (accumulate.subset_priority), one per side
GENERATED_SEED, REFERENCE_SEED = RNG_SEED, RNG_SEED + 1


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
    # rows per reported set and side for KID, P/R, copy rate and diversity: a seeded subset
    # (FID, IS and a classifier's top-1 use every image)
    metric_subset: int = accumulate.METRIC_SUBSET
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
    if job.metric_subset <= metrics_lib.PRC_NEIGHBORHOOD:
        raise RaydiffError(f"--metric-subset must be at least {metrics_lib.PRC_NEIGHBORHOOD + 1} "
                           f"(precision/recall compare each image with its "
                           f"{metrics_lib.PRC_NEIGHBORHOOD} nearest others), got "
                           f"{job.metric_subset}")
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

# Image sets this small (their Parquet files) are read here: the driver's memory for images
# is bounded by this, whatever the set's size (``benchmarks/eval_memory.py``).
DRIVER_READ_MAX_BYTES = 8 << 20


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
class FeaturePass:
    """One image set of a feature pass: a builder of its rows (``image_rows``, given the
    set's part number), the function every batch of its features goes to, and how many
    images it has."""

    name: str
    rows: Callable[[int], Any]
    sink: Callable[[dict], None]
    expected: int
    with_logits: bool = False
    received: int = 0


def extract(job: EvalJob, extractor: Extractor, passes: list[FeaturePass]) -> None:
    """The features of every set in one Ray Data execution: one actor pool, the extractor
    loaded once per actor, however many sets (generated, reference, training) need it. The
    batches go to the passes' sinks as they arrive; none is kept here."""
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
                               "with_logits": any(p.with_logits for p in passes)},
        compute=ray.data.ActorPoolStrategy(size=job.actors), batch_size=job.batch_size,
        batch_format="numpy", num_cpus=job.cpus_per_actor, num_gpus=job.gpus_per_actor or None)
    for batch in runtime.quiet(ds).iter_batches(batch_size=None, batch_format="numpy"):
        parts = np.asarray(batch["part"])
        for part in np.unique(parts):
            rows = {name: np.asarray(column)[parts == part] for name, column in batch.items()}
            target = passes[int(part)]
            target.sink(rows)
            target.received += len(rows["key"])
    for p in passes:
        if p.received < p.expected:
            raise RuntimeError(f"{p.expected - p.received} {p.name} images got no features")
        if p.received > p.expected:
            raise RuntimeError(f"{p.received} {p.name} feature rows for {p.expected} images")


def sample_pass(job: EvalJob, manifest: dict, generated: GeneratedStream) -> FeaturePass:
    """The generated images' pass: every batch of features streams into ``generated``."""
    folder = Folder(job.samples)
    names = [shard_name(k) for k in range(manifest["num_shards"])]
    rows = functools.partial(image_rows, folder, names, ["index", "label", "image"],
                             keyer=key_by_index, rows_per_block=job.batch_size)

    def sink(batch: dict) -> None:
        generated.add(batch["key"], batch["label"], batch["feat"], batch.get("logits"))

    return FeaturePass("generated", rows, sink, manifest["num_images"],
                       with_logits=bool(generated.scores) or generated.correct is not None)


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


def _read_cache(folder: Path, feature_dim: int) -> StoredRows | None:
    """A cache entry's rows (on disk, checked), or None when there is none. A damaged entry
    (unreadable, of the wrong shape, not finite) counts as a miss: it is removed and
    extracted again."""
    if not (folder / feature_rows.META_FILE).is_file():
        return None
    try:
        meta = json.loads((folder / feature_rows.META_FILE).read_text())
        labels = np.load(folder / feature_rows.LABELS_FILE)  # allow_pickle=False: arrays only
        rows = StoredRows(folder / feature_rows.FEATURES_FILE, labels)
        n = int(meta["num_images"])
        if rows.shape != (n, feature_dim) or labels.shape != (n,):
            raise ValueError(f"features {rows.shape}, labels {labels.shape}, "
                             f"{n} images expected")
        if not all(np.isfinite(chunk).all() for _, _, chunk in rows.chunks()):
            raise ValueError("features that are not finite")
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        logger.warning("evaluate: cache entry %s is damaged (%s); extracting again", folder,
                       str(err).splitlines()[0] if str(err) else type(err).__name__)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return rows


@dataclass
class CachedSplit:
    """The features of one split of the reference dataset, in a cache entry on disk: there
    already (``hit``), or written by ``extract`` through ``pass_`` and then ``store``d."""

    split: str
    key_data: dict
    folder: Path
    feature_dim: int
    hit: bool
    rows: StoredRows | None = None
    pass_: FeaturePass | None = None
    writer: RowsWriter | None = None

    def store(self, reference: str) -> None:
        if self.hit:
            return
        self.writer.finish({**self.key_data, "reference_path": reference}, self.split)
        if self.folder.exists():  # another evaluation filled the cache meanwhile
            shutil.rmtree(self.writer.folder, ignore_errors=True)
        else:
            os.replace(self.writer.folder, self.folder)
        self.rows = _read_cache(self.folder, self.feature_dim)
        if self.rows is None:
            raise RuntimeError(f"the {self.split} features just stored in {self.folder} "
                               "cannot be read back")

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.discard()


def cached_split(job: EvalJob, extractor: Extractor, split: str = "reference") -> CachedSplit:
    """The cache entry of the reference dataset's ``split`` (its reference images cut to
    ``job.reference_per_class``, or its whole training split for the copy rate); on a miss,
    with the pass that fills it."""
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
        return CachedSplit(split, key_data, folder, extractor.feature_dim, hit=True, rows=cached)
    positions = _reference_positions(job.reference, per_class, split)
    writer = RowsWriter(folder.with_name(f".{folder.name}.tmp-{os.getpid()}"), len(positions),
                        extractor.feature_dim)
    info = parquet.load_info(job.reference)
    rows = functools.partial(image_rows, Folder(job.reference), info.files[split],
                             ["image", "label", "source"], keyer=key_by_source,
                             rows_per_block=job.batch_size, keyer_kwargs={"positions": positions})
    return CachedSplit(split, key_data, folder, extractor.feature_dim, hit=False,
                       pass_=FeaturePass(split, rows, writer.add, len(positions)), writer=writer)


def reference_features(job: EvalJob, extractor: Extractor,
                       splits: tuple[str, ...] = ("reference",),
                       also: tuple[FeaturePass, ...] = ()) -> tuple[dict[str, CachedSplit],
                                                                     list[FeaturePass]]:
    """The features of the reference dataset's ``splits`` in the cache: the cached ones as
    they are, the others extracted (in one pass with the sets ``also`` asks for) into new
    entries. Returns the splits (their rows on disk) and the passes that ran."""
    found: dict[str, CachedSplit] = {}
    try:
        for split in splits:
            found[split] = cached_split(job, extractor, split)
        passes = [c.pass_ for c in found.values() if c.pass_ is not None] + list(also)
        extract(job, extractor, passes)
        for entry in found.values():
            entry.store(job.reference)
    except BaseException:
        for entry in found.values():
            entry.discard()
        raise
    return found, passes


# --- metrics ----------------------------------------------------------------------------------

def reference_stream(job: EvalJob, rows: StoredRows, cells: np.ndarray,
                     per_class_stats: bool) -> FeatureStream:
    """The reference side, read from its cache entry a chunk at a time."""
    stream = FeatureStream(cells, rows.shape[1], job.metric_subset, REFERENCE_SEED,
                           per_class_stats)
    for keys, labels, chunk in rows.chunks():
        stream.add(keys, labels, chunk)
    return stream


def compute_all(job: EvalJob, gen: GeneratedStream, ref: FeatureStream,
                sets: dict[str, list[int]], classes: list[int],
                copy_from: tuple[StoredRows, StoredRows] | None = None) -> dict:
    """Overall and per-group metrics, and per-class FID when asked; with ``copy_from`` (the
    training and reference splits' rows), each set's copy rate and diversity."""
    copies = diversity = None
    if copy_from is not None:
        train, reference = copy_from
        queries = gen.features.subset_rows()
        copies = CopyRatios(queries.keys, accumulate.copy_ratios(
            queries, (Rows(*c) for c in train.chunks()), (Rows(*c) for c in reference.chunks())))
        diversity = accumulate.class_diversity(gen.features, ref, classes)
    out = {"sets": {name: accumulate.set_results(job.metrics, gen, ref, name, members, copies,
                                                 diversity)
                    for name, members in sets.items()}}
    if job.per_class:
        per_class = accumulate.per_class_fid(gen.features, ref, classes)
        out["per_class_fid"] = {str(c): v for c, v in per_class.items()}
        finite = [v for v in per_class.values() if np.isfinite(v)]  # NaN: under 2 images
        out["per_class_fid_mean"] = float(np.mean(finite)) if finite else float("nan")
    return out


def _write_outputs(out: Folder, result: dict) -> None:
    from raydiff.report import metrics_chart

    out.write_json(METRICS_FILE, json_safe(result))
    out.write_bytes(CHART_FILE, to_buffer(lambda f: metrics_chart(result).save(f, format="PNG")))


def _settings(job: EvalJob, per_class_stats: bool) -> dict:
    """What metrics.json states about how the numbers were made."""
    out = {k: v for k, v in asdict(job).items()
           if k in ("metrics", "groups", "per_class", "reference_per_class", "metric_subset")}
    out.update({"metric_subset_seed": {"generated": GENERATED_SEED, "reference": REFERENCE_SEED},
                "kid_subsets": metrics_lib.KID_SUBSETS, "isc_splits": metrics_lib.ISC_SPLITS,
                "prc_neighborhood": metrics_lib.PRC_NEIGHBORHOOD,
                "copy_ratio": metrics_lib.COPY_RATIO if job.copying else None,
                "diversity_max_rows": metrics_lib.DIVERSITY_MAX_ROWS})
    if job.per_class:
        out["per_class_fid_from"] = "all images" if per_class_stats else "metric subset"
    return out


# what every job of one ``run_evaluations`` call must share: the reference side and the pool
SHARED = ("reference", "features", "inception_weights", "download", "actors", "gpus_per_actor",
          "cpus_per_actor", "batch_size", "reference_per_class", "copying", "cache_dir")


@dataclass
class _Generated:
    """One job's generated side: its sets and the stream its features go to."""

    job: EvalJob
    classes: list[int]
    sets: dict[str, list[int]]
    cells: np.ndarray
    per_class_stats: bool
    stream: GeneratedStream
    pass_: FeaturePass


def _generated_side(job: EvalJob, manifest: dict, info: parquet.DatasetInfo,
                    groups: np.ndarray, shots: np.ndarray, extractor: Extractor,
                    name: str) -> _Generated:
    classes = [int(c) for c in manifest["identity"]["classes"]]
    sets = accumulate.eval_sets(classes, groups, shots, job.groups)
    cells = accumulate.class_cells(info.num_classes, classes, groups, shots)
    per_class_stats = job.per_class and accumulate.per_class_stats_fit(len(classes),
                                                                       extractor.feature_dim)
    stream = GeneratedStream(
        FeatureStream(cells, extractor.feature_dim, job.metric_subset, GENERATED_SEED,
                      per_class_stats),
        classes, manifest["identity"]["per_class"], sets,
        logits_dim=extractor.logits_dim if "isc" in job.metrics else None,
        top1=extractor.kind == "classifier")
    pass_ = replace(sample_pass(job, manifest, stream), name=name)
    return _Generated(job, classes, sets, cells, per_class_stats, stream, pass_)


def _result(gen: _Generated, info: parquet.DatasetInfo, groups: np.ndarray, shots: np.ndarray,
            extractor: Extractor, cached: dict[str, CachedSplit], ran: list[FeaturePass],
            seconds: dict[str, float]) -> dict:
    job = gen.job
    ref = reference_stream(job, cached["reference"].rows, gen.cells, gen.per_class_stats)
    copy_from = (cached["train"].rows, cached["reference"].rows) if job.copying else None
    result = {
        "samples": str(job.samples), "reference": str(job.reference),
        "feature_extractor": {"name": extractor.name, "weights": extractor.path,
                              "weights_sha256": extractor.sha256,
                              "feature_dim": extractor.feature_dim},
        "settings": _settings(job, gen.per_class_stats),
        "groups": {name: [c for c in range(info.num_classes) if groups[c] == g]
                   for g, name in enumerate(GROUPS)},
        "shot_groups": {name: [c for c in range(info.num_classes) if shots[c] == g]
                        for g, name in enumerate(SHOT_GROUPS)},
        **compute_all(job, gen.stream, ref, gen.sets, gen.classes, copy_from),
        "reference_cache": "hit" if cached["reference"].hit else "miss",
        # images through the feature extractor, per set (a cached set's are not)
        "extracted": {**{p.name: p.expected for p in ran}, "generated": gen.pass_.expected},
        "seconds": seconds,
    }
    if extractor.kind == "classifier":
        result["classifier_accuracy"] = classifier_accuracy(gen.stream, info)
    return result


def run_evaluation(job: EvalJob) -> dict:
    """Extract features, compute the metrics, write metrics.json and metrics.png."""
    return run_evaluations([job])[0]


def run_evaluations(jobs: list[EvalJob]) -> list[dict]:
    """Evaluate several sample folders against one reference in one Ray Data execution: one
    actor pool loads the feature extractor once for all of them (a study's every run), and
    the reference features are read or extracted once. Each job gets the metrics.json and
    metrics.png ``run_evaluation`` would write for it alone; the jobs must agree on
    ``SHARED``."""
    if not jobs:
        return []
    first = jobs[0]
    for job in jobs[1:]:
        differ = [k for k in SHARED if getattr(job, k) != getattr(first, k)]
        if differ:
            raise RaydiffError(f"evaluations of {first.samples} and {job.samples} in one pass "
                               f"must share {', '.join(differ)}")
    outs = [job.out or job.samples for job in jobs]
    if len(set(outs)) != len(outs):
        raise RaydiffError(f"two evaluations would write to one folder: {outs}")
    checked = [check_job(job) for job in jobs]
    extractor = resolve_extractor(first.features, first.inception_weights, first.download)
    info = checked[0][1]
    check_extractor(extractor, info)
    runtime.init_ray(first.actors * first.cpus_per_actor)
    start = time.monotonic()
    groups = metrics_lib.class_groups(info.counts("train"))
    shots = metrics_lib.shot_groups(info.counts("train"))
    sides = [_generated_side(job, manifest, info, groups, shots, extractor,
                             "generated" if len(jobs) == 1 else f"generated ({job.samples})")
             for job, (manifest, _) in zip(jobs, checked)]
    # one Ray Data execution for every job's samples and every reference split not cached
    cached, passes = reference_features(
        first, extractor, ("reference", "train") if first.copying else ("reference",),
        tuple(side.pass_ for side in sides))
    ran = [p for p in passes if all(p is not side.pass_ for side in sides)]
    features_seconds = time.monotonic() - start
    results = []
    for side in sides:
        started, seconds = time.monotonic(), {"features": round(features_seconds, 2)}
        result = _result(side, info, groups, shots, extractor, cached, ran, seconds)
        seconds["metrics"] = round(time.monotonic() - started, 2)
        _write_outputs(Folder(side.job.out or side.job.samples), result)
        results.append(result)
    return results


def classifier_accuracy(gen: GeneratedStream, info: parquet.DatasetInfo) -> dict:
    """The classifier's top-1 on the generated images per class, per head/body/tail third and
    per many/medium/few-shot group (groups cut by the real training counts)."""
    from raydiff.classifier import accuracy_report

    return accuracy_report(gen.correct, gen.total, info.counts("train"), info.class_names)
