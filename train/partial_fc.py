"""Partial FC: the classifier of many identities, its class centres sharded over the ranks.

arcface_torch's ``PartialFC_V2`` (recognition/arcface_torch/partial_fc_v2.py), on this
project's heads (models/heads.py). At Glint360K's 360K identities the full classifier is
360K x 512 floats, and its SGD momentum as much again, on every rank under DDP; here rank
``r`` of ``W`` holds ``num_classes / W`` rows (the first ``num_classes % W`` ranks one more)
and their optimizer state, and nothing of the classifier is replicated.

A step: every rank's embeddings and labels are all-gathered (embeddings with their
gradient); each rank scores the whole global batch against its rows, optionally against a
random subset of them (``sample_rate``: every class of the global batch on this rank, the
positives, plus random negatives); the margin of the head kind is applied to the target
column; the cross-entropy's row maximum and sum of exponentials are all-reduced, so the
loss is the global batch's mean over all classes (sampled ones) and equal on every rank.

Gradients: each shard gets the exact gradient of that loss for its rows. The embeddings'
gradient is ``world_size`` times the loss's gradient for them, because DDP averages the
backbone's gradient over the ranks: after the average it is the loss's gradient.

No host synchronisation: per-rank batches are padded to ``max_batch`` rows (labels ``-1``,
no weight in the loss) instead of exchanging their sizes, and the sampled set has a fixed
size, ``min(num_local, max(ceil(sample_rate * num_local), world * max_batch))``, which holds
every positive because a global batch has at most ``world * max_batch`` of them.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.heads import DEFAULT_MARGINS, check_head_size, cosine, margin_logits

__all__ = ["PartialFC", "head_state_rows", "optimizer_state_rows"]


class _AllGather(torch.autograd.Function):
    """All ranks' equally sized tensors, concatenated; the gradient is summed over the ranks
    and scaled by ``world_size`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, tensor, group, rank, world_size):
        ctx.group, ctx.rank, ctx.world_size = group, rank, world_size
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.world_size)[ctx.rank] * ctx.world_size, None, None, None


class _DistributedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over the rows with ``valid``, the classes split over the ranks.

    ``target`` is the column of the row's class on this rank, ``-1`` where it is elsewhere.
    Also returns, per row, whether the target logit is the global maximum (accuracy).
    """

    @staticmethod
    def forward(ctx, logits, target, valid, group):
        top = logits.detach().amax(1, keepdim=True)
        if group is not None:
            dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
        shifted = logits - top
        exp = shifted.exp()
        here = target >= 0
        target_shifted = torch.where(here, shifted.gather(1, target.clamp_min(0)[:, None])[:, 0],
                                     torch.zeros((), dtype=shifted.dtype, device=shifted.device))
        sums = torch.stack([exp.sum(1), target_shifted])
        if group is not None:
            dist.all_reduce(sums, group=group)
        total, target_shifted = sums
        count = valid.sum().clamp_min(1).to(logits.dtype)
        loss = ((total.log() - target_shifted) * valid).sum() / count
        ctx.save_for_backward(exp / total[:, None], target, valid, count)
        correct = valid & (target_shifted >= 0)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        softmax, target, valid, count = ctx.saved_tensors
        columns = torch.arange(softmax.shape[1], device=softmax.device)
        grad = softmax - (target[:, None] == columns).to(softmax.dtype)
        return grad * (valid[:, None] * (grad_loss / count)), None, None, None


class PartialFC(nn.Module):
    """The classifier rows ``[class_start, class_start + num_local)`` of ``num_classes``.

    ``forward(embedding (B, E), labels (B,))`` with this rank's batch (``B <= max_batch``)
    returns ``(loss, correct)``: the global batch's mean cross-entropy, the same on every
    rank, and how many of this rank's rows have their class's logit as the largest (over
    the sampled classes). ``kind`` is a head kind of :func:`models.build_head`:
    ``softmax`` is ``W e + b``, ``cosface``/``arcface`` the normalised margin heads.
    """

    def __init__(self, kind: str, embedding_dim: int, num_classes: int, *, s: float = 64.0,
                 m: float | None = None, sample_rate: float = 1.0, max_batch: int,
                 rank: int = 0, world_size: int = 1, group=None):
        super().__init__()
        check_head_size(embedding_dim, num_classes)
        if kind != "softmax" and kind not in DEFAULT_MARGINS:
            raise ValueError(f"kind must be 'softmax', 'cosface' or 'arcface', got {kind!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"head.sample_rate must be in (0, 1], got {sample_rate}")
        if num_classes < world_size:
            raise ValueError(f"partial FC shards {num_classes} classes over {world_size} "
                             "processes: each needs at least one")
        if kind != "softmax" and not s > 0:
            raise ValueError(f"s must be positive, got {s}")
        self.kind, self.s = kind, float(s)
        self.m = DEFAULT_MARGINS.get(kind, 0.0) if m is None else float(m)
        self.num_classes, self.sample_rate, self.max_batch = num_classes, sample_rate, max_batch
        self.rank, self.world_size = rank, world_size
        self.group = group if world_size > 1 else None
        base, extra = divmod(num_classes, world_size)
        self.num_local = base + (rank < extra)
        self.class_start = base * rank + min(rank, extra)
        self.num_sample = min(self.num_local, max(math.ceil(sample_rate * self.num_local),
                                                  world_size * max_batch))
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_dim))
        if kind == "softmax":  # nn.Linear's initialisation, as SoftmaxHead
            bound = 1 / math.sqrt(embedding_dim)
            nn.init.uniform_(self.weight, -bound, bound)
            self.bias = nn.Parameter(torch.empty(self.num_local).uniform_(-bound, bound))
        else:
            nn.init.normal_(self.weight, 0, 0.01)
            self.bias = None

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, classes {self.class_start}..{self.class_start + self.num_local - 1}"
                f" of {self.num_classes}, sample_rate={self.sample_rate}")

    def sample(self, labels: torch.Tensor):
        """``(rows, target)`` for the global batch's ``labels`` (``-1``: padding).

        ``rows``: the sorted local rows scored this step, ``None`` for all of them;
        ``target``: per label, its column among them, ``-1`` for classes of other ranks.
        """
        local = labels - self.class_start
        here = (labels >= 0) & (local >= 0) & (local < self.num_local)
        local = local.clamp(0, self.num_local - 1)
        if self.num_sample == self.num_local:
            return None, torch.where(here, local, -1)
        score = torch.rand(self.num_local, device=labels.device)
        # Positives score 2, above every random negative: top-k keeps all of them.
        score.scatter_reduce_(0, local, here.to(score.dtype) * 2, reduce="amax")
        rows = score.topk(self.num_sample, sorted=False).indices.sort().values
        return rows, torch.where(here, torch.searchsorted(rows, local), -1)

    def _gather(self, embedding: torch.Tensor, labels: torch.Tensor):
        if self.group is None:
            return embedding, labels
        batch = embedding.shape[0]
        if batch > self.max_batch:
            raise ValueError(f"a batch of {batch} rows; partial FC was built for at most "
                             f"{self.max_batch}")
        padding = self.max_batch - batch
        embedding = F.pad(embedding, (0, 0, 0, padding))
        labels = F.pad(labels, (0, padding), value=-1)
        parts = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(parts, labels, group=self.group)
        return (_AllGather.apply(embedding, self.group, self.rank, self.world_size),
                torch.cat(parts))

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor):
        batch = embedding.shape[0]
        embedding, labels = self._gather(embedding, labels)
        rows, target = self.sample(labels)
        weight = self.weight if rows is None else self.weight[rows]
        if self.kind == "softmax":
            bias = self.bias if rows is None else self.bias[rows]
            dtype = torch.promote_types(embedding.dtype, torch.float32)
            with torch.autocast(embedding.device.type, enabled=False):
                logits = F.linear(embedding.to(dtype), weight.to(dtype), bias.to(dtype))
        else:
            columns = torch.arange(weight.shape[0], device=weight.device)
            logits = margin_logits(self.kind, cosine(embedding, weight),
                                   target[:, None] == columns, self.s, self.m)
        loss, correct = _DistributedCrossEntropy.apply(logits, target, labels >= 0, self.group)
        start = self.rank * self.max_batch if self.group is not None else 0
        return loss, correct[start:start + batch].sum()

    # -- checkpoints: the full classifier, gathered on save and split on load ----------

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``(num_local, ...)`` rows, concatenated in class order, on the CPU.

        A collective: all ranks call it. Shards differ by at most one row; they travel
        padded to the largest.
        """
        if self.group is None:
            return tensor.detach().cpu().clone()
        longest = math.ceil(self.num_classes / self.world_size)
        padded = F.pad(tensor.detach(), (0, 0) * (tensor.dim() - 1) + (0, longest - tensor.shape[0]))
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        base, extra = divmod(self.num_classes, self.world_size)
        return torch.cat([part[:base + (r < extra)].cpu() for r, part in enumerate(parts)])

    def shard_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full ``(num_classes, ...)`` tensor."""
        if full.shape[0] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} rows, got {tuple(full.shape)}")
        return full[self.class_start:self.class_start + self.num_local]


# -- checkpoints hold the full classifier, so that a run resumes on any number of processes
#    and load_for_eval needs nothing else


def _by_rows(head: PartialFC, direction: str):
    """The conversion of one state value: ``"save"`` gathers a tensor of ``num_local``
    rows from every rank (a collective), ``"load"`` takes this rank's rows of a tensor of
    ``num_classes``; other values are left as they are."""
    rows, convert = ((head.num_local, head.gather_rows) if direction == "save"
                     else (head.num_classes, lambda full: head.shard_rows(full).clone()))

    def by_rows(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
            return convert(value)
        return value
    return by_rows


def head_state_rows(head: nn.Module, state: dict, direction: str) -> dict:
    """A partial FC ``head``'s state dict gathered from its shards for a checkpoint
    (``direction="save"``, a collective) or this rank's rows of a checkpoint's
    (``"load"``); ``state`` unchanged for a replicated head."""
    if not isinstance(head, PartialFC):
        return state
    by_rows = _by_rows(head, direction)
    return {key: by_rows(value) for key, value in state.items()}


def optimizer_state_rows(head: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                         direction: str) -> dict:
    """:func:`head_state_rows` for ``optimizer``'s state dict ``state``: the entries of a
    partial FC head's parameters (e.g. their momentum) gathered or split by rows."""
    if not isinstance(head, PartialFC):
        return state
    by_rows = _by_rows(head, direction)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {id(p) for p in head.parameters()}
    states = dict(state["state"])
    for index in sorted(i for i, p in enumerate(params) if id(p) in sharded and i in states):
        states[index] = {key: by_rows(value) for key, value in states[index].items()}
    return {**state, "state": states}
