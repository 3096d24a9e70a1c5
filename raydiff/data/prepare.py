"""``raydiff prepare``: build a long-tailed training split and a balanced reference split.

Sources and what they need:

=============  ===============================  ===============================================
source         input                            reference split (default, alternative)
=============  ===============================  ===============================================
shapes         nothing (drawn from --seed)      the balanced pool the train split is cut from
cifar10/100    --root with the pickle folder    full training set; ``--reference test``
imagenet-lt    --root images + split lists      ``--reference val`` list; ``test``
places-lt      --root images + split lists      ``--reference val`` list; ``test``
imagefolder    --root class-per-folder tree     the whole tree; ``--reference-root TREE``
=============  ===============================  ===============================================

``--latents VAE`` (a known name such as ``sd-vae-ft-ema``, or a VAE folder) also encodes the
training split with that VAE in Ray Data actors (one per GPU when the cluster has GPUs) and
stores the latents beside the images (``raydiff.data.parquet``, "latent dataset"); the images
and the reference split stay as they are, so evaluation compares images with images.

The output appears all at once: everything is written into a hidden sibling of ``--out`` and
renamed into place at the end, and any error removes the sibling, so a folder at ``--out``
is always a complete dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import raydiff
from raydiff.config import LatentConfig
from raydiff.data import cifar, imagefiles, parquet, shapes
from raydiff.data.longtail import BuiltSource
from raydiff.data.parquet import (
    DEFAULT_ROWS_PER_SHARD,
    FORMAT_VERSION,
    INFO_FILE,
    SPLITS,
    DatasetInfo,
    encode_pool,
    write_split,
)
from raydiff.errors import RaydiffError
from raydiff.storage import Folder, is_uri

logger = logging.getLogger(__name__)

SOURCES = ("shapes", "cifar10", "cifar100", "imagenet-lt", "places-lt", "imagefolder")
_NEEDS_ROOT = {"cifar10", "cifar100", "imagenet-lt", "places-lt", "imagefolder"}
_DEFAULT_RESOLUTION = {"shapes": 32, "cifar10": 32, "cifar100": 32}
_FILE_RESOLUTION = 64  # list and folder sources: TinyImageNet's size; pass 256 for SiT runs
_DEFAULT_IMBALANCE = {"cifar10": 100.0, "cifar100": 100.0, "shapes": shapes.DEFAULT_IMBALANCE_RATIO}
# Options that mean something only for some sources; given elsewhere they are an error
# rather than silently ignored.
_APPLIES_TO = {
    "imbalance_ratio": {"shapes", "cifar10", "cifar100", "imagefolder"},
    "reference": {"cifar10", "cifar100", "imagenet-lt", "places-lt"},
    "train_list": {"imagenet-lt", "places-lt"},
    "reference_list": {"imagenet-lt", "places-lt"},
    "reference_root": {"imagefolder"},
    "num_classes": {"shapes", "imagenet-lt", "places-lt"},
    "images_per_class": {"shapes", "imagefolder"},
}
_LATENT_OPTIONS = ("latent_scale", "latent_dtype")  # mean something only with --latents


@dataclass(frozen=True)
class PrepareOptions:
    """Everything ``prepare`` needs; ``None`` means the source's default."""

    source: str
    out: Path
    root: Path | None = None
    imbalance_ratio: float | None = None
    resolution: int | None = None
    seed: int = 0
    reference: str | None = None
    train_list: str | None = None
    reference_list: str | None = None
    reference_root: Path | None = None
    num_classes: int | None = None
    images_per_class: int | None = None
    workers: int = 1
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    overwrite: bool = False
    latents: str | None = None  # VAE name or folder: also store the training split's latents
    latent_scale: float | None = None  # default raydiff.vae.DEFAULT_SCALE
    latent_dtype: str | None = None  # float16 (default) or float32


def default_workers() -> int:
    """The CPUs this process may use (respects affinity masks and container CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    fields = PrepareOptions.__dataclass_fields__
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    options.setdefault("workers", default_workers())
    # a URI --out is built in a local folder and uploaded (``run``); its text is args.out
    return PrepareOptions(**{**options, "out": Path(options["out"])})


def _check_options(options: PrepareOptions) -> None:
    source = options.source
    for name, sources in _APPLIES_TO.items():
        if getattr(options, name) is not None and source not in sources:
            raise RaydiffError(f"--{name.replace('_', '-')} does not apply to source {source}")
    if source in _NEEDS_ROOT and options.root is None:
        raise RaydiffError(f"source {source} needs --root")
    if options.resolution is not None and options.resolution < 1:
        raise RaydiffError(f"--resolution must be positive, got {options.resolution}")
    if options.seed < 0:
        raise RaydiffError(f"--seed must be non-negative, got {options.seed}")
    if options.rows_per_shard < 1:
        raise RaydiffError(f"--rows-per-shard must be positive, got {options.rows_per_shard}")
    for name in ("num_classes", "images_per_class"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise RaydiffError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    ratio = options.imbalance_ratio
    if ratio is not None and not (math.isfinite(ratio) and ratio >= 1):
        raise RaydiffError(f"--imbalance-ratio must be a finite number >= 1, got {ratio}")
    for name in _LATENT_OPTIONS:
        if getattr(options, name) is not None and not options.latents:
            raise RaydiffError(f"--{name.replace('_', '-')} applies only with --latents")
    scale = options.latent_scale
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise RaydiffError(f"--latent-scale must be a finite number > 0, got {scale}")
    if options.latent_dtype is not None and options.latent_dtype not in parquet.LATENT_DTYPES:
        raise RaydiffError(f"--latent-dtype must be one of {', '.join(parquet.LATENT_DTYPES)}, "
                           f"got {options.latent_dtype}")


def content_options(options: PrepareOptions) -> dict:
    """The options that decide a dataset's content, with every default filled in: what
    ``build_source`` builds from, and what decides whether a prepared dataset can be reused."""
    source = options.source
    defaults = {"imbalance_ratio": _DEFAULT_IMBALANCE.get(source),
                "resolution": _DEFAULT_RESOLUTION.get(source, _FILE_RESOLUTION)}
    if source == "shapes":
        defaults |= {"num_classes": shapes.DEFAULT_NUM_CLASSES,
                     "images_per_class": shapes.DEFAULT_IMAGES_PER_CLASS}
    elif source in cifar.LAYOUTS:
        defaults["reference"] = "train"
    elif source in imagefiles.LIST_LAYOUTS:
        defaults["reference"] = "val"
    if options.latents:
        defaults |= {"latent_scale": LatentConfig().scale, "latent_dtype": "float16"}
    names = ("source", "resolution", "imbalance_ratio", "seed", "num_classes",
             "images_per_class", "reference", "latents", *_LATENT_OPTIONS)
    values = {name: getattr(options, name) for name in names}
    return {k: defaults.get(k) if v is None else v for k, v in values.items()}


def build_source(options: PrepareOptions) -> BuiltSource:
    """Read (or draw) the source and cut its splits; nothing is written yet."""
    c = content_options(options)
    source, seed, ratio = c["source"], c["seed"], c["imbalance_ratio"]
    if source == "shapes":
        return shapes.build_shapes(
            num_classes=c["num_classes"],
            images_per_class=c["images_per_class"],
            imbalance_ratio=ratio,
            resolution=c["resolution"],
            seed=seed,
        )
    if source in cifar.LAYOUTS:
        return cifar.build_cifar(
            source, options.root, imbalance_ratio=ratio, seed=seed, reference=c["reference"],
        )  # fmt: skip
    if source in imagefiles.LIST_LAYOUTS:
        return imagefiles.build_list_source(
            source, options.root, train_list=options.train_list,
            reference_list=options.reference_list, reference=c["reference"],
            num_classes=options.num_classes,
        )  # fmt: skip
    return imagefiles.build_imagefolder(
        options.root, reference_root=options.reference_root, imbalance_ratio=ratio,
        images_per_class=options.images_per_class, seed=seed,
    )  # fmt: skip


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse to touch anything at ``--out`` but an empty folder or, with --overwrite, a dataset."""
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.is_dir() and overwrite and (out / INFO_FILE).is_file():
        return
    if out.is_dir() and overwrite:
        raise RaydiffError(f"--out {out} is not a prepared dataset (no {INFO_FILE}); keeping it")
    if out.is_dir():
        raise RaydiffError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    if out.exists() or out.is_symlink():
        raise RaydiffError(f"--out {out} exists and is not a folder")


def _sibling(out: Path, kind: str) -> Path:
    """A hidden, unique sibling of ``out``: same filesystem, so renaming it is atomic."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _make_staging_dir(out: Path) -> Path:
    """The folder everything is written into (created with the user's umask, like ``out``)."""
    staging = _sibling(out, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as err:
        raise RaydiffError(f"cannot write --out {out}: {err.strerror or err}") from None
    return staging


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished folder to ``out``, replacing an empty folder or an old dataset."""
    if not out.exists():
        staging.rename(out)
        return
    old = _sibling(out, "old")
    out.rename(old)
    try:
        staging.rename(out)
    except OSError:
        old.rename(out)  # put the previous dataset back rather than leave nothing
        raise
    shutil.rmtree(old)


def _dataset_info(
    built: BuiltSource, options: PrepareOptions, resolution: int, files: dict[str, list[str]]
) -> DatasetInfo:
    """dataset.json's content: the source's own build notes plus options, version and time."""
    build = dict(built.build)
    build.update(
        row_order="shuffled with numpy.random.default_rng((seed, split index))",
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        raydiff_version=raydiff.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return DatasetInfo(
        source=built.source,
        class_names=tuple(built.class_names),
        train_counts=tuple(built.train.counts(built.num_classes)),
        reference_counts=tuple(built.reference.counts(built.num_classes)),
        resolution=resolution,
        imbalance_ratio=built.imbalance_ratio,
        seed=options.seed,
        files={split: tuple(f"{split}/{name}" for name in files[split]) for split in SPLITS},
        build=build,
        format_version=FORMAT_VERSION,
    )


def _write_dataset(
    built: BuiltSource, options: PrepareOptions, resolution: int, staging: Path
) -> DatasetInfo:
    """Both splits' shards (dataset.json is written last, by the caller, so its presence
    means the rest is there)."""
    for split, plan in (("train", built.train), ("reference", built.reference)):
        bad = plan.labels[(plan.labels < 0) | (plan.labels >= built.num_classes)]
        if len(bad):  # a source that reads labels from a list file can hold any number
            raise RaydiffError(f"{options.source}: {split} label {int(bad[0])} is outside the "
                               f"{built.num_classes} classes (0..{built.num_classes - 1})")
    files = {}
    with encode_pool(options.workers) as pool:
        for index, split in enumerate(SPLITS):
            plan = built.train if split == "train" else built.reference
            logger.info("encoding %s split: %d images", split, len(plan))
            files[split] = write_split(
                plan, staging / split, resolution=resolution, seed=(options.seed, index),
                pool=pool, rows_per_shard=options.rows_per_shard, in_flight=2 * options.workers,
            )  # fmt: skip
    return _dataset_info(built, options, resolution, files)


def reuse_problem(out: str, options: PrepareOptions, info: DatasetInfo) -> str | None:
    """Why the dataset at ``out`` (a folder or a URI; ``info`` its dataset.json) is not the
    complete dataset ``options`` ask for, or None when it is: same content options, every
    listed shard present."""
    recorded = dict(info.build.get("options", {}), resolution=info.resolution)
    recorded["source"] = recorded.get("source", info.source)
    had = content_options(PrepareOptions(**{k: v for k, v in recorded.items()
                                     if k in PrepareOptions.__dataclass_fields__ and k != "out"},
                                  out=Path(out)))
    for name, asked in content_options(options).items():
        if had[name] != asked:
            return f"it holds --{name.replace('_', '-')} {had[name]}, not {asked}"
    missing = parquet.missing_files(out, info)
    return f"its shard {missing[0]} is missing" if missing else None


def prepare_dataset(options: PrepareOptions, encode_latents: Callable | None = None
                    ) -> DatasetInfo:
    """Build the dataset described by ``options`` at ``options.out``, atomically.
    ``encode_latents`` adds the latent columns of ``--latents`` (the Ray layer's
    ``raydiff.distributed.latents.encode_train_split``: the data layer never imports it)."""
    _check_options(options)
    out = options.out.expanduser().absolute()
    _check_output(out, options.overwrite)
    content = content_options(options)
    resolution = content["resolution"]
    vae = None
    if options.latents:  # the VAE is found and checked before anything is read or written
        if encode_latents is None:
            raise RaydiffError("--latents encodes in Ray Data actors: run 'raydiff prepare', "
                               "or pass encode_latents=raydiff.distributed.latents."
                               "encode_train_split")
        from raydiff.vae import check_vae

        vae = check_vae(options.latents, content["latent_scale"], resolution)
    built = build_source(options)
    staging = _make_staging_dir(out)
    try:
        info = _write_dataset(built, options, resolution, staging)
        if vae is not None:
            latent = encode_latents(staging / "train", [Path(f).name for f in
                                                        info.files["train"]],
                                    vae, content["latent_dtype"], options.workers)
            info = dataclasses.replace(info, latent=latent)
        (staging / INFO_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n")
        _move_into_place(staging, out)
    except BrokenProcessPool:
        shutil.rmtree(staging, ignore_errors=True)
        raise RaydiffError(
            "a worker process died while encoding images (out of memory, or a script that "
            "calls prepare without an `if __name__ == '__main__':` guard); retry with --workers 1"
        ) from None
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        where = err.filename or out
        raise RaydiffError(f"cannot write {where}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def summary(info: DatasetInfo, out: Path, seconds: float) -> str:
    """A few lines for people: what was built, where, and how long it took."""
    lines = [f"prepared {info.source} at {out} in {seconds:.1f} s ({info.resolution} px)"]
    if info.latent is not None:
        la = info.latent
        lines.append(f"  latents   {la.channels}x{la.resolution}x{la.resolution} {la.dtype} of "
                     f"VAE {la.vae} (sha256 {la.sha256[:12]}...), scale {la.scale}, train split")
    for split in SPLITS:
        counts = info.counts(split)
        lines.append(
            f"  {split:<9} {sum(counts):>7} images, {info.num_classes} classes, "
            f"{max(counts)} .. {min(counts)} per class"
        )
    return "\n".join(lines)


def upload_dataset(local: Path, uri: str) -> None:
    """Copy a prepared dataset folder to object storage, each file whole, ``dataset.json``
    last: a reader that finds it finds every shard it lists."""
    folder = Folder(uri)
    folder.delete(INFO_FILE)  # an overwrite is incomplete until it ends
    files = sorted((p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()),
                   key=lambda name: (name == INFO_FILE, name))
    for relative in files:
        folder.put_file(local / relative, relative)


def run(args: argparse.Namespace, encode_latents: Callable | None = None) -> int:
    """The CLI entry point: prepare, then print a short summary. An ``--out`` URI is built
    in a local temporary folder and uploaded (``upload_dataset``)."""
    uri = str(args.out)
    options = options_from_args(args)
    start = time.perf_counter()
    if not is_uri(uri):
        info = prepare_dataset(options, encode_latents)
        print(summary(info, options.out, time.perf_counter() - start))
        return 0
    if Folder(uri).is_file(INFO_FILE) and not options.overwrite:
        raise RaydiffError(f"--out {uri} holds a prepared dataset (pass --overwrite to replace it)")
    with tempfile.TemporaryDirectory(prefix="raydiff-prepare-") as staging:
        local = Path(staging) / "dataset"
        info = prepare_dataset(dataclasses.replace(options, out=local, overwrite=False),
                               encode_latents)
        upload_dataset(local, uri)
    print(summary(info, uri, time.perf_counter() - start))
    return 0


def builtin_dataset(storage: str, resolution: int) -> str:
    """The built-in shapes dataset at ``resolution``, prepared once under ``storage``."""
    if is_uri(storage):
        raise RaydiffError("--data is required when --storage is a URI")
    out = Path(storage) / "datasets" / f"shapes-{resolution}px"
    if not (out / INFO_FILE).is_file():
        print(f"preparing the built-in shapes dataset at {out}")
        prepare_dataset(PrepareOptions(source="shapes", out=out, resolution=resolution))
    return str(out)
