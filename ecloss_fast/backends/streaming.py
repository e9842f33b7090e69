"""Backend ``torch``: streaming ECLoss in plain PyTorch, on any device.

It walks the templates in chunks sized so that a ``rows x chunk`` score block stays near
``_CHUNK_ELEMENTS``, keeps the online-softmax state per row, and recomputes the scores in
the backward pass, so nothing of size ``B x C x N`` is allocated. It is the fused
kernels' algorithm written with library GEMMs, for the contract of docs/design.md section 9.
"""
from __future__ import annotations

import contextlib

import torch

from ecloss_fast._precision import HALF_OPERAND_DTYPES

__all__ = ["availability", "supports", "row_stats", "row_stats_with_grad", "column_sums",
           "input_grad", "TAKES"]

# 1 MB of float32 per score block: GEMMs of (rows x 196) @ (196 x chunk) stay efficient
# while the streaming peak stays a few percent of the reference's B x C x N tensor
# (tests/test_memory.py measures it).
_CHUNK_ELEMENTS = 1 << 18
_MIN_CHUNK = 32


def availability() -> str | None:
    return None


TAKES = "floating maps of any size on any device"


def supports(device: torch.device, dtype: torch.dtype, pixels: int) -> bool:
    return True


def _chunks(num_rows: int, num_templates: int):
    width = max(_MIN_CHUNK, _CHUNK_ELEMENTS // max(num_rows, 1))
    for start in range(0, num_templates, width):
        yield slice(start, min(start + width, num_templates))


# Half-precision products are emulated exactly (operands rounded, float32 GEMM: a product of
# two bfloat16 or two float16 values is exact in float32), so they need full float32 GEMMs.
_GEMM_SETTING = {"ieee": "highest", "tf32": "high", "bf16": "highest", "fp16": "highest"}


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
    half = HALF_OPERAND_DTYPES.get(precision)
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
    return _online_sweep(x, templates, tau, precision, with_grad=False)


def row_stats_with_grad(x, templates, tau, precision):
    return _online_sweep(x, templates, tau, precision, with_grad=True)


def _online_sweep(x, templates, tau, precision, with_grad):
    """``row_stats``, and with ``with_grad`` ``neg_entropy_grad`` from the same exponentials."""
    batch, channels, pixels = x.shape
    rows, templates = _operands(x, templates, precision)
    running_max = sum_exp = sum_exp_shifted = weighted = weighted_shifted = None
    with _matmul_precision(precision):
        for chunk in _chunks(rows.shape[0], templates.shape[0]):
            scores = _scores(rows, templates, chunk, tau)
            chunk_max = scores.amax(dim=1)
            if running_max is None:
                new_max = chunk_max
                sum_exp = torch.zeros_like(chunk_max)
                sum_exp_shifted = torch.zeros_like(chunk_max)
                if with_grad:
                    weighted = torch.zeros_like(rows)
                    weighted_shifted = torch.zeros_like(rows)
            else:
                # Rescale every sum of e^(s-m) and of e^(s-m)(s-m) from the old max m to m'.
                new_max = torch.maximum(running_max, chunk_max)
                shift = running_max - new_max
                decay = shift.exp()
                sum_exp_shifted = decay * (sum_exp_shifted + shift * sum_exp)
                sum_exp = decay * sum_exp
                if with_grad:
                    weighted_shifted.addcmul_(weighted, shift[:, None]).mul_(decay[:, None])
                    weighted.mul_(decay[:, None])
            shifted = scores.sub_(new_max[:, None])
            weights = shifted.exp()
            sum_exp += weights.sum(dim=1)
            if with_grad:
                block = templates[chunk]
                weighted.addmm_(_as_operand(weights, precision), block)
                weights.mul_(shifted)
                weighted_shifted.addmm_(_as_operand(weights, precision), block)
                sum_exp_shifted += weights.sum(dim=1)
            else:
                sum_exp_shifted += weights.mul_(shifted).sum(dim=1)
            running_max = new_max
    log_sum = sum_exp.log()
    mean_shift = sum_exp_shifted / sum_exp
    neg_entropy = mean_shift - log_sum
    statistics = (running_max.view(batch, channels), log_sum.view(batch, channels),
                  neg_entropy.view(batch, channels))
    if not with_grad:
        return statistics
    # tau (V - (a / l) U) / l: both sums shifted by the maximum, so a peaked row's best
    # template adds nothing to V or a and the difference does not cancel.
    grad = weighted_shifted.sub_(weighted.mul_(mean_shift[:, None])).div_(sum_exp[:, None])
    return (*statistics, grad.mul_(tau).view(batch, channels, pixels))


def _as_operand(weights, precision):
    """Score-gradient weights as the matrix units take them: rounded to bfloat16 for ``bf16``.

    Not for ``fp16``: a float16 weight underflows (``p * 1e-3`` near a uniform softmax), so
    float32 weights stay.
    """
    if precision == "bf16" and weights.dtype == torch.float32:
        return weights.bfloat16().float()
    return weights


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
            grad = _prior_input_grad(rows, templates, tau, row_max, log_sum, weight, prior,
                                     batch, channels, precision)
        else:
            # ds = w p ((s - m) - E), E = sum p (s - m) = neg_entropy + log_sum.
            offset = (neg_entropy + log_sum.view_as(neg_entropy)).reshape(-1, 1)
            grad = torch.zeros_like(rows)
            for chunk in _chunks(rows.shape[0], templates.shape[0]):
                shifted = _shifted_scores(rows, templates, chunk, tau, row_max)
                p = (shifted - log_sum).exp_()
                grad_scores = p.mul_(shifted.sub_(offset)).mul_(weight)
                grad.addmm_(_as_operand(grad_scores, precision), templates[chunk])
    return grad.mul_(tau).view(batch, channels, pixels).to(x.dtype)


def _prior_input_grad(rows, templates, tau, row_max, log_sum, weight, prior, batch, channels,
                      precision):
    """``sum_k p_k (z_k - D) T[k]`` in one sweep, ``z = w log p - prior``, ``D`` its p-mean.

    Accumulates ``U = sum p T`` and ``Z = sum p (z - c) T`` about a reference ``c``: the
    mean of ``z`` over the templates seen so far, moved after every chunk
    (``c' = c + sum p (z - c) / sum p``, ``Z += (c - c') U``), so ``Z`` holds only what
    differs from that mean and nothing large cancels at the end; ``Z`` after the last chunk
    is the answer (``D = c``). ``D`` is over the recomputed mass (1 in exact arithmetic), so
    a row's weights sum to 0.
    """
    num_rows = rows.shape[0]
    weighted = torch.zeros_like(rows)
    centred = torch.zeros_like(rows)
    mass = rows.new_zeros(num_rows)
    reference = rows.new_zeros(num_rows)
    for chunk in _chunks(num_rows, templates.shape[0]):
        log_p = _log_probabilities(rows, templates, chunk, tau, row_max, log_sum)
        terms = (log_p * weight).view(batch, channels, -1).sub_(prior[None, :, chunk])
        p = log_p.exp_()
        terms = terms.view(num_rows, -1).sub_(reference[:, None]).mul_(p)
        block = templates[chunk]
        weighted.addmm_(_as_operand(p, precision), block)
        centred.addmm_(_as_operand(terms, precision), block)
        mass += p.sum(dim=1)
        # A row whose mass so far underflowed to 0 keeps its reference (its sums are 0).
        step = torch.where(mass > 0, terms.sum(dim=1) / mass, 0.0)
        centred.sub_(weighted * step[:, None])
        reference += step
    return centred
