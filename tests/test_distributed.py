"""ECLoss over a torch.distributed group: two gloo processes vs one process with the whole batch.

Equal and unequal per-process batches, both estimators, with and without the diversity
term (a function of the global ``pbar``, docs/design.md section 8.1): averaged over the
processes (as DDP averages gradients), the loss, the gradient and the diagnostics must
equal those of one process.
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
# (estimator, diversity)
CASES = (("uniform", 0.0), ("marginal", 0.0), ("uniform", 0.7), ("marginal", 1.3))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _upstream(count, dtype):
    return torch.linspace(-0.5, 2.0, count, dtype=dtype)


def _worker(rank, world, port, backend, x, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for split in SPLITS:
            start = sum(split[:rank])
            for estimator, diversity in CASES:
                local = x[start:start + split[rank]].clone().requires_grad_()
                criterion = ef.ECLoss(estimator=estimator, backend=backend, reduction="none",
                                      diversity=diversity, process_group=dist.group.WORLD)
                loss = criterion(local)
                (grad,) = torch.autograd.grad(loss, local, _upstream(loss.numel(), loss.dtype))
                diagnostics = torch.stack(list(criterion.last_diagnostics.values()))
                results[(rank, split, estimator, diversity)] = (loss.detach(), grad, diagnostics)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_two_processes_equal_one(backend):
    x = peaked_maps(4, 3, 5, 4, seed=21, dtype=torch.float64)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), backend, x, results), nprocs=2, join=True)
    for estimator, diversity in CASES:
        whole = x.clone().requires_grad_()
        criterion = ef.ECLoss(estimator=estimator, backend="reference", reduction="none",
                              diversity=diversity)
        expected = criterion(whole)
        (expected_grad,) = torch.autograd.grad(expected, whole,
                                               _upstream(expected.numel(), expected.dtype))
        expected_diagnostics = torch.stack(list(criterion.last_diagnostics.values()))
        for split in SPLITS:
            losses, grads, diagnostics = zip(*(results[(rank, split, estimator, diversity)]
                                               for rank in range(2)))
            # DDP averages over the processes: the mean loss, each part's gradient / world.
            torch.testing.assert_close(sum(losses) / 2, expected.detach(), rtol=1e-10,
                                       atol=1e-12)
            torch.testing.assert_close(torch.cat(grads) / 2, expected_grad, rtol=1e-8,
                                       atol=1e-12 * expected_grad.abs().max().item())
            torch.testing.assert_close(sum(diagnostics) / 2, expected_diagnostics, rtol=1e-10,
                                       atol=1e-12)
    # And the global marginal matters: the first process's maps alone give another loss.
    for estimator, diversity in CASES[1:]:
        alone = ef.ecloss(x[:2], estimator=estimator, backend="reference", reduction="none",
                          diversity=diversity)
        assert not torch.allclose(results[(0, (2, 2), estimator, diversity)][0], alone)
