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
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss[c], lse[b,c], neg_entropy[b,c], log_q[c,t])`` of SPEC section 2.

    ``templates`` is ``(N, H*W)`` in the accumulation dtype, or ``None`` for the built-in set
    (``subset = 0`` for all of it); ``log_q`` is empty for the uniform estimator.
    """
    with torch.autocast(x.device.type, enabled=False):  # accumulation dtype, not autocast's
        return _channel_loss(x, templates, radius, subset, tau, marginal, precision, backend, group)


def _channel_loss(x, templates, radius, subset, tau, marginal, precision, backend, group):
    module = backend_module(resolve_backend(backend, x.device, x.dtype))
    precision = resolve_precision(precision)
    templates = _templates_for(x, templates, radius, subset)
    batch, channels = x.shape[:2]
    rows = x.reshape(batch, channels, -1).contiguous()
    lse, neg_entropy = module.row_stats(rows, templates, tau, precision)
    if not marginal:
        mutual_info = neg_entropy.mean(0) + math.log(templates.shape[0])
        return -mutual_info, lse, neg_entropy, lse.new_empty(0)
    local_sums = module.column_sums(rows, templates, tau, lse, precision)
    totals, count = local_sums, float(batch)
    if group:
        # One all-reduce of the column sums and the batch size (SPEC section 2).
        packed = torch.cat([local_sums.flatten(), local_sums.new_tensor([count])])
        dist.all_reduce(packed, group=_PROCESS_GROUPS[group])
        totals, count = packed[:-1].view_as(local_sums), packed[-1]
    log_q = (totals / count).clamp_min_(torch.finfo(totals.dtype).tiny).log_()
    mutual_info = neg_entropy.mean(0) - torch.linalg.vecdot(local_sums, log_q) / batch
    return -mutual_info, lse, neg_entropy, log_q


@channel_loss.register_fake
def _(x, templates, radius, subset, tau, marginal, precision, backend, group):
    batch, channels = x.shape[:2]
    dtype = accumulation_dtype(x.dtype)
    n = _num_templates(x, templates, subset)
    stats = x.new_empty((batch, channels), dtype=dtype)
    log_q = x.new_empty((channels, n) if marginal else (0,), dtype=dtype)
    return x.new_empty((channels,), dtype=dtype), stats, torch.empty_like(stats), log_q


@torch.library.custom_op("ecloss_fast::input_grad", mutates_args=())
def input_grad(x: torch.Tensor, templates: Optional[torch.Tensor], radius: float, subset: int,
               tau: float, lse: torch.Tensor, neg_entropy: torch.Tensor,
               log_q: Optional[torch.Tensor], row_weight: torch.Tensor, precision: str,
               backend: str) -> torch.Tensor:
    """``dx`` of SPEC section 3 for the per-row weights ``row_weight[b,c] = -g[c] / B``."""
    module = backend_module(resolve_backend(backend, x.device, x.dtype))
    precision = resolve_precision(precision)
    templates = _templates_for(x, templates, radius, subset)
    batch, channels = x.shape[:2]
    rows = x.reshape(batch, channels, -1).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        grad = module.input_grad(rows, templates, tau, lse, neg_entropy, log_q, row_weight, precision)
    return grad.view(x.shape)


@input_grad.register_fake
def _(x, templates, radius, subset, tau, lse, neg_entropy, log_q, row_weight, precision, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, templates, radius, subset, tau, marginal, precision, backend, _ = inputs
    _, lse, neg_entropy, log_q = output
    ctx.save_for_backward(x, templates, lse, neg_entropy, log_q)
    ctx.options = (radius, subset, tau, marginal, precision, backend)


def _backward(ctx, grad_loss, _grad_lse, _grad_neg_entropy, _grad_log_q):
    x, templates, lse, neg_entropy, log_q = ctx.saved_tensors
    radius, subset, tau, marginal, precision, backend = ctx.options
    row_weight = (grad_loss.to(lse.dtype) / -x.shape[0]).expand_as(lse).contiguous()
    grad_x = torch.ops.ecloss_fast.input_grad(
        x, templates, radius, subset, tau, lse, neg_entropy, log_q if marginal else None,
        row_weight, precision, backend)
    return grad_x, None, None, None, None, None, None, None, None


channel_loss.register_autograd(_backward, setup_context=_setup_context)
