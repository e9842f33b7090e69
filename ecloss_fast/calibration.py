"""``calibrate_tau``: the ``tau`` at which the template scores of a batch spread by a chosen amount.

At ``tau = 1e-3`` on BatchNorm-scaled maps the scores differ by about 1e-3 across the
templates, the softmax is uniform to about 1% and no template is matched (docs/design.md,
section 8). The spread that matters is the standard deviation over the templates of each
map's scores, so the calibrated ``tau`` sets its batch mean to ``spread``:

    tau = spread / mean_{b,c} std_t <x[b,c], T[t]>        (population std over the N templates)

computed without any ``B x C x N`` tensor: with the template mean ``mu = mean_t T[t]`` and
second moment ``G = T^T T / N`` (``K x K``, ``K = H*W``), ``var_t = x^T G x - (mu . x)^2``.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ecloss_fast._dtypes import accumulation_dtype
from ecloss_fast._math import covariance_factor
from ecloss_fast._validation import (check_flag, check_input, check_positive,
                                     check_process_group, selected_templates)

__all__ = ["calibrate_tau", "covariance_factor"]


def calibrate_tau(x: torch.Tensor, *, radius: float = 4.0, templates="full", spread: float = 1.0,
                  normalize: bool = False, process_group=None) -> float:
    """The ``tau`` at which the mean over feature maps of the scores' std over templates is ``spread``.

    ``tau = spread / mean_{b,c} std_t <x[b,c], T[t]>`` for the post-ReLU maps ``x``
    ``(B, C, H, W)``, the population standard deviation over the ``N`` templates that
    ``ecloss`` uses with the same ``radius`` and ``templates`` (``"full"``, an int ``k`` or a
    tensor ``(N, H, W)``). With ``normalize=True`` each map is first divided by
    ``max(||x[b,c]||_2, eps)``, ``eps`` the smallest normal float of the accumulation type,
    as ``ecloss(..., normalize=True)`` scores it. Exact (float32 accumulation, float64 for
    float64 ``x``) and cheap: ``std_t`` comes from the templates' ``K x K`` covariance, with
    nothing of size ``B x C x N``. With ``process_group`` the mean is over that group's
    global batch, an all-reduce, so every process gets the same ``tau``.

    Raises ``ValueError`` when every map's scores are constant over the templates (all maps
    dead: nothing to calibrate on) or when ``x`` is not finite.
    """
    check_input(x)
    radius = check_positive("radius", radius)
    spread = check_positive("spread", spread)
    normalize = check_flag("normalize", normalize)
    process_group = check_process_group(process_group)
    dtype = accumulation_dtype(x.dtype)
    rows, subset = selected_templates(templates, x, torch.float64)
    factor = covariance_factor(rows, *x.shape[-2:], radius, subset or None, x.device, dtype)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        rows = x.detach().flatten(2).to(dtype)
        if normalize:
            rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        std = (rows @ factor.T).norm(dim=-1)  # (B, C): ||R x|| = std_t of the scores
        totals = torch.stack([std.sum(dtype=torch.float64),
                              torch.tensor(float(std.numel()), dtype=torch.float64, device=x.device)])
        if process_group is not None:
            dist.all_reduce(totals, group=process_group)
    total_std, maps = totals.tolist()
    if not math.isfinite(total_std):
        raise ValueError(f"x must be finite to calibrate tau; the spread of its scores is {total_std}")
    if total_std == 0:
        raise ValueError(f"cannot calibrate tau: the scores of all {int(maps)} feature maps of x "
                         "are constant over the templates (every map is dead)")
    return spread / (total_std / maps)
