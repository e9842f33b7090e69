"""Activation templates of docs/design.md section 1: one-peak, two-peak and negative, in contract order."""
from __future__ import annotations

import functools
import math

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["num_templates", "count_for_pixels", "make_templates", "template_matrix",
           "subset_indices", "prepared_templates"]


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


# Source matrix -> (its version, {(dtype, padded K, row multiple): prepared copy}); an entry
# goes with its source (weak keys, by identity).
_PREPARED = WeakIdKeyDictionary()


def prepared_templates(templates: torch.Tensor, dtype: torch.dtype, padded_k: int,
                       row_multiple: int) -> torch.Tensor:
    """The ``(N, K)`` template matrix as a kernel streams it: cast, zero-padded, cached.

    Returns a contiguous ``(N', padded_k)`` tensor on ``templates``' device, in ``dtype``
    (the operand type of the matrix unit: bfloat16 or float16 for half products, else the
    accumulation dtype), where ``N' = ceil(N / row_multiple) * row_multiple``:

    * columns ``K .. padded_k`` are 0, so a row is a whole number of 16-byte vectors when
      ``padded_k * itemsize`` is a multiple of 16 (the Triton backend pads to its ``K``
      chunks' total, 196 -> 208), and a kernel loads whole chunks without a column mask
      (the products over padded columns are ``x * 0``; ``x`` itself is loaded masked at
      ``K`` or padded likewise);
    * rows ``N .. N'`` are 0, so every tile of ``row_multiple`` templates lies inside the
      buffer and loads without a row mask. Those rows are not templates: a kernel must
      still exclude them from every sum over templates (their score is 0, not -inf), e.g.
      by a score of -inf or a weight of 0 for ``t >= N``.

    Cached per source tensor (object and ``_version``; an in-place change makes a new copy),
    ``dtype``, ``padded_k`` and ``row_multiple``, for as long as the source lives: the
    matrices of ``template_matrix`` (one per map size, radius, subset, device and dtype)
    are themselves cached, so each is converted once. Never modify the result in place.
    """
    if templates.dim() != 2:
        raise ValueError(f"templates must be (N, K), got shape {tuple(templates.shape)}")
    count, k = templates.shape
    if padded_k < k or row_multiple < 1:
        raise ValueError(f"padded_k must be at least K = {k} and row_multiple at least 1, "
                         f"got {padded_k} and {row_multiple}")
    # Inference tensors keep no version counter (and cannot change outside inference mode).
    version = 0 if templates.is_inference() else templates._version
    entry = _PREPARED.get(templates)
    if entry is None or entry[0] != version:
        entry = _PREPARED[templates] = (version, {})  # new, or the source changed in place
    copies = entry[1]
    key = (dtype, padded_k, row_multiple)
    if key not in copies:
        rows = -(-count // row_multiple) * row_multiple
        prepared = torch.zeros(rows, padded_k, device=templates.device, dtype=dtype)
        prepared[:count, :k] = templates
        copies[key] = prepared
    return copies[key]
