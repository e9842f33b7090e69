"""ECLoss (uniform estimator) through PyTorch's fused attention: the baseline a user could write.

docs/design.md section 6: with scores ``s = tau * x T^T`` the uniform loss only needs, per row,
``lse = log sum_t exp s`` and ``sum_t p s = tau * <x, softmax(s) T>``, i.e. attention with
queries ``x``, keys and values the templates, and scale ``tau``::

    H[b,c]    = lse[b,c] - tau * <x[b,c], O[b,c]>          O = softmax(s) T   (entropy)
    loss[c]   = mean_b H[b,c] - log N                       (= -MI[c], docs/design.md section 2)

Attention never materialises the ``M x N`` scores, but it pays for what ECLoss does not
need: the ``P V`` product in forward and ``dK, dV`` in backward.

Gradient: the fused ops do not differentiate their logsumexp output. None is needed:
``d lse / dx = tau * O`` cancels the direct term of ``d(tau <x, O>)/dx = tau * O + tau *
(dO/dx)^T x``, so ``H = lse.detach() - tau * <x.detach(), O>`` has the value and the exact
gradient of the entropy (an envelope-theorem identity).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["sdpa_ecloss", "HEAD_DIM_MULTIPLE", "KERNELS"]

KERNELS = ("efficient", "flash")

# The memory-efficient CUDA kernel wants the head dimension aligned to 8 elements (16 bytes
# of bfloat16); zero columns in queries and keys change no dot product.
HEAD_DIM_MULTIPLE = 8


def _attention_with_lse(query, key, value, scale, kernel):
    """``(O, lse)`` of one attention head: ``(1, 1, M, E)`` in, ``(M, E)`` and ``(M,)`` out."""
    rows = query.shape[2]
    if not query.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, scale=scale)
    elif kernel == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, True, scale=scale)[:2]
    # The memory-efficient kernel pads the logsumexp's query dimension to a multiple of 32.
    return out[0, 0], lse[0, 0, :rows]


def sdpa_ecloss(x: torch.Tensor, templates: torch.Tensor, *, tau: float = 1e-3,
                reduction: str = "mean", kernel: str = "efficient") -> torch.Tensor:
    """The uniform-estimator ECLoss of ``x`` ``(B, C, H, W)`` and ``templates`` ``(N, H, W)``.

    Runs in ``x``'s dtype (the templates are cast to it; the CUDA route takes float16,
    bfloat16 and float32, the CPU route float64 too); the loss is float32 (float64 for
    float64 input). ``reduction``
    is ``"mean"`` or ``"sum"`` over channels or ``"none"`` for the ``(C,)`` vector.
    ``kernel`` picks PyTorch's CUDA attention kernel: ``"efficient"`` (memory-efficient,
    float32 too) or ``"flash"`` (FlashAttention-2, float16 and bfloat16 only); on the CPU
    both use PyTorch's fused CPU kernel.
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W); got {tuple(x.shape)}")
    if templates.dim() != 3 or templates.shape[1:] != x.shape[2:]:
        raise ValueError(f"templates must have shape (N, {x.shape[2]}, {x.shape[3]}); "
                         f"got {tuple(templates.shape)}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    batch, channels, height, width = x.shape
    pixels, count = height * width, templates.shape[0]
    pad = -pixels % HEAD_DIM_MULTIPLE

    rows = F.pad(x.reshape(1, 1, batch * channels, pixels), (0, pad))
    keys = F.pad(templates.detach().to(x.device, x.dtype).reshape(1, 1, count, pixels), (0, pad))
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    weighted_templates, lse = _attention_with_lse(rows, keys, keys, tau, kernel)
    # Envelope identity (module docstring): detach lse and x, keep the path through O.
    expected_score = tau * (rows[0, 0].detach().to(accumulate)
                            * weighted_templates.to(accumulate)).sum(-1)
    entropy = (lse.detach().to(accumulate) - expected_score).view(batch, channels)
    per_channel = entropy.mean(0) - math.log(count)
    if reduction == "mean":
        return per_channel.mean()
    if reduction == "sum":
        return per_channel.sum()
    return per_channel
