"""UCL with negatives gathered across data-parallel workers (two gloo processes).

The workers are spawned, never forked, and report through files: the test process may be a Ray
driver (the suite shares one), and a fork of it (a forked ``multiprocessing.Manager`` server,
say) inherits its gRPC sockets and keeps them open after the driver closes them.
"""

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raydiff.losses import ucl_loss

ROWS = (3, 5)  # workers may hold different numbers of active rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, z_all: torch.Tensor, w_all: torch.Tensor,
            out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        start = sum(ROWS[:rank])
        z = z_all[start:start + ROWS[rank]].clone().requires_grad_(True)
        w = w_all[start:start + ROWS[rank]]
        loss = ucl_loss(z, w, 0.2, global_negatives=True)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": z.grad.clone()}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_negatives_equal_one_big_batch(tmp_path):
    z_all, w_all = torch.randn(sum(ROWS), 6), torch.rand(sum(ROWS))
    mp.start_processes(_worker, args=(2, _free_port(), z_all, w_all, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    out = {r: torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)}

    # Reference: every row is an anchor against all 8 rows in one process.
    z_ref = z_all.clone().requires_grad_(True)
    per_row = torch.stack([
        ucl_loss(z_ref, torch.nn.functional.one_hot(torch.tensor(i), 8).float() * 8, 0.2)
        for i in range(8)]) * w_all
    # Worker r reports mean over its own rows; the gradient of the sum of worker losses reaches
    # each row through the all-gather.
    rank_losses = [per_row[:3].mean(), per_row[3:].mean()]
    (rank_losses[0] + rank_losses[1]).backward()
    for rank, (lo, hi) in enumerate([(0, 3), (3, 8)]):
        loss, grad = out[rank]["loss"], out[rank]["grad"]
        assert torch.allclose(loss, rank_losses[rank].detach(), rtol=1e-5)
        assert torch.allclose(grad, z_ref.grad[lo:hi], atol=1e-6)


def test_without_process_group_global_negatives_fall_back_to_local_batch():
    z, w = torch.randn(4, 3), torch.ones(4)
    assert torch.equal(ucl_loss(z, w, global_negatives=True), ucl_loss(z, w))
