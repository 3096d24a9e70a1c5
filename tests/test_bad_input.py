"""Bad input, as a careless or hostile user gives it: one table, one row per case.

Every row runs ``raydiff`` in this process and must end with exit code 2, exactly one line on
stderr that starts with the verb's error prefix and holds the row's fragment (the flag, key,
file or value at fault), nothing new in the working folder, and Ray never started (``ray.init``
is replaced by a function that fails the test): every check here must run before Ray does.
Pickle rows also check that the payload, which would create a marker file, never ran.

The table only grows: a new way to get a traceback, a wrong result with exit 0, or a leftover
that blocks the corrected rerun becomes a row.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from raydiff.cli import main

MARKER = "payload-ran"


class _Payload:
    """Unpickling this creates the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- the broken inputs, each made on demand in a fresh folder ---------------------------------

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _first_shard(dataset: Path, split: str = "train") -> Path:
    return sorted((dataset / split).glob("*.parquet"))[0]


def label_out_of_range(ctx) -> Path:
    data = _copy(ctx.data, ctx.tmp / "bad-labels")
    shard = _first_shard(data)
    table = pq.read_table(shard)
    labels = table.column("label").to_numpy().copy()
    labels[0] = 4  # == the class count: would train as the null label
    field = table.schema.field("label")
    pq.write_table(table.set_column(table.schema.get_field_index("label"), field,
                                    pa.array(labels, pa.int64())), shard)
    return data


def shard_deleted(ctx, split: str = "train") -> Path:
    data = _copy(ctx.data, ctx.tmp / f"deleted-{split}")
    _first_shard(data, split).unlink()
    return data


def shard_truncated(ctx, split: str = "train") -> Path:
    data = _copy(ctx.data, ctx.tmp / f"truncated-{split}")
    shard = _first_shard(data, split)
    shard.write_bytes(shard.read_bytes()[:200])
    return data


def ckpt_with(ctx, name: str, content: bytes | None = None, truncate: bool = False) -> Path:
    ckpt = _copy(ctx.ckpt, ctx.tmp / f"ckpt-{name}")
    if truncate:
        (ckpt / name).write_bytes((ckpt / name).read_bytes()[:100])
    else:
        (ckpt / name).write_bytes(content)
    return ckpt


def ckpt_wider_config(ctx) -> Path:
    ckpt = _copy(ctx.ckpt, ctx.tmp / "ckpt-wider")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"]["ch"] = 64
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def samples_damaged(ctx, how: str) -> Path:
    out = _copy(ctx.samples, ctx.tmp / f"samples-{how}")
    shard = sorted((out / "shards").glob("shard-*.parquet"))[0]
    if how == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:150])
    return out


def config_file(ctx, text: str | bytes, name: str = "config.json") -> Path:
    path = ctx.tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def tiny_config_with(ctx, section: str, key: str, raw: str) -> Path:
    from raydiff import config as config_lib

    text = config_lib.preset("tiny").to_json()
    data = json.loads(text)
    data[section][key] = "@@"
    return config_file(ctx, json.dumps(data).replace('"@@"', raw), f"cfg-{key}.json")


def evil_pickle(folder: Path) -> Path:
    """A weights file whose unpickling would create ``folder / MARKER``."""
    path = folder / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": _Payload(folder / MARKER)}, f)
    return path


def truncated_weights(ctx) -> Path:
    path = ctx.tmp / "inception-truncated.pth"
    path.write_bytes(ctx.inception.read_bytes()[:1000])
    return path


# --- the table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    argv: object  # ctx -> list[str]
    fragment: object  # str, or ctx -> str


def _train(ctx, *extra):
    return ["train", "--data", str(ctx.data), "--storage", str(ctx.out), "--preset", "tiny",
            *extra]


def _sample(ctx, *extra, checkpoint=None):
    return ["sample", "--checkpoint", str(checkpoint or ctx.ckpt), "--out", str(ctx.out),
            "--per-class", "2", *extra]


def _evaluate(ctx, *extra, samples=None, reference=None):
    return ["evaluate", "--samples", str(samples or ctx.samples), "--data",
            str(reference or ctx.data), "--out", str(ctx.out), "--no-download", *extra]


def _tune(ctx, *extra):
    return ["tune", "--data", str(ctx.data), "--storage", str(ctx.out), "--preset", "tiny",
            "--set", "optim.batch_size=8", "--steps", "4", *extra]


def _prepare(ctx, *extra):
    return ["prepare", *extra, "--out", str(ctx.out)]


def _classify(ctx, *extra, data=None):
    return ["classify", "--data", str(data or ctx.data), "--out", str(ctx.out), *extra]


CASES = [
    # numbers on the command line: NaN, infinity, 0 where 0 means nothing, out of range
    Case("train --workers 0", lambda c: _train(c, "--workers", "0"), "--workers: 0"),
    Case("train --cpus-per-worker nan", lambda c: _train(c, "--cpus-per-worker", "nan"),
         "--cpus-per-worker: 'nan' is not a finite number"),
    Case("train --cpus-per-worker 0", lambda c: _train(c, "--cpus-per-worker", "0"),
         "expected > 0"),
    Case("train --gpus-per-worker -1", lambda c: _train(c, "--gpus-per-worker", "-1"),
         "--gpus-per-worker: -1"),
    Case("train --max-failures -1", lambda c: _train(c, "--max-failures", "-1"),
         "--max-failures"),
    Case("train --workers x", lambda c: _train(c, "--workers", "x"), "'x' is not an integer"),
    Case("sample --per-class 0", lambda c: _sample(c, "--per-class", "0"), "--per-class: 0"),
    Case("sample --guidance nan", lambda c: _sample(c, "--guidance", "nan"),
         "--guidance: 'nan' is not a finite number"),
    Case("sample --guidance inf", lambda c: _sample(c, "--guidance", "inf"), "--guidance"),
    Case("sample --guidance -1", lambda c: _sample(c, "--guidance", "-1"), "--guidance: -1"),
    Case("sample --sample-steps 0", lambda c: _sample(c, "--sample-steps", "0"), "--sample-steps: 0"),
    Case("sample --seed -1", lambda c: _sample(c, "--seed", "-1"), "--seed: -1"),
    Case("sample --actors 0", lambda c: _sample(c, "--actors", "0"), "--actors: 0"),
    Case("sample --forward-batch 0", lambda c: _sample(c, "--forward-batch", "0"),
         "--forward-batch: 0"),
    Case("sample --shard-size not a multiple", lambda c: _sample(c, "--shard-size", "10",
                                                              "--forward-batch", "4"),
         "--shard-size 10 must be a multiple of --forward-batch 4"),
    Case("sample --classes out of range", lambda c: _sample(c, "--classes", "7"), "--classes 7"),
    Case("sample --sample-steps above T", lambda c: _sample(c, "--sample-steps", "5000"),
         "sample.steps=5000"),
    Case("prepare shapes --images-per-class 0",
         lambda c: _prepare(c, "shapes", "--images-per-class", "0"), "--images-per-class: 0"),
    Case("prepare shapes --num-classes 0", lambda c: _prepare(c, "shapes", "--num-classes", "0"),
         "--num-classes: 0"),
    Case("prepare shapes --imbalance-ratio 0.5",
         lambda c: _prepare(c, "shapes", "--imbalance-ratio", "0.5"), "--imbalance-ratio: 0.5"),
    Case("prepare shapes --imbalance-ratio nan",
         lambda c: _prepare(c, "shapes", "--imbalance-ratio", "nan"), "--imbalance-ratio"),
    Case("prepare shapes --resolution 0", lambda c: _prepare(c, "shapes", "--resolution", "0"),
         "--resolution: 0"),
    Case("prepare shapes --rows-per-shard 0",
         lambda c: _prepare(c, "shapes", "--rows-per-shard", "0"), "--rows-per-shard: 0"),
    Case("prepare imagefolder --images-per-class 0",
         lambda c: _prepare(c, "imagefolder", "--root", str(c.tmp), "--images-per-class", "0"),
         "--images-per-class: 0"),
    Case("prepare imagenet-lt --num-classes 0",
         lambda c: _prepare(c, "imagenet-lt", "--root", str(c.tmp), "--num-classes", "0"),
         "--num-classes: 0"),
    Case("prepare cifar10 without --root", lambda c: _prepare(c, "cifar10"), "needs --root"),
    Case("prepare cifar10 --images-per-class", lambda c: _prepare(
        c, "cifar10", "--root", str(c.tmp), "--images-per-class", "5"),
        "--images-per-class does not apply to source cifar10"),
    Case("prepare cifar10 missing root", lambda c: _prepare(
        c, "cifar10", "--root", str(c.tmp / "nowhere")), "nowhere"),
    Case("tune --eval-every 0", lambda c: _tune(c, "--eval-every", "0"), "--eval-every: 0"),
    Case("tune --eval-per-class 1", lambda c: _tune(c, "--eval-per-class", "1"),
         "--eval-per-class must be at least 2"),
    Case("tune --trials 0", lambda c: _tune(c, "--trials", "0"), "--trials: 0"),
    Case("tune --steps 0", lambda c: _tune(c, "--steps", "0"), "--steps: 0"),
    Case("tune --eval-every above --max-steps", lambda c: _tune(c, "--eval-every", "8"),
         "eval_every (8)"),
    Case("tune unknown --objective", lambda c: _tune(c, "--objective", "bogus"),
         "metric 'bogus' is never reported"),
    Case("tune --objective in the wrong space", lambda c: _tune(c, "--objective", "pixels:fid"),
         "fid is measured in the inception space"),
    Case("tune --max-concurrent-trials 0", lambda c: _tune(c, "--max-concurrent-trials", "0"),
         "--max-concurrent-trials: 0"),
    Case("train --placement-timeout -1", lambda c: _train(c, "--placement-timeout", "-1"),
         "--placement-timeout: -1 is out of range"),
    Case("train --autoscaler-config missing", lambda c: _train(
        c, "--autoscaler-config", str(c.tmp / "cluster.yaml")), "cluster.yaml: No such file"),
    Case("train --autoscaler-config without node types", lambda c: _train(
        c, "--autoscaler-config", str(write(c.tmp / "c.yaml", "cluster_name: x\n"))),
        "c.yaml has no available_node_types"),
    Case("evaluate --reference-per-class 0", lambda c: _evaluate(c, "--reference-per-class", "0"),
         "--reference-per-class: 0"),
    Case("evaluate --reference-per-class 1", lambda c: _evaluate(c, "--reference-per-class", "1"),
         "--reference-per-class must be at least 2"),
    Case("evaluate --actors 0", lambda c: _evaluate(c, "--actors", "0"), "--actors: 0"),
    Case("evaluate --metric-subset 0", lambda c: _evaluate(c, "--metric-subset", "0"),
         "--metric-subset: 0 is out of range"),
    Case("evaluate --metric-subset -5", lambda c: _evaluate(c, "--metric-subset", "-5"),
         "--metric-subset: -5 is out of range"),
    Case("evaluate --metric-subset 3", lambda c: _evaluate(c, "--metric-subset", "3"),
         "--metric-subset must be at least 4"),
    Case("classify --epochs 0", lambda c: _classify(c, "--epochs", "0"), "--epochs: 0"),
    Case("classify --lr -1", lambda c: _classify(c, "--lr", "-1"), "--lr: -1"),
    Case("classify --lr nan", lambda c: _classify(c, "--lr", "nan"), "--lr: 'nan'"),
    Case("classify --weight-decay -1", lambda c: _classify(c, "--weight-decay", "-1"),
         "--weight-decay: -1"),
    Case("demo --per-class 1", lambda c: ["demo", "--storage", str(c.out), "--per-class", "1"],
         "--per-class must be at least 2"),
    # config values: --set and --config
    Case("train --set sample.guidance=nan", lambda c: _train(c, "--set", "sample.guidance=nan"),
         "sample.guidance='nan'"),
    Case("train --set optim.lr=inf", lambda c: _train(c, "--set", "optim.lr=inf"),
         "optim.lr='inf'"),
    Case("train --set optim.lr=0", lambda c: _train(c, "--set", "optim.lr=0"), "optim.lr=0.0"),
    Case("train --set sample.eta=2", lambda c: _train(c, "--set", "sample.eta=2"),
         "sample.eta=2.0"),
    Case("train --set optim.grad_clip=-1", lambda c: _train(c, "--set", "optim.grad_clip=-1"),
         "optim.grad_clip=-1.0"),
    Case("train --set loss.t_align=1000", lambda c: _train(c, "--set", "loss.t_align=1000"),
         "loss.t_align=1000"),
    Case("train --set unknown key", lambda c: _train(c, "--set", "optim.bogus=1"),
         "unknown config key 'optim.bogus'"),
    Case("train --set without =", lambda c: _train(c, "--set", "optim.lr"), "'optim.lr'"),
    Case("train --set optim.batch_size=1.5", lambda c: _train(c, "--set", "optim.batch_size=1.5"),
         "optim.batch_size='1.5'"),
    Case("train --set loss.method=bogus", lambda c: _train(c, "--set", "loss.method=bogus"),
         "loss.method='bogus'"),
    Case("train --config a folder", lambda c: _train(c, "--config", str(c.tmp)), "is a folder"),
    Case("train --config a binary file",
         lambda c: _train(c, "--config", str(config_file(c, b"\x89PNG\x00\xff\xfe", "b.json"))),
         "is not text"),
    Case("train --config missing", lambda c: _train(c, "--config", str(c.tmp / "none.json")),
         "none.json does not exist"),
    Case("train --config not JSON", lambda c: _train(c, "--config", str(config_file(c, "{x"))),
         "config.json line 1"),
    Case("train --config a string for a float",
         lambda c: _train(c, "--config", str(tiny_config_with(c, "optim", "lr", '"0.001"'))),
         "optim.lr='0.001' is invalid: expected a number, not a string"),
    Case("train --config NaN", lambda c: _train(
        c, "--config", str(tiny_config_with(c, "sample", "guidance", "NaN"))),
        "NaN is not a finite number"),
    Case("train --config a string for a switch", lambda c: _train(
        c, "--config", str(tiny_config_with(c, "train", "hflip", '"false"'))),
        "train.hflip='false'"),
    Case("train --config a list", lambda c: _train(c, "--config", str(config_file(c, "[1, 2]"))),
         "config must be a JSON object"),
    # datasets
    Case("train --data missing", lambda c: ["train", "--data", str(c.tmp / "nodata"),
                                            "--storage", str(c.out)],
         "dataset.json does not exist"),
    Case("train label outside the classes",
         lambda c: ["train", "--data", str(label_out_of_range(c)), "--storage", str(c.out)],
         "holds label 4, outside the 4 classes"),
    Case("train shard deleted",
         lambda c: ["train", "--data", str(shard_deleted(c)), "--storage", str(c.out)],
         "is missing (train shard listed in dataset.json)"),
    Case("train shard truncated",
         lambda c: ["train", "--data", str(shard_truncated(c)), "--storage", str(c.out)],
         "is not a readable Parquet file"),
    Case("train batch larger than the data",
         lambda c: _train(c, "--set", "optim.batch_size=4096"), "fewer than one batch"),
    Case("train batch not split over workers",
         lambda c: _train(c, "--set", "optim.batch_size=9", "--workers", "2"),
         "does not split evenly over 2 workers"),
    Case("classify label outside the classes",
         lambda c: _classify(c, data=label_out_of_range(c)), "holds label 4"),
    Case("classify shard truncated", lambda c: _classify(c, data=shard_truncated(c)),
         "is not a readable Parquet file"),
    Case("tune shard deleted", lambda c: ["tune", "--data", str(shard_deleted(c, "reference")),
                                          "--storage", str(c.out), "--steps", "4"],
         "is missing (reference shard"),
    Case("evaluate reference shard truncated",
         lambda c: _evaluate(c, reference=shard_truncated(c, "reference")),
         "is not a readable Parquet file"),
    Case("evaluate reference missing", lambda c: _evaluate(c, reference=c.tmp / "nodata"),
         "dataset.json does not exist"),
    # checkpoints
    Case("sample corrupt state.json", lambda c: _sample(
        c, checkpoint=ckpt_with(c, "state.json", b"{not json")), "state.json is damaged"),
    Case("sample state.json without a step", lambda c: _sample(
        c, checkpoint=ckpt_with(c, "state.json", b'{"steps": 3}')), "state.json is damaged"),
    Case("sample truncated ema.safetensors", lambda c: _sample(
        c, checkpoint=ckpt_with(c, "ema.safetensors", truncate=True)), "unreadable weights"),
    Case("sample config.json of another network",
         lambda c: _sample(c, checkpoint=ckpt_wider_config(c)), "does not fit its own config.json"),
    Case("sample checkpoint missing", lambda c: _sample(c, checkpoint=c.tmp / "nockpt"),
         "nockpt"),
    Case("sample checkpoint is a dataset", lambda c: _sample(c, checkpoint=c.data),
         "is not a raydiff checkpoint"),
    # sample folders
    Case("evaluate samples shard truncated",
         lambda c: _evaluate(c, samples=samples_damaged(c, "truncated")), "is damaged"),
    Case("evaluate samples shard deleted",
         lambda c: _evaluate(c, samples=samples_damaged(c, "deleted")), "shards missing"),
    Case("evaluate samples missing", lambda c: _evaluate(c, samples=c.tmp / "nosamples"),
         "nosamples"),
    Case("evaluate samples of another resolution",
         lambda c: _evaluate(c, reference=c.other_data), "but the samples are 16x16"),
    # weights files
    Case("evaluate --inception-weights pickle payload",
         lambda c: _evaluate(c, "--features", "inception", "--inception-weights",
                             str(evil_pickle(c.tmp))), "is not a plain Inception state dict"),
    Case("tune --inception-weights pickle payload",
         lambda c: _tune(c, "--inception-weights", str(evil_pickle(c.tmp))),
         "is not a plain Inception state dict"),
    Case("evaluate --inception-weights truncated",
         lambda c: _evaluate(c, "--features", "inception", "--inception-weights",
                             str(truncated_weights(c))), "is not a plain Inception state dict"),
    Case("evaluate --inception-weights missing",
         lambda c: _evaluate(c, "--features", "inception", "--inception-weights",
                             str(c.tmp / "none.pth")), "none.pth does not exist"),
    Case("evaluate --features classifier:missing",
         lambda c: _evaluate(c, "--features", f"classifier:{c.tmp / 'noclf'}"), "noclf"),
    Case("evaluate --features bogus", lambda c: _evaluate(c, "--features", "bogus"),
         "--features 'bogus'"),
    # verbs and flags
    Case("unknown verb", lambda c: ["bogus"], "invalid choice: 'bogus'"),
    Case("unknown flag", lambda c: _train(c, "--bogus"), "unrecognized arguments: --bogus"),
    Case("sample without --checkpoint", lambda c: ["sample", "--out", str(c.out), "--per-class",
                                                   "2"], "--checkpoint"),
]


# --- fixtures and the runner ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_samples(tiny_checkpoint, tmp_path_factory) -> Path:
    """A complete sample folder of ``tiny_checkpoint`` (2 images a class), written by raydiff's
    own sampling code in this process: the actor class that writes the shards, without Ray."""
    from raydiff.distributed.sample import (
        SampleJob,
        ShardActor,
        _finish,
        claim_output,
        prepare_run,
        shard_spec,
    )

    out = tmp_path_factory.mktemp("samples") / "tiny"
    run = prepare_run(SampleJob(checkpoint=str(tiny_checkpoint), out=str(out), per_class=2,
                                forward_batch=4, shard_size=4))
    manifest = claim_output(run)
    actor = ShardActor([shard_spec(run)])
    actor({"run": np.zeros(run.plan.num_shards), "shard": np.arange(run.plan.num_shards)})
    _finish(run, manifest)
    return out


@dataclass
class Ctx:
    tmp: Path
    out: Path
    data: Path
    other_data: Path
    ckpt: Path
    samples: Path
    inception: Path


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_left(case, tmp_path, monkeypatch, capsys,
                                                   shapes16_tiny, shapes_dataset, tiny_checkpoint,
                                                   tiny_samples, inception_weights):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started: this check must run before Ray does")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setenv("RAY_ADDRESS", "")
    ctx = Ctx(tmp=tmp_path, out=tmp_path / "out", data=shapes16_tiny, other_data=shapes_dataset,
              ckpt=tiny_checkpoint, samples=tiny_samples, inception=inception_weights)
    argv = case.argv(ctx)  # broken inputs are made here, before the snapshot
    before = _tree(tmp_path)
    samples_before = _tree(tiny_samples)
    code = main(argv)  # argparse's refusals too: a return code, not SystemExit
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("raydiff: error: "), lines[0]
    assert case.fragment in lines[0], lines[0]
    assert _tree(tmp_path) == before, "the failed command left files behind"
    assert not ctx.out.exists()
    assert _tree(tiny_samples) == samples_before
    assert not (tmp_path / MARKER).exists(), "a pickle payload ran"


def test_the_table_only_grows():
    # the count in the closing note of the hardening work; lower it only by merging rows
    assert len(CASES) >= 90
    assert len({c.name for c in CASES}) == len(CASES)


# --- the same contracts where a table row cannot express them ----------------------------------

def _jobs_prepare():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "jobs_prepare", Path(__file__).parents[1] / "jobs" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_jobs_prepare_keeps_only_the_dataset_it_was_asked_for(tmp_path, capsys):
    prepare = _jobs_prepare()
    out = tmp_path / "shapes"
    args = ["shapes", "--out", str(out), "--resolution", "16", "--images-per-class", "20",
            "--num-classes", "2"]
    assert prepare(args) == 0
    capsys.readouterr()
    assert prepare(args) == 0 and "keeping it" in capsys.readouterr().out
    assert prepare(args + ["--imbalance-ratio", "10"]) == 0  # the shapes' default, spelled out
    capsys.readouterr()
    for extra, fragment in [(["--seed", "1"], "--seed 0, not 1"),
                            (["--resolution", "32"], "--resolution 16, not 32")]:
        assert prepare(args + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0] and "--overwrite" in err[0], err
    next((out / "reference").glob("*.parquet")).unlink()
    assert prepare(args) == 2
    assert "is missing" in capsys.readouterr().err
    assert prepare(args + ["--overwrite"]) == 0  # the corrected rerun
    assert not parquet_missing(out)


def parquet_missing(out: Path) -> list[str]:
    from raydiff.data import parquet

    return parquet.missing_files(out)


def test_a_sample_folder_without_shards_is_reclaimed_by_the_corrected_run(tiny_checkpoint,
                                                                          tmp_path):
    from raydiff.distributed.sample import SampleJob, claim_output, prepare_run
    from raydiff.errors import RaydiffError

    out = tmp_path / "samples"
    first = prepare_run(SampleJob(checkpoint=str(tiny_checkpoint), out=str(out), per_class=3))
    claim_output(first)  # ... and the run died before its first shard
    second = prepare_run(SampleJob(checkpoint=str(tiny_checkpoint), out=str(out), per_class=2))
    assert claim_output(second)["identity"]["per_class"] == 2
    (out / "shards" / "shard-00000.parquet").write_bytes(b"a finished shard of this run")
    third = prepare_run(SampleJob(checkpoint=str(tiny_checkpoint), out=str(out), per_class=5))
    with pytest.raises(RaydiffError, match="holds a different sampling run"):
        claim_output(third)  # a folder with shards of another run is never taken over


def test_weights_replaced_after_the_check_are_refused(tiny_checkpoint, inception_weights,
                                                      tmp_path):
    from raydiff.engine import load_for_sampling, open_for_sampling
    from raydiff.errors import RaydiffError
    from raydiff.features import inception_extractor

    weights = tmp_path / "inception.pth"
    shutil.copy(inception_weights, weights)
    extractor = inception_extractor(weights, download=False)  # checked and hashed
    extractor.load()  # the same bytes: fine
    evil = evil_pickle(tmp_path)
    shutil.copy(evil, weights)  # replaced on shared storage between check and use
    with pytest.raises(RaydiffError, match="changed after it was checked"):
        extractor.load()
    assert not (tmp_path / MARKER).exists()

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    _, _, digest = open_for_sampling(ckpt)
    (ckpt / "ema.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    with pytest.raises(RaydiffError, match="changed after it was checked"):
        load_for_sampling(ckpt, sha256=digest)


def test_a_damaged_reference_cache_entry_is_a_miss(tmp_path):
    from raydiff.distributed.evaluate import _read_cache

    entry = tmp_path / "entry"
    entry.mkdir()
    np.save(entry / "features.npy", np.ones((3, 8), np.float32))
    np.save(entry / "labels.npy", np.zeros(3, np.int64))
    (entry / "meta.json").write_text(json.dumps({"num_images": 3}))
    assert _read_cache(entry, 8).features.shape == (3, 8)
    (entry / "features.npy").write_bytes((entry / "features.npy").read_bytes()[:60])
    assert _read_cache(entry, 8) is None and not entry.exists()  # removed, to be rebuilt
    assert _read_cache(entry, 8) is None  # no entry: a plain miss


def test_a_resumed_sample_run_samples_a_damaged_shard_again(tiny_samples, tmp_path):
    from raydiff.data.samples import finished_shards, load_manifest
    from raydiff.distributed.sample import SampleJob, prepare_run

    out = _copy(tiny_samples, tmp_path / "samples")
    manifest = load_manifest(out)
    run = prepare_run(SampleJob(checkpoint=manifest["checkpoint"]["path"], out=str(out),
                                per_class=2, forward_batch=4, shard_size=4))
    assert finished_shards(out, run.plan) == {0, 1}
    shard = out / "shards" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:150])  # a truncated write on flaky storage
    assert finished_shards(out, run.plan) == {0}  # not counted as done ...
    assert not shard.exists()  # ... and gone, so the resumed run writes it again
