"""The ground truth: docs/design.md sections 2, 3 and 8 in plain PyTorch autograd.

It materialises the ``B x C x N`` scores (2.5 GB per copy at the paper's setting) and
lets autograd differentiate everything, including the marginal prior's dependence on
``x``, which the fused backends drop because it contributes exactly zero (section 3), and
the diversity term's, which they differentiate by hand (section 8.1).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["channel_loss"]


def channel_loss(x: torch.Tensor, templates: torch.Tensor, tau: float, marginal: bool,
                 diversity: float = 0.0, process_group=None, diagnostics: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss[c], diagnostics)`` for ``x`` of shape ``(B, C, H, W)`` and templates ``(N, H*W)``.

    ``loss[c] = -MI[c] - diversity * KL(pbar[c] || mean_c pbar[c])``, computed in
    ``templates.dtype`` (float64 for float64 input, else float32), whatever autocast is
    doing. ``diagnostics`` asks for the vector ``(mi_over_log_n, max_p, score_std)`` of
    docs/design.md section 8.4, from the materialised scores; it is ``None`` otherwise.

    With ``process_group`` each feature map's term is weighted by ``world_size / B_global``
    instead of ``1 / B`` (one all-reduce of ``B``), and ``pbar`` is the mean over the
    group's global batch (in the same all-reduce). For the marginal estimator it is then a
    constant for autograd, as in the fused backends; the diversity term, a function of the
    global ``pbar`` alone, differentiates it through this process's maps with their weight
    times ``world_size``, so that the mean over the processes of the gradients (as DDP
    takes it) is the gradient of the global batch's loss.
    """
    with torch.autocast(x.device.type, enabled=False):
        batch = x.shape[0]
        rows = x.reshape(batch, x.shape[1], -1).to(templates.dtype)
        scores = tau * torch.einsum("bck,nk->bcn", rows, templates)
        log_p = torch.log_softmax(scores, dim=-1)
        p = log_p.exp()
        tiny = torch.finfo(p.dtype).tiny
        needs_pbar = marginal or diversity > 0
        local_sums = p.sum(0)
        totals, count, map_weight = local_sums, batch, 1.0 / batch
        if process_group is not None:
            size = torch.full((1,), float(batch), dtype=p.dtype, device=p.device)
            packed = torch.cat([local_sums.detach().flatten(), size]) if needs_pbar else size
            dist.all_reduce(packed, group=process_group)
            world = dist.get_world_size(process_group)
            count = packed[-1]
            map_weight = world / count
            if needs_pbar:
                totals = (packed[:-1].view_as(local_sums)
                          + world * (local_sums - local_sums.detach()))
        pbar = totals / count
        if marginal:
            held = pbar if process_group is None else pbar.detach()
            log_q = held.clamp_min(tiny).log()
        else:
            log_q = torch.full((), -math.log(templates.shape[0]), dtype=p.dtype, device=p.device)
        # A term with p = 0 contributes 0; NaN must still propagate, so mask on p == 0.
        kl_terms = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q))
        information = kl_terms.sum(-1).sum(0) * map_weight
        loss = -information
        if diversity > 0:
            mean = pbar.mean(0)
            log_ratio = pbar.clamp_min(tiny).log() - mean.clamp_min(tiny).log()
            terms = torch.where(pbar == 0, torch.zeros_like(pbar), pbar * log_ratio)
            loss = loss - diversity * terms.sum(-1)
        if not diagnostics:
            return loss, None
        with torch.no_grad():
            per_map = torch.stack([p.amax(-1), scores.std(-1, correction=0)])
            per_map = per_map.sum(1).mean(-1) * map_weight
            summary = torch.cat([(information.mean() / math.log(templates.shape[0]))[None],
                                 per_map])
        return loss, summary
