"""A resumable, rank-independent batch order for data-parallel training.

Epoch ``e`` shuffles the whole dataset with a generator seeded by ``(seed, e)``. Global
batch ``k`` is the slice ``[k * G, (k + 1) * G)`` of that order, ``G = batch_size *
world_size``, and rank ``r`` takes its ``r``-th ``batch_size`` part. The position in an
epoch is therefore one number, the global batches done, and a run resumed from it sees
exactly the samples it had not yet seen, whatever the number of processes; the last
incomplete global batch is dropped so that every rank takes the same number of steps.
"""
from __future__ import annotations

import torch

__all__ = ["GlobalBatchSampler"]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's list of indices for each remaining global batch of the epoch."""

    def __init__(self, num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.global_batch = batch_size * world_size
        if num_samples < self.global_batch:
            raise ValueError(f"the dataset has {num_samples} images, fewer than one global batch "
                             f"of {batch_size} x {world_size} processes")
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start ``epoch`` at global batch ``start_batch`` (the batches already done)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        order = self.order()
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch + self.rank * self.batch_size
            yield order[first:first + self.batch_size].tolist()
