"""The ``torch.library`` custom ops that every fused backend runs behind.

``ecloss_fast::channel_loss`` runs the forward sweeps of one backend and returns the
per-channel loss with the per-row statistics that its backward needs;
``ecloss_fast::input_grad`` is that backward. Both are opaque to ``torch.compile``, which
keeps them whole (no graph break, no retracing of kernels), and the templates are looked
up inside them so a compiled graph never rebuilds them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ecloss_fast._dispatch import backend_module, resolve_backend, resolve_precision
from ecloss_fast._templates import count_for_pixels, template_matrix

__all__ = ["channel_loss", "input_grad", "register_process_group", "accumulation_dtype"]

_PROCESS_GROUPS: dict[str, object] = {}


def register_process_group(group) -> str:
    """A name under which the ops find ``group`` (custom ops take no ProcessGroup)."""
    name = group.group_name if group is not dist.group.WORLD else "WORLD"
    _PROCESS_GROUPS[name] = group
    return name


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and reductions: float64 for float64 input, else float32 (SPEC section 4)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _templates_for(x, templates, radius, subset):
    if templates is not None:
        return templates
    height, width = x.shape[-2:]
    return template_matrix(height, width, radius, subset if subset > 0 else None,
                           x.device, accumulation_dtype(x.dtype))


def _num_templates(x, templates, subset):
    if templates is not None:
        return templates.shape[0]
    return subset if subset > 0 else count_for_pixels(x.shape[-2] * x.shape[-1])


@torch.library.custom_op("ecloss_fast::channel_loss", mutates_args=())
def channel_loss(x: torch.Tensor, templates: Optional[torch.Tensor], radius: float, subset: int,
                 tau: float, marginal: bool, precision: str, backend: str, group: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    """``(loss[c], row_max[b,c], log_sum[b,c], neg_entropy[b,c], log_q[c,t], map_weight)``.

    The loss of docs/design.md section 2 with the per-row statistics of
    ``ecloss_fast.backends`` that its backward needs. ``templates`` is ``(N, H*W)`` in the
    accumulation dtype, or ``None`` for the built-in set (``subset = 0`` for all of it);
    ``log_q`` is empty for the uniform estimator. ``map_weight`` (0-d) weights each feature
    map's term: ``1 / B``, or ``world_size / B_global`` under the process group named
    ``group``, so that the mean of the processes' losses is the loss of the global batch
    for any split of it. It stays a tensor: no host synchronisation.
    """
    with torch.autocast(x.device.type, enabled=False):  # accumulation dtype, not autocast's
        return _channel_loss(x, templates, radius, subset, tau, marginal, precision, backend, group)


def _global_batch(local_sums, batch, group, like):
    """Batch size and column sums over the group (one all-reduce), and the map weight."""
    count = torch.full((1,), float(batch), dtype=like.dtype, device=like.device)
    if not group:
        return local_sums, count[0], count[0].reciprocal()
    process_group = _PROCESS_GROUPS[group]
    packed = count if local_sums is None else torch.cat([local_sums.flatten(), count])
    dist.all_reduce(packed, group=process_group)
    totals = None if local_sums is None else packed[:-1].view_as(local_sums)
    return totals, packed[-1], dist.get_world_size(process_group) / packed[-1]


def _channel_loss(x, templates, radius, subset, tau, marginal, precision, backend, group):
    module = backend_module(resolve_backend(backend, x.device, x.dtype))
    precision = resolve_precision(precision)
    templates = _templates_for(x, templates, radius, subset)
    batch, channels = x.shape[:2]
    rows = x.reshape(batch, channels, -1).contiguous()
    row_max, log_sum, neg_entropy = module.row_stats(rows, templates, tau, precision)
    local_sums = (module.column_sums(rows, templates, tau, row_max, log_sum, precision)
                  if marginal else None)
    totals, count, map_weight = _global_batch(local_sums, batch, group, neg_entropy)
    if marginal:
        # sum_b D[b] = sum_b neg_entropy[b] - sum_t (sum_b p[b,t]) log pbar[t], every p of
        # the column sums formed as in row_stats. Those p sum to 1 only to a few ulps over
        # N terms, and an excess mass d moves the second term by d log N: so pbar and the
        # local sums are both taken over their mass (B in exact arithmetic), and the two
        # terms of a batch of identical maps cancel to the rounding of the entropies.
        pbar = totals / totals.sum(-1, keepdim=True)
        log_q = pbar.clamp_min_(torch.finfo(totals.dtype).tiny).log_()
        mass = local_sums.sum(-1) / batch
        divergence = neg_entropy.sum(0) - torch.linalg.vecdot(local_sums, log_q) / mass
    else:
        log_q = neg_entropy.new_empty(0)
        divergence = (neg_entropy + math.log(templates.shape[0])).sum(0)
    return -divergence * map_weight, row_max, log_sum, neg_entropy, log_q, map_weight


@channel_loss.register_fake
def _(x, templates, radius, subset, tau, marginal, precision, backend, group):
    batch, channels = x.shape[:2]
    dtype = accumulation_dtype(x.dtype)
    n = _num_templates(x, templates, subset)
    stats = x.new_empty((batch, channels), dtype=dtype)
    log_q = x.new_empty((channels, n) if marginal else (0,), dtype=dtype)
    return (x.new_empty((channels,), dtype=dtype), stats, torch.empty_like(stats),
            torch.empty_like(stats), log_q, x.new_empty((), dtype=dtype))


@torch.library.custom_op("ecloss_fast::input_grad", mutates_args=())
def input_grad(x: torch.Tensor, templates: Optional[torch.Tensor], radius: float, subset: int,
               tau: float, row_max: torch.Tensor, log_sum: torch.Tensor,
               neg_entropy: torch.Tensor, log_q: Optional[torch.Tensor],
               row_weight: torch.Tensor, precision: str, backend: str) -> torch.Tensor:
    """``dx`` of docs/design.md section 3 for the row weights ``-g[c] * map_weight``."""
    module = backend_module(resolve_backend(backend, x.device, x.dtype))
    precision = resolve_precision(precision)
    templates = _templates_for(x, templates, radius, subset)
    batch, channels = x.shape[:2]
    rows = x.reshape(batch, channels, -1).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        grad = module.input_grad(rows, templates, tau, row_max, log_sum, neg_entropy, log_q,
                                 row_weight, precision)
    return grad.view(x.shape)


@input_grad.register_fake
def _(x, templates, radius, subset, tau, row_max, log_sum, neg_entropy, log_q, row_weight,
      precision, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, templates, radius, subset, tau, marginal, precision, backend, _ = inputs
    _, row_max, log_sum, neg_entropy, log_q, map_weight = output
    ctx.save_for_backward(x, templates, row_max, log_sum, neg_entropy, log_q, map_weight)
    ctx.options = (radius, subset, tau, marginal, precision, backend)


def _backward(ctx, grad_loss, *_unused_grads):
    x, templates, row_max, log_sum, neg_entropy, log_q, map_weight = ctx.saved_tensors
    radius, subset, tau, marginal, precision, backend = ctx.options
    row_weight = (grad_loss.to(row_max.dtype) * -map_weight).expand_as(row_max).contiguous()
    grad_x = torch.ops.ecloss_fast.input_grad(
        x, templates, radius, subset, tau, row_max, log_sum, neg_entropy,
        log_q if marginal else None, row_weight, precision, backend)
    return grad_x, None, None, None, None, None, None, None, None


channel_loss.register_autograd(_backward, setup_context=_setup_context)
