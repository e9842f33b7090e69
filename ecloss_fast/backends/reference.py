"""The ground truth: SPEC sections 2 and 3 in plain PyTorch autograd.

It materialises the ``B x C x N`` scores (2.5 GB per copy at the paper's setting) and
lets autograd differentiate everything, including the marginal prior's dependence on
``x``, which the fused backends drop because it contributes exactly zero (SPEC section 3).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["channel_loss"]


def channel_loss(x: torch.Tensor, templates: torch.Tensor, tau: float, marginal: bool,
                 process_group=None) -> torch.Tensor:
    """``loss[c] = -MI[c]`` for ``x`` of shape ``(B, C, H, W)`` and templates ``(N, H*W)``.

    Computed in ``templates.dtype`` (float64 for float64 input, else float32), whatever
    autocast is doing. With ``process_group`` each feature map's term is weighted by
    ``world_size / B_global`` instead of ``1 / B`` (one all-reduce of ``B``), and for the
    marginal estimator ``pbar`` is the mean over the group's global batch (in the same
    all-reduce); it is then a constant for autograd, as in the fused backends.
    """
    with torch.autocast(x.device.type, enabled=False):
        batch = x.shape[0]
        rows = x.reshape(batch, x.shape[1], -1).to(templates.dtype)
        scores = tau * torch.einsum("bck,nk->bcn", rows, templates)
        log_p = torch.log_softmax(scores, dim=-1)
        p = log_p.exp()
        map_weight = 1.0 / batch
        if process_group is not None:
            count = torch.full((1,), float(batch), dtype=p.dtype, device=p.device)
            packed = torch.cat([p.detach().sum(0).flatten(), count]) if marginal else count
            dist.all_reduce(packed, group=process_group)
            map_weight = dist.get_world_size(process_group) / packed[-1]
        if marginal:
            pbar = p.mean(0) if process_group is None else (packed[:-1] / packed[-1]).view_as(p[0])
            log_q = pbar.clamp_min(torch.finfo(p.dtype).tiny).log()
        else:
            log_q = torch.full((), -math.log(templates.shape[0]), dtype=p.dtype, device=p.device)
        # A term with p = 0 contributes 0; NaN must still propagate, so mask on p == 0.
        kl_terms = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q))
        return -kl_terms.sum(-1).sum(0) * map_weight
