"""UCL does not depend on how many data-parallel workers share the global batch.

One global batch of 16 rows goes through a small linear layer and UCL on 1 process, and on 2
and 4 gloo processes that each hold a consecutive slice of it. Each worker backpropagates its
own loss divided by the world size and sums the parameter gradients over workers, which is
what DDP's gradient averaging does. The mean of the worker losses, the parameter gradients and
the gradient of every feature row must equal the one-process values, for UCL groups that fall
within a worker, groups that span workers, and the whole batch as one group.

The workers are spawned, never forked, and report through files: the test process may be a Ray
driver (the suite shares one), and a fork of it inherits its gRPC sockets.
"""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raydiff.losses import ucl_loss

ROWS, DIM, FEATURES, TAU = 16, 6, 5, 0.2
# 4: groups within every worker; 8: within a worker on 2 workers, across workers on 4;
# 32 (more than the batch) and None: the whole global batch is one group.
GROUPS = [4, 8, 32, None]


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, DIM, generator=g)
    w = torch.rand(ROWS, generator=g)
    w[[1, 6, 11]] = 0.0  # rows with w(t) = 0: neither anchors nor negatives
    return x, w


def _layer() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(DIM, FEATURES)


def _one_run(x, w, group, rows: slice, share: float = 1.0):
    """Loss, parameter gradients and feature gradients of this worker's rows; the worker's
    loss is backpropagated times its share of the global batch (1 / world for equal shares,
    DDP's averaging)."""
    layer = _layer()
    z = layer(x[rows])
    z.retain_grad()
    loss = ucl_loss(z, w[rows], TAU, group)
    (loss * share).backward()
    grads = torch.cat([p.grad.flatten() for p in layer.parameters()])
    return loss.detach(), grads, z.grad.detach()


def _worker(rank: int, world: int, port: int, out: str, counts: tuple[int, ...] | None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, w = _inputs()
        results = {}
        cases = [(group, (ROWS // world,) * world) for group in GROUPS]
        if counts:  # the whole-batch group also works with unequal row counts
            cases.append((None, counts))
        for i, (group, sizes) in enumerate(cases):
            start = sum(sizes[:rank])
            loss, grads, zgrad = _one_run(x, w, group, slice(start, start + sizes[rank]),
                                          sizes[rank] / ROWS)
            dist.all_reduce(grads)  # DDP: the sum of each worker's (gradient / world)
            results[f"{i}.loss"], results[f"{i}.grads"], results[f"{i}.zgrad"] = loss, grads, zgrad
        torch.save(results, Path(out) / f"{rank}.pt")
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world,counts", [(2, (5, 11)), (4, None)])
def test_ucl_value_and_gradients_do_not_depend_on_the_worker_count(tmp_path, world, counts):
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path), counts), nprocs=world,
                       join=True, start_method="spawn")
    out = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    x, w = _inputs()
    cases = list(GROUPS) + ([None] if counts else [])
    for i, group in enumerate(cases):
        loss1, grads1, zgrad1 = _one_run(x, w, group, slice(None))
        sizes = (ROWS // world,) * world if i < len(GROUPS) else counts
        # Worker losses are means over their own rows: weighted by row count they give the
        # one-process mean over the global batch.
        mean = sum(o[f"{i}.loss"] * n for o, n in zip(out, sizes)) / ROWS
        assert torch.allclose(mean, loss1, rtol=1e-5), (group, mean, loss1)
        for o in out:
            assert torch.allclose(o[f"{i}.grads"], grads1, rtol=1e-4, atol=1e-7), group
        zgrad = torch.cat([o[f"{i}.zgrad"] for o in out])
        assert torch.allclose(zgrad, zgrad1, rtol=1e-4, atol=1e-7), group


def test_groups_change_the_loss_and_weight_zero_rows_change_nothing():
    """The checks above would pass for any group rule if groups made no difference."""
    x, w = _inputs()
    z = _layer()(x).detach()
    values = {g: ucl_loss(z, w, TAU, g).item() for g in GROUPS}
    assert values[4] < values[8] < values[None]  # more negatives, larger repulsion term
    assert values[32] == pytest.approx(values[None], rel=1e-6)
    moved = z.clone()
    moved[[1, 6, 11]] = torch.randn(3, FEATURES)  # the rows whose weight is 0
    for g in GROUPS:
        assert ucl_loss(moved, w, TAU, g).item() == pytest.approx(values[g], rel=1e-6)


def test_without_process_group_a_group_spanning_workers_is_the_local_batch():
    z, w = torch.randn(4, 3), torch.ones(4)
    assert torch.equal(ucl_loss(z, w, group_size=8), ucl_loss(z, w, group_size=None))
