"""Backend ``torch``: streaming ECLoss in plain PyTorch, on any device.

It walks the templates in chunks sized so that a ``rows x chunk`` score block stays near
``_CHUNK_ELEMENTS``, keeps the online-softmax state per row, and recomputes the scores in
the backward pass, so nothing of size ``B x C x N`` is allocated. It is the fused
kernels' algorithm written with library GEMMs; see ``ecloss_fast.backends`` for the contract.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["availability", "supports", "row_stats", "column_sums", "input_grad"]

# 1 MB of float32 per score block: GEMMs of (rows x 196) @ (196 x chunk) stay efficient
# while the streaming peak stays a few percent of the reference's B x C x N tensor
# (tests/test_memory.py measures it).
_CHUNK_ELEMENTS = 1 << 18
_MIN_CHUNK = 32


def availability() -> str | None:
    return None


def supports(device: torch.device) -> bool:
    return True


def _chunks(num_rows: int, num_templates: int):
    width = max(_MIN_CHUNK, _CHUNK_ELEMENTS // max(num_rows, 1))
    for start in range(0, num_templates, width):
        yield slice(start, min(start + width, num_templates))


# Half-precision products are emulated exactly (operands rounded, float32 GEMM: a product of
# two bfloat16 or two float16 values is exact in float32), so they need full float32 GEMMs.
_GEMM_SETTING = {"ieee": "highest", "tf32": "high", "bf16": "highest", "fp16": "highest"}
_HALF_OPERANDS = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def _matmul_precision(precision: str):
    """PyTorch's own switch set for the asked precision and restored, whatever it was before.

    Without this a global ``set_float32_matmul_precision("high")`` would make an explicit
    ``precision="ieee"`` run in TF32 on CUDA.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(_GEMM_SETTING[precision])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _operands(x: torch.Tensor, templates: torch.Tensor, precision: str):
    """Rows ``(B*C, K)`` and templates in the accumulation dtype, rounded for ``bf16``/``fp16``."""
    rows = x.reshape(-1, x.shape[-1]).to(templates.dtype)
    half = _HALF_OPERANDS.get(precision)
    if half is not None and templates.dtype == torch.float32:
        return rows.to(half).float(), templates.to(half).float()
    return rows, templates


def _scores(rows, templates, chunk, tau):
    """Scores of one chunk, rounded as in every sweep: the same GEMM shapes, then one ``* tau``.

    Every sweep walks the same ``_chunks`` of the same operands, so the scores it
    recomputes are bitwise those that gave ``row_max``; at float32 scores near 1e7 one ulp
    is about 1, so anything else would move ``p`` by a factor ``e``.
    """
    return torch.mm(rows, templates[chunk].t()).mul_(tau)


def _shifted_scores(rows, templates, chunk, tau, row_max):
    """``s - row_max`` of one chunk, from the rounded scores and the rounded maximum."""
    return _scores(rows, templates, chunk, tau).sub_(row_max)


def _log_probabilities(rows, templates, chunk, tau, row_max, log_sum):
    """``log p = (s - row_max) - log_sum`` of one chunk, ``p`` as ``row_stats`` normalised it."""
    return _shifted_scores(rows, templates, chunk, tau, row_max).sub_(log_sum)


def row_stats(x, templates, tau, precision):
    batch, channels, _ = x.shape
    rows, templates = _operands(x, templates, precision)
    running_max = sum_exp = sum_exp_shifted = None
    with _matmul_precision(precision):
        for chunk in _chunks(rows.shape[0], templates.shape[0]):
            scores = _scores(rows, templates, chunk, tau)
            chunk_max = scores.amax(dim=1)
            if running_max is None:
                new_max = chunk_max
                sum_exp = torch.zeros_like(chunk_max)
                sum_exp_shifted = torch.zeros_like(chunk_max)
            else:
                # Rescale sum e^(s-m) and sum e^(s-m)(s-m) from the old max m to m'.
                new_max = torch.maximum(running_max, chunk_max)
                shift = running_max - new_max
                decay = shift.exp()
                sum_exp_shifted = decay * (sum_exp_shifted + shift * sum_exp)
                sum_exp = decay * sum_exp
            shifted = scores.sub_(new_max[:, None])
            weights = shifted.exp()
            sum_exp += weights.sum(dim=1)
            sum_exp_shifted += weights.mul_(shifted).sum(dim=1)
            running_max = new_max
    log_sum = sum_exp.log()
    neg_entropy = sum_exp_shifted / sum_exp - log_sum
    return (running_max.view(batch, channels), log_sum.view(batch, channels),
            neg_entropy.view(batch, channels))


def column_sums(x, templates, tau, row_max, log_sum, precision):
    batch, channels, _ = x.shape
    rows, templates = _operands(x, templates, precision)
    sums = torch.empty(channels, templates.shape[0], dtype=templates.dtype, device=x.device)
    row_max, log_sum = row_max.reshape(-1, 1), log_sum.reshape(-1, 1)
    with _matmul_precision(precision):
        for chunk in _chunks(rows.shape[0], templates.shape[0]):
            p = _log_probabilities(rows, templates, chunk, tau, row_max, log_sum).exp_()
            sums[:, chunk] = p.view(batch, channels, -1).sum(dim=0)
    return sums


def input_grad(x, templates, tau, row_max, log_sum, neg_entropy, prior, row_weight, precision):
    batch, channels, pixels = x.shape
    rows, templates = _operands(x, templates, precision)
    row_max, log_sum = row_max.reshape(-1, 1), log_sum.reshape(-1, 1)
    weight = row_weight.reshape(-1, 1).to(rows.dtype)
    with _matmul_precision(precision):
        if prior is not None:
            # ds = p (w log p - prior - D), D = sum p (w log p - prior) / sum p: the
            # contract's row-prior sweep. Over the recomputed mass (1 in exact arithmetic),
            # so that the weights of a row sum to 0 to rounding.
            divergence = torch.zeros(batch, channels, dtype=rows.dtype, device=x.device)
            mass = torch.zeros_like(divergence)
            for chunk in _chunks(rows.shape[0], templates.shape[0]):
                p, factor = _prior_terms(rows, templates, chunk, tau, row_max, log_sum, weight,
                                         prior, batch, channels)
                divergence += factor.mul_(p).sum(-1)
                mass += p.sum(-1)
            offset = (divergence / mass)[..., None]
        else:
            # ds = w p ((s - m) - E), E = sum p (s - m) = neg_entropy + log_sum.
            offset = (neg_entropy + log_sum.view_as(neg_entropy)).reshape(-1, 1)
        grad = torch.zeros_like(rows)
        for chunk in _chunks(rows.shape[0], templates.shape[0]):
            if prior is None:
                shifted = _shifted_scores(rows, templates, chunk, tau, row_max)
                p = (shifted - log_sum).exp_()
                grad_scores = p.mul_(shifted.sub_(offset)).mul_(weight)
            else:
                p, factor = _prior_terms(rows, templates, chunk, tau, row_max, log_sum, weight,
                                         prior, batch, channels)
                grad_scores = p.mul_(factor.sub_(offset)).view(rows.shape[0], -1)
            if precision == "bf16" and grad_scores.dtype == torch.float32:
                # As the bfloat16 matrix units take them. Not for fp16: a float16 weight
                # underflows (p * 1e-3 near a uniform softmax), so float32 weights stay.
                grad_scores = grad_scores.bfloat16().float()
            grad.addmm_(grad_scores, templates[chunk])
    return grad.mul_(tau).view(batch, channels, pixels).to(x.dtype)


def _prior_terms(rows, templates, chunk, tau, row_max, log_sum, weight, prior, batch, channels):
    """``p`` and ``w log p - prior`` of one chunk, each ``(B, C, chunk)``."""
    log_p = _log_probabilities(rows, templates, chunk, tau, row_max, log_sum)
    p = log_p.exp().view(batch, channels, -1)
    factor = log_p.mul_(weight).view_as(p).sub_(prior[None, :, chunk])
    return p, factor
