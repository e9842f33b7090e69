"""The templates' covariance factor: the spread of a map's scores over the templates without
any ``B x C x N`` tensor, shared by ``calibrate_tau`` and the loss's ``score_std``
diagnostic (docs/design.md sections 8.3 and 8.4).

With the template mean ``mu = mean_t T[t]`` and second moment ``G = T^T T / N`` (``K x K``,
``K = H*W``), ``var_t <x, T[t]> = x^T (G - mu mu^T) x = ||R x||^2`` for ``R^T R = G - mu mu^T``.
"""
from __future__ import annotations

import functools

import torch

from ecloss_fast._templates import template_matrix

__all__ = ["covariance_factor"]


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
    """
    if template_rows is not None:
        return _covariance_factor(template_rows).to(dtype)
    return _builtin_factor(height, width, radius, subset, device, dtype)
