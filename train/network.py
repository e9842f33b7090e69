"""The network a run trains: the backbone (models/) and the classification head (a
replicated head of models/heads.py or a partial FC, train/partial_fc.py) in one module,
wrapped for data parallelism when the run has several processes."""
from __future__ import annotations

import functools

from torch import nn

from models import build_head, build_model
from train import distributed
from train.checkpoint import load_weights
from train.config import Config
from train.partial_fc import PartialFC, head_state_rows

__all__ = ["Recognizer", "build_network"]


class Recognizer(nn.Module):
    """Backbone and head in one module, so that one DDP wrapper synchronises both."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images, labels):
        """Returns ``(logits (B, classes), FaceOutput(embedding, maps))``."""
        out = self.backbone(images)
        return self.head(out.embedding, labels), out


def build_network(config: Config, num_classes: int, ctx: distributed.Context,
                  weights: dict | None = None, origin=None) -> tuple[Recognizer, nn.Module]:
    """``(module, network)``: the :class:`Recognizer` on ``ctx``'s device, holding the
    checkpoint ``weights`` when given (``origin`` names it in errors), and what the
    forward pass calls: the module itself, or DDP-wrapped when distributed (after loading,
    as DDP starts every rank from rank 0's parameters)."""
    m, h = config.model, config.head
    backbone = build_model(m.arch, batch_norm=m.batch_norm, width=m.width,
                           input_size=m.input_size, embedding_dim=m.embedding_dim,
                           dropout=m.dropout, drop_last_pool=m.drop_last_pool)
    if h.partial_fc:
        head = PartialFC(h.kind, m.embedding_dim, num_classes, s=h.s, m=h.m,
                         sample_rate=h.sample_rate, max_batch=config.train.batch_size,
                         rank=ctx.rank, world_size=ctx.world_size, group=ctx.group)
    else:
        head = build_head(h.kind, m.embedding_dim, num_classes, s=h.s, m=h.m)
    if m.sync_bn:
        backbone = distributed.sync_batchnorm(backbone, ctx)
    module = Recognizer(backbone, head).to(ctx.device)
    if weights is not None:
        load_weights(module.backbone, weights["model"], origin, "model")
        load_weights(module.head, head_state_rows(module.head, weights["head"], "load"), origin,
                     "head")
    if not ctx.distributed:
        return module, module
    ddp = functools.partial(nn.parallel.DistributedDataParallel,
                            device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    # A sharded head differs between the ranks: DDP must not average it.
    return module, (Recognizer(ddp(module.backbone), head) if h.partial_fc else ddp(module))
