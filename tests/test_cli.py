"""The command line: one name per concept, defaults in --help, a light parser, -v tracebacks."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from raydiff import cli

VERBS = ("config", "prepare", "train", "sample", "evaluate", "classify", "demo", "tune", "study")


def _verb_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_building_the_parser_imports_nothing_heavy():
    """`raydiff --help` imports neither torch nor Ray nor the data stack."""
    code = ("import sys; from raydiff import cli; cli.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'ray', 'numpy', 'pyarrow', 'PIL', 'torchvision', 'scipy'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_parser_offers_what_the_modules_accept():
    from raydiff.accumulate import METRIC_SUBSET
    from raydiff.classifier import ARCHS
    from raydiff.config import CLASSIFIER_ARCHS
    from raydiff.data.mixing import RULES
    from raydiff.data.parquet import DEFAULT_ROWS_PER_SHARD, LATENT_DTYPES
    from raydiff.data.prepare import SOURCES
    from raydiff.data.samples import FORMATS
    from raydiff.metrics import METRICS

    assert cli.SOURCES == SOURCES and cli.SAMPLE_FORMATS == FORMATS
    assert cli.EVAL_METRICS == METRICS and cli.MIX_RULES == RULES
    assert cli.DEFAULT_ROWS_PER_SHARD == DEFAULT_ROWS_PER_SHARD
    assert cli.LATENT_DTYPES == LATENT_DTYPES
    assert cli.METRIC_SUBSET == METRIC_SUBSET
    assert tuple(ARCHS) == CLASSIFIER_ARCHS


@pytest.mark.parametrize("verb", VERBS)
def test_help_shows_every_default_and_no_old_spelling(verb):
    parser = _verb_parsers()[verb]
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS):
            continue
        if action.default not in (None, False, [], argparse.SUPPRESS):
            help_text = parser._get_formatter()._get_help_string(action)
            assert "default" in help_text, (verb, action.option_strings)
        for old in getattr(action, "hidden_aliases", ()):
            assert f"{old} " not in text and f"{old}\n" not in text, (verb, old)


OLD_AND_NEW = [
    ("evaluate", ["--reference", "D"], ["--data", "D"], "data"),
    ("evaluate", ["--per-class"], ["--per-class-fid"], "per_class_fid"),
    ("evaluate", ["--batch-size", "8"], ["--actor-batch", "8"], "actor_batch"),
    ("classify", ["--train", "D"], ["--data", "D"], "data"),
    ("sample", ["--steps", "7"], ["--sample-steps", "7"], "sample_steps"),
    ("sample", ["--batch-size", "8"], ["--actor-batch", "8"], "actor_batch"),
    ("tune", ["--max-steps", "9"], ["--steps", "9"], "steps"),
    ("tune", ["--workers-per-trial", "2"], ["--workers", "2"], "workers"),
    ("tune", ["--metric", "loss"], ["--objective", "loss"], "objective"),
    ("study", ["--workers-per-trial", "2"], ["--workers", "2"], "workers"),
    ("prepare", ["--workers", "3"], ["--processes", "3"], "workers"),
    ("prepare", ["--reference", "test"], ["--reference-from", "test"], "reference"),
]
REQUIRED = {"evaluate": ["--samples", "S"], "sample": ["--checkpoint", "C", "--out", "O",
                                                       "--per-class", "2"],
            "tune": ["--data", "D"], "prepare": ["shapes", "--out", "O"]}


@pytest.mark.parametrize("verb, old, new, dest", OLD_AND_NEW)
def test_old_spellings_still_parse_to_the_same_option(verb, old, new, dest):
    parser = cli.build_parser()
    base = [verb, *REQUIRED.get(verb, [])]
    assert getattr(parser.parse_args(base + old), dest) == \
        getattr(parser.parse_args(base + new), dest) != getattr(parser.parse_args(base), dest)


def test_a_refused_value_names_the_current_spelling(cli_error):
    line = cli_error(["tune", "--data", "D", "--max-steps", "0"])
    assert "argument --steps: 0 is out of range" in line


def test_one_flag_per_concept_across_verbs():
    """The dataset is --data wherever a command reads one; Ray Train workers are --workers;
    training steps are --steps; a count of generated images per class is --per-class."""
    verbs = _verb_parsers()
    for verb in ("train", "evaluate", "classify", "tune", "study"):
        assert "--data" in verbs[verb]._option_string_actions, verb
    for verb in ("train", "classify", "tune", "study"):
        assert verbs[verb]._option_string_actions["--workers"].dest == "workers"
    for verb in ("train", "demo", "tune", "study"):
        assert "steps" in verbs[verb]._option_string_actions["--steps"].help
    for verb in ("sample", "demo", "study"):
        assert verbs[verb]._option_string_actions["--per-class"].type is not None


def test_preset_comes_from_the_data_with_a_printed_line(shapes16, shapes_dataset, capsys):
    assert cli.main(["train", "--data", str(shapes16), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("raydiff: --preset tiny-vpred (the preset for 16 px data")
    assert json.loads(out.split("\n", 1)[1])["preset"] == "tiny-vpred"
    assert cli.main(["train", "--data", str(shapes_dataset), "--preset", "tiny",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--preset" not in out and json.loads(out)["preset"] == "tiny"
    assert cli.main(["train", "--data", str(shapes_dataset), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["preset"] == "cifar32"


def test_data_without_a_preset_of_its_size_is_refused(tmp_path, cli_error):
    from raydiff.data.prepare import PrepareOptions, prepare_dataset

    odd = tmp_path / "shapes24"
    prepare_dataset(PrepareOptions(source="shapes", out=odd, resolution=24, num_classes=2,
                                   images_per_class=4, imbalance_ratio=2.0, workers=1))
    line = cli_error(["train", "--data", str(odd), "--dry-run"])
    assert "no preset is made for 24 px data" in line and "--preset" in line


VERBOSE_LEVELS = """
import logging, sys
from raydiff import cli
assert cli.main(sys.argv[1:] + ["config", "--preset", "tiny"]) == 0
print(logging.getLogger("raydiff.data").isEnabledFor(logging.DEBUG),
      logging.getLogger("PIL.PngImagePlugin").isEnabledFor(logging.DEBUG),
      logging.getLogger("PIL.PngImagePlugin").isEnabledFor(logging.INFO))
"""


@pytest.mark.parametrize("flags, levels", [([], "False False True"),
                                           (["-v"], "True False True")])
def test_verbose_is_raydiffs_debug_logging_not_every_librarys(flags, levels):
    # a process of its own: logging is configured once per process, and pytest's own
    # handlers on the root logger would make the CLI's configuration a no-op here
    done = subprocess.run([sys.executable, "-c", VERBOSE_LEVELS, *flags], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == levels


def test_verbose_shows_the_traceback_behind_the_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAYDIFF_VERBOSE", "0")  # -v sets it; restored after the test
    argv = ["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x"),
            "--per-class", "2"]
    assert cli.main(argv) == 2
    quiet = capsys.readouterr().err.strip().splitlines()
    assert len(quiet) == 1 and "Traceback" not in quiet[0]
    assert cli.main(["-v", *argv]) == 2
    loud = capsys.readouterr().err.strip().splitlines()
    assert loud[0].startswith("Traceback") and loud[-1] == quiet[0]
    assert any("read_config" in line for line in loud)
