"""Optimizer and learning-rate schedule: linear warm-up, then cosine or step decay.

The schedule is a function of the optimiser step, stepped once per optimiser update (not
per micro-batch), so resuming restores it from its step count alone.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from train.config import OptimConfig
from train.partial_fc import PartialFC

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "clip_gradients"]


def build_optimizer(parameters, config: OptimConfig) -> torch.optim.Optimizer:
    parameters = [p for p in parameters if p.requires_grad]
    if config.name == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.lr, betas=config.betas,
                             weight_decay=config.weight_decay)


def lr_factor(step: int, config: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of ``config.lr`` at optimiser step ``step`` (0-based)."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    floor = config.min_lr / config.lr
    if config.decay == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.decay == "step":
        epoch = step / steps_per_epoch
        return max(floor, config.gamma ** sum(epoch >= m for m in config.milestones))
    return 1.0


def build_scheduler(optimizer, config: OptimConfig, steps_per_epoch: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config, steps_per_epoch, total_steps))


def clip_gradients(module: nn.Module, max_norm: float | None, ctx) -> torch.Tensor:
    """Clip the gradients of ``module`` (a backbone and a head) to ``max_norm`` by their
    global norm (``None``: no clipping); returns the norm before clipping.

    A partial FC shard's squared norm is summed over the ranks of ``ctx``; the rest of the
    gradient is the same on every rank after DDP's average.
    """
    parameters = [p for p in module.parameters() if p.grad is not None]
    if isinstance(module.head, PartialFC) and ctx.distributed:
        shard = [p.grad for p in module.head.parameters() if p.grad is not None]
        replicated = [p.grad for p in module.backbone.parameters() if p.grad is not None]
        squares = ctx.all_reduce_sum(nn.utils.get_total_norm(shard).square())
        norm = (nn.utils.get_total_norm(replicated).square() + squares).sqrt()
    else:
        norm = nn.utils.get_total_norm([p.grad for p in parameters])
    if max_norm is not None:
        nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
