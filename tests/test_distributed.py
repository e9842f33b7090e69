"""ECLoss over a torch.distributed group: two gloo processes vs one process with the whole batch.

Equal and unequal per-process batches, both estimators: averaged over the processes (as
DDP averages gradients), the loss and the gradient must equal those of one process.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ecloss_fast as ef
from ecloss_fast.testing import peaked_maps

SPLITS = ((1, 3), (2, 2))
ESTIMATORS = ("uniform", "marginal")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, x, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for split in SPLITS:
            start = sum(split[:rank])
            for estimator in ESTIMATORS:
                local = x[start:start + split[rank]].clone().requires_grad_()
                loss = ef.ecloss(local, estimator=estimator, backend=backend,
                                 reduction="none", process_group=dist.group.WORLD)
                upstream = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype)
                (grad,) = torch.autograd.grad(loss, local, upstream)
                results[(rank, split, estimator)] = (loss.detach(), grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_two_processes_equal_one(backend):
    x = peaked_maps(4, 3, 5, 4, seed=21, dtype=torch.float64)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), backend, x, results), nprocs=2, join=True)
    for estimator in ESTIMATORS:
        whole = x.clone().requires_grad_()
        expected = ef.ecloss(whole, estimator=estimator, backend="reference", reduction="none")
        upstream = torch.linspace(0.5, 2.0, expected.numel(), dtype=expected.dtype)
        (expected_grad,) = torch.autograd.grad(expected, whole, upstream)
        for split in SPLITS:
            losses, grads = zip(*(results[(rank, split, estimator)] for rank in range(2)))
            # DDP averages over the processes: the mean loss, each part's gradient / world.
            torch.testing.assert_close(sum(losses) / 2, expected.detach(), rtol=1e-10,
                                       atol=1e-12)
            torch.testing.assert_close(torch.cat(grads) / 2, expected_grad, rtol=1e-8,
                                       atol=1e-12 * expected_grad.abs().max().item())
    # And the global marginal matters: the first process's maps alone give another loss.
    alone = ef.ecloss(x[:2], estimator="marginal", backend="reference", reduction="none")
    assert not torch.allclose(results[(0, (2, 2), "marginal")][0], alone)
