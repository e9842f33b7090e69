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

import functools
import math

import torch
import torch.distributed as dist

from ecloss_fast._ops import accumulation_dtype
from ecloss_fast._templates import num_templates, template_matrix
from ecloss_fast.functional import (_check_input, _check_positive, _check_process_group, _choice,
                                    _template_tensor)

__all__ = ["calibrate_tau", "covariance_factor"]


def _covariance_factor(rows: torch.Tensor) -> torch.Tensor:
    """``R`` (at most ``K x K``) with ``R^T R = G - mu mu^T`` for templates ``rows`` ``(N, K)``.

    ``G - mu mu^T`` is the covariance of the templates, so ``var_t <x, T[t]> = x^T (G - mu
    mu^T) x = ||R x||^2``. Subtracting ``(mu . x)^2`` from ``x^T G x`` map by map loses every
    digit when a map's scores spread little next to their mean (a float32 difference of two
    nearly equal numbers, negative as often as not); here the mean is removed once, from the
    templates in float64, and the variance is a sum of squares, never negative.
    """
    rows = rows.double()
    centred = (rows - rows.mean(0)) / rows.shape[0] ** 0.5
    return torch.linalg.qr(centred, mode="r").R


@functools.lru_cache(maxsize=32)
def _builtin_factor(height: int, width: int, radius: float, subset: int | None,
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_covariance_factor` of the built-in set, cached as the templates are.

    Taken from the very template matrix the loss uses at ``dtype``, so the calibrated
    scores are the ones the loss computes.
    """
    return _covariance_factor(template_matrix(height, width, radius, subset, device, dtype)).to(dtype)


def covariance_factor(template_rows: torch.Tensor | None, height: int, width: int,
                      radius: float, subset: int | None, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """``R`` in ``dtype`` with ``||R x|| = std_t <x, T[t]>`` for maps of ``height x width``.

    ``template_rows`` ``(N, K)`` are the templates the loss uses, or ``None`` for the
    built-in set of ``radius`` (``subset`` k of it, ``None`` for all), whose factor is cached.
    The loss's diagnostics use it too (``score_std``, docs/design.md section 8.4).
    """
    if template_rows is not None:
        return _covariance_factor(template_rows).to(dtype)
    return _builtin_factor(height, width, radius, subset, device, dtype)


def _factor_for(templates, x: torch.Tensor, radius: float, dtype: torch.dtype) -> torch.Tensor:
    height, width = x.shape[-2:]
    if isinstance(templates, torch.Tensor):
        return _covariance_factor(_template_tensor(templates, x, torch.float64)).to(dtype)
    if isinstance(templates, str):
        _choice("templates", templates, ("full",))
        return _builtin_factor(height, width, radius, None, x.device, dtype)
    if isinstance(templates, int) and not isinstance(templates, bool):
        total = num_templates(height, width)
        if not 1 <= templates <= total:
            raise ValueError(f"templates (the subset size k) must be between 1 and "
                             f"num_templates({height}, {width}) = {total}; got {templates}")
        return _builtin_factor(height, width, radius, templates, x.device, dtype)
    raise TypeError("templates must be 'full', an int k or a tensor (N, H, W); "
                    f"got {type(templates).__name__}")


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
    _check_input(x)
    radius = _check_positive("radius", radius)
    spread = _check_positive("spread", spread)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be True or False; got {type(normalize).__name__}")
    process_group = _check_process_group(process_group)
    dtype = accumulation_dtype(x.dtype)
    factor = _factor_for(templates, x, radius, dtype)
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
