"""``raydiff demo`` end to end on the session's Ray, shortened (10 training steps, 2 images per
class): first without the Inception weights (one line says so, and the metrics are measured in
the feature space of a classifier the demo trains), then again with them, reusing the finished
training run and sample folder."""

from __future__ import annotations

import json

import pytest

from raydiff import cli

pytestmark = pytest.mark.slow


def test_demo_without_then_with_inception_weights(ray_local, inception_weights, tmp_path,
                                                  monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # reference features
    args = ["demo", "--storage", str(tmp_path), "--steps", "10", "--per-class", "2",
            "--actors", "1", "--reference-per-class", "2"]
    assert cli.main(args + ["--no-download"]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines()
               if line.startswith("Inception FID/KID/IS/PR skipped")]
    assert len(skipped) == 1 and "--inception-weights PATH" in skipped[0]
    assert "in the feature space of a classifier of the reference split" in skipped[0]
    held_out_top1 = float(skipped[0].split("(top-1 ")[1].split()[0])
    assert held_out_top1 > 0.5, skipped[0]  # 10 classes: chance is 0.1
    assert "class balance: 2 .. 2 images per class" in out
    assert "nearest training image" in out and "training: 10 steps" in out
    run = tmp_path / "demo"
    report = (run / "report.md").read_text()
    assert skipped[0] in report and "![samples](samples_grid.png)" in report
    assert (run / "samples_grid.png").is_file() and (run / "samples" / "manifest.json").is_file()
    offline = json.loads((run / "eval" / "metrics.json").read_text())
    assert offline["feature_extractor"]["name"] == "classifier:resnet10"
    # the thirds, and the shot groups the shapes have (500 .. 50 images: no few-shot class)
    assert set(offline["sets"]) == {"overall", "head", "body", "tail", "many", "medium"}
    assert all(0 <= s["classifier_top1"] <= 1 and s["fid"] >= 0 for s in offline["sets"].values())
    assert all(0 <= s["copy_rate"] <= 1 and s["diversity"] > 0 for s in offline["sets"].values())
    assert "| overall | 20 |" in report and "Classifier top-1" in report

    # Inception on the CPU: the copy metrics' 2040 training images would take minutes here
    assert cli.main(args + ["--inception-weights", str(inception_weights),
                            "--no-copy-metrics"]) == 0
    out = capsys.readouterr().out
    assert "training: reused the finished run (10 steps)" in out
    assert "(already complete)" in out and "skipped" not in out
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["sets"]) == {"overall", "head", "body", "tail", "many", "medium"}
    assert "copy_rate" not in metrics["sets"]["overall"]
    assert metrics["sets"]["overall"]["num_generated"] == 20
    assert metrics["sets"]["overall"]["num_reference"] == 20
    assert "| overall | 20 |" in (run / "report.md").read_text()
