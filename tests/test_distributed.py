"""Marginal estimator over a torch.distributed group: two gloo processes vs one process."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ecloss_fast as ef
from ecloss_fast.testing import peaked_maps


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, x, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = x.shape[0] // world
        local = x[rank * half:(rank + 1) * half].clone().requires_grad_()
        loss = ef.ecloss(local, estimator="marginal", backend=backend, process_group=dist.group.WORLD)
        loss.backward()
        results[rank] = (loss.detach(), local.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_two_processes_equal_one(backend):
    x = peaked_maps(6, 3, 5, 4, seed=21, dtype=torch.float64)
    whole = x.clone().requires_grad_()
    expected = ef.ecloss(whole, estimator="marginal", backend="reference")
    expected.backward()

    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), backend, x, results), nprocs=2, join=True)
    losses = [results[r][0] for r in range(2)]
    # DDP averages over processes: mean loss, and each half's gradient scaled by 1/world.
    torch.testing.assert_close(sum(losses) / 2, expected.detach(), rtol=1e-10, atol=1e-12)
    grad = torch.cat([results[r][1] for r in range(2)]) / 2
    torch.testing.assert_close(grad, whole.grad, rtol=1e-8, atol=1e-12 * whole.grad.abs().max())
    # And the global marginal matters: each half alone gives another loss.
    alone = ef.ecloss(x[:3], estimator="marginal", backend="reference")
    assert not torch.allclose(losses[0], alone)
