"""Activation templates of docs/design.md section 1: one-peak, two-peak and negative, in contract order."""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["num_templates", "count_for_pixels", "make_templates", "template_matrix",
           "subset_indices"]


def _check_size(height, width):
    width = height if width is None else width
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    return height, width


def num_templates(height: int, width: int | None = None) -> int:
    """``N = P + P(P-1)/2 + 1`` with ``P = height * width``: 19,307 for 14x14, 1,226 for 7x7."""
    height, width = _check_size(height, width)
    return count_for_pixels(height * width)


def count_for_pixels(pixels):
    """``P + P(P-1)/2 + 1``; plain arithmetic, so symbolic sizes under torch.compile work too."""
    return pixels + pixels * (pixels - 1) // 2 + 1


def subset_indices(total: int, k: int) -> torch.Tensor:
    """The paper's reduced set: ``round(linspace(0, total - 1, k))``, increasing (int64)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"subset must be an int, got {type(k).__name__}")
    if not 1 <= k <= total:
        raise ValueError(f"subset must be between 1 and the number of templates {total}, got {k}")
    return torch.linspace(0, total - 1, k, dtype=torch.float64).round().long()


@functools.lru_cache(maxsize=32)
def template_matrix(height: int, width: int, radius: float, subset: int | None,
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Cached ``(N, H*W)`` unit-scaled template matrix; shared, so never modify it in place.

    Built from the ``P x P`` one-peak table: a two-peak row is the element-wise maximum of
    two one-peak rows, so building the full 14x14 set costs one gather, not a loop.
    """
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) radius may be a
    # SymFloat, which math.* cannot take; a NaN fails both.
    if not 0 < radius < math.inf:
        raise ValueError(f"radius must be a positive finite number, got {radius}")
    pixels = height * width
    total = num_templates(height, width)
    u = torch.arange(height, device=device, dtype=torch.float64).repeat_interleave(width)
    v = torch.arange(width, device=device, dtype=torch.float64).repeat(height)
    distance = torch.hypot(u[:, None] - u[None, :], v[:, None] - v[None, :])  # (peak, pixel)
    one_peak = (1 - distance / radius).clamp_min(-1)

    first, second = torch.triu_indices(pixels, pixels, offset=1, device=device)
    indices = (subset_indices(total, subset).to(device) if subset is not None
               else torch.arange(total, device=device))
    is_one = indices < pixels
    is_pair = (indices >= pixels) & (indices < total - 1)
    out = torch.full((indices.numel(), pixels), -1.0, device=device, dtype=torch.float64)
    out[is_one] = one_peak[indices[is_one]]
    pair = indices[is_pair] - pixels
    out[is_pair] = torch.maximum(one_peak[first[pair]], one_peak[second[pair]])
    return out.to(dtype).contiguous()


def make_templates(height: int, width: int | None = None, *, radius: float = 4.0,
                   subset: int | None = None, dtype: torch.dtype = torch.float32,
                   device=None) -> torch.Tensor:
    """The templates of docs/design.md section 1 as a fresh ``(N, height, width)`` tensor.

    Order: the ``P`` one-peak templates by peak pixel, the ``P(P-1)/2`` two-peak templates
    by peak pair ``(a, b)``, ``a < b``, lexicographically, then the all ``-1`` template.
    ``subset=k`` keeps the ``k`` evenly spaced ones the paper used (``k = 400``).
    """
    height, width = _check_size(height, width)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    matrix = template_matrix(height, width, float(radius), subset, device, dtype)
    return matrix.view(-1, height, width).clone()
