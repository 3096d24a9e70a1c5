"""Rank 0's side work (evaluation and preview of the EMA weights at a report) runs beside
training, not in the report barrier: checked in one process, without Ray."""

from __future__ import annotations

import threading

import pytest
import torch

from raydiff import config as config_lib
from raydiff.distributed.train import SideWork
from raydiff.engine import Engine
from raydiff.runlog import RunLog


class BlockingEval:
    """A stand-in for QuickEval that waits until released and measures the weights it got."""

    def __init__(self):
        self.release, self.started = threading.Event(), threading.Event()

    def __call__(self, model, cfg) -> dict[str, float]:
        self.started.set()
        assert self.release.wait(timeout=60)
        return {"fingerprint": float(sum(p.double().sum() for p in model.parameters()))}


def _fingerprint(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def test_training_goes_on_while_rank_0_evaluates_the_weights_of_its_report(tmp_path):
    cfg = config_lib.resolve("tiny", overrides=["train.preview_per_class=1",
                                                "optim.warmup_steps=0"])
    engine = Engine(cfg)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, torch.arange(8) % 4
    engine.train_step(x, y)
    evaluate = BlockingEval()
    runlog = RunLog(tmp_path / "logs", cfg, 0)
    side = SideWork(engine, [40, 20, 10, 5], runlog, evaluate)
    at_report = _fingerprint(engine.ema.model)
    side.submit(engine.step, preview=True)
    assert evaluate.started.wait(timeout=60)
    # the evaluation is still running: training does not wait for it
    for _ in range(3):
        engine.train_step(x, y)
    assert engine.step == 4 and not side.pending.done()
    assert _fingerprint(engine.ema.model) != at_report
    evaluate.release.set()
    result = side.take()
    # the evaluation measured the weights of the report's step, not the ones trained since
    assert result["eval_step"] == 1
    assert result["eval/fingerprint"] == pytest.approx(at_report, rel=1e-12)
    assert side.take() == {}  # taken once
    side.close()
    runlog.close()
    assert (tmp_path / "logs" / "samples_000000001.png").is_file()
    assert not list((tmp_path / "logs").glob(".*"))  # no half-written grid left behind


def test_preview_only_side_work_reports_nothing():
    cfg = config_lib.resolve("tiny", overrides=["train.preview_per_class=0"])
    engine = Engine(cfg)
    side = SideWork(engine, [4, 3, 2, 1], runlog=None, quickeval=None)
    side.submit(0, preview=False)  # neither an evaluation nor a preview: nothing starts
    assert side.pending is None and side.take() == {}
    side.close()
