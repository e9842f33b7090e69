"""One process or many under ``torchrun``, behind one small interface.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables;
without them the run is a single process and nothing is initialised (no NCCL on one GPU).
The backend is NCCL for CUDA devices and gloo otherwise, so data parallelism also runs on
CPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Context", "setup", "teardown", "sync_batchnorm", "check_sync_batchnorm"]


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # whether setup() created the process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        """The process group for ``ecloss(process_group=...)``; ``None`` for one process."""
        return dist.group.WORLD if self.distributed else None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather_object(self, value) -> list:
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value):
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup(device: str = "auto", backend: str = "auto") -> Context:
    """Read torchrun's environment, choose the device, initialise the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{local_rank}"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={device!r} but CUDA is not available here")
        torch.cuda.set_device(chosen)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        if backend == "auto":
            backend = "nccl" if chosen.type == "cuda" else "gloo"
        if backend == "nccl" and chosen.type != "cuda":
            raise ValueError("train.dist_backend='nccl' needs CUDA devices; use 'gloo' on CPUs")
        dist.init_process_group(backend, device_id=chosen if backend == "nccl" else None)
    return Context(rank, world_size, local_rank, chosen, owns_group)


def sync_batchnorm(module: torch.nn.Module, context: Context) -> torch.nn.Module:
    """``module`` with its BatchNorms computing their statistics over all processes.

    Unchanged in one process. PyTorch's SyncBatchNorm trains on CUDA (and XPU/HPU) only: on
    CPU processes its forward raises, so this refuses them before the run starts.
    """
    check_sync_batchnorm(context)
    if not context.distributed:
        return module
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)


def check_sync_batchnorm(context: Context) -> None:
    """The error :func:`sync_batchnorm` raises for CPU processes, before a run starts."""
    if context.distributed and context.device.type != "cuda":
        raise ValueError("model.sync_bn needs CUDA devices: PyTorch's SyncBatchNorm does not "
                         f"train on {context.device.type} processes; set model.sync_bn=false")


def teardown(context: Context) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()
