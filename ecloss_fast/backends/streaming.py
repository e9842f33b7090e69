"""Backend ``torch``: streaming ECLoss in plain PyTorch, on any device.

It walks tiles of the scores, blocks of whole maps by chunks of templates (``_tiles``),
keeps the online-softmax state per row, and recomputes the scores in the backward pass, so
nothing of size ``B x C x N`` is allocated. It is the fused kernels' algorithm written with
library GEMMs, for the contract of docs/design.md section 9.
"""
from __future__ import annotations

import contextlib

import torch

from ecloss_fast._precision import HALF_OPERAND_DTYPES

__all__ = ["availability", "supports", "row_stats", "row_stats_with_grad", "column_sums",
           "input_grad", "TAKES"]

# Tile sizes in bytes of the accumulation dtype: a tile of scores (and each transform of it
# that a sweep holds) and a block's rows x K sums (U and V, U and Z) hold at most
# _TILE_BYTES, or 1/_TILE_FRACTION of one B x C x N score tensor where that is more. So a
# small problem runs in one block (B=8, C=64, 14x14: 401 KB of sums, chunks of 256
# templates, as fast as 512 within the noise of a 1-thread A/B, while two blocks of half the
# maps cost 15%), and a large one's sweep memory is about 0.3% of that tensor: beside the
# B x C x K gradient and the marginal's two C x N matrices (pbar, the prior; 1/B of it
# each), 4.2% at B=64, it stays under the 5% that tests/test_memory.py asserts.
_TILE_BYTES = 1 << 19
_TILE_FRACTION = 1024
_MIN_CHUNK = 32


def availability() -> str | None:
    return None


TAKES = "floating maps of any size on any device"


def supports(device: torch.device, dtype: torch.dtype, pixels: int) -> bool:
    return True


def _tiles(batch: int, channels: int, pixels: int, num_templates: int, itemsize: int):
    """``[(maps, rows, chunks)]``: the blocks of whole maps (slices of the batch and of the
    ``B*C`` rows) and each block's template chunks, the tiles every sweep walks.

    Every sweep walks the same tiles of the same operands, so the scores a sweep recomputes
    are bitwise those that gave ``row_max``: the same GEMM shapes, then one ``* tau`` (at
    float32 scores near 1e7 one ulp is about 1, so anything else would move ``p`` by a
    factor ``e``).
    """
    rows = batch * channels
    budget = max(_TILE_BYTES, rows * num_templates * itemsize // _TILE_FRACTION) // itemsize
    maps = max(1, min(batch, budget // max(1, channels * pixels)))
    tiles = []
    for first in range(0, batch, maps):
        last = min(first + maps, batch)
        width = max(_MIN_CHUNK, budget // max(1, (last - first) * channels))
        tiles.append((slice(first, last), slice(first * channels, last * channels),
                      [slice(start, min(start + width, num_templates))
                       for start in range(0, num_templates, width)]))
    return tiles


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
    """Scores of one tile, rounded as in every sweep (``_tiles``): ``rows`` is a block's."""
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


def _tiles_of(x, templates):
    batch, channels, pixels = x.shape
    return _tiles(batch, channels, pixels, templates.shape[0], templates.element_size())


def _online_sweep(x, templates, tau, precision, with_grad):
    """``row_stats``, and with ``with_grad`` ``neg_entropy_grad`` from the same exponentials."""
    batch, channels, pixels = x.shape
    rows, templates = _operands(x, templates, precision)
    running_max, sum_exp, sum_exp_shifted = (rows.new_empty(rows.shape[0]) for _ in range(3))
    tiles = _tiles_of(x, templates)
    grad = torch.empty_like(rows) if with_grad and len(tiles) > 1 else None
    with _matmul_precision(precision):
        for _, block, chunks in tiles:
            state = _online_block(rows[block], templates, chunks, tau, precision, with_grad)
            running_max[block], sum_exp[block], sum_exp_shifted[block] = state[:3]
            if with_grad:
                # tau (V - (a / l) U) / l: both sums shifted by the maximum, so a peaked
                # row's best template adds nothing to V or a and the difference does not
                # cancel.
                weighted, weighted_shifted = state[3:]
                mean_shift = state[2] / state[1]
                block_grad = weighted_shifted.sub_(weighted.mul_(mean_shift[:, None]))
                block_grad.div_(state[1][:, None])
                if grad is None:  # one block: its sums are the whole gradient
                    grad = block_grad
                else:
                    grad[block] = block_grad
    log_sum = sum_exp.log()
    neg_entropy = sum_exp_shifted / sum_exp - log_sum
    statistics = (running_max.view(batch, channels), log_sum.view(batch, channels),
                  neg_entropy.view(batch, channels))
    if not with_grad:
        return statistics
    return (*statistics, grad.mul_(tau).view(batch, channels, pixels))


def _online_block(rows, templates, chunks, tau, precision, with_grad):
    """One block's ``(max, sum e^(s-m), sum e^(s-m)(s-m))`` over its template chunks, and with
    ``with_grad`` ``U = sum e^(s-m) T`` and ``V = sum e^(s-m)(s-m) T``."""
    running_max = sum_exp = sum_exp_shifted = weighted = weighted_shifted = None
    for chunk in chunks:
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
    if with_grad:
        return running_max, sum_exp, sum_exp_shifted, weighted, weighted_shifted
    return running_max, sum_exp, sum_exp_shifted


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
    sums = torch.zeros(channels, templates.shape[0], dtype=templates.dtype, device=x.device)
    row_max, log_sum = row_max.reshape(-1, 1), log_sum.reshape(-1, 1)
    with _matmul_precision(precision):
        for maps, block, chunks in _tiles_of(x, templates):
            for chunk in chunks:
                p = _log_probabilities(rows[block], templates, chunk, tau, row_max[block],
                                       log_sum[block]).exp_()
                sums[:, chunk] += p.view(maps.stop - maps.start, channels, -1).sum(dim=0)
    return sums


def input_grad(x, templates, tau, row_max, log_sum, neg_entropy, prior, row_weight, precision):
    batch, channels, pixels = x.shape
    rows, templates = _operands(x, templates, precision)
    row_max, log_sum = row_max.reshape(-1, 1), log_sum.reshape(-1, 1)
    weight = row_weight.reshape(-1, 1).to(rows.dtype)
    # ds = w p ((s - m) - E), E = sum p (s - m) = neg_entropy + log_sum.
    offset = (neg_entropy + log_sum.view_as(neg_entropy)).reshape(-1, 1)
    grad = torch.zeros_like(rows)
    with _matmul_precision(precision):
        for maps, block, chunks in _tiles_of(x, templates):
            if prior is not None:
                _prior_input_grad(rows[block], templates, chunks, tau, row_max[block],
                                  log_sum[block], weight[block], prior,
                                  maps.stop - maps.start, channels, precision, grad[block])
                continue
            for chunk in chunks:
                shifted = _shifted_scores(rows[block], templates, chunk, tau, row_max[block])
                p = (shifted - log_sum[block]).exp_()
                grad_scores = p.mul_(shifted.sub_(offset[block])).mul_(weight[block])
                grad[block].addmm_(_as_operand(grad_scores, precision), templates[chunk])
    return grad.mul_(tau).view(batch, channels, pixels).to(x.dtype)


def _prior_input_grad(rows, templates, chunks, tau, row_max, log_sum, weight, prior, batch,
                      channels, precision, centred):
    """``sum_k p_k (z_k - D) T[k]`` in one sweep into ``centred`` (zeros; one block's rows),
    ``z = w log p - prior``, ``D`` its p-mean.

    Accumulates ``U = sum p T`` and ``Z = sum p (z - c) T`` about a reference ``c``: the
    mean of ``z`` over the templates seen so far, moved after every chunk
    (``c' = c + sum p (z - c) / sum p``, ``Z += (c - c') U``), so ``Z`` holds only what
    differs from that mean and nothing large cancels at the end; ``Z`` after the last chunk
    is the answer (``D = c``). ``D`` is over the recomputed mass (1 in exact arithmetic), so
    a row's weights sum to 0.
    """
    num_rows = rows.shape[0]
    weighted = torch.zeros_like(rows)
    mass = rows.new_zeros(num_rows)
    reference = rows.new_zeros(num_rows)
    for chunk in chunks:
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
        centred.addcmul_(weighted, step[:, None], value=-1)  # in place: no rows x K copy
        reference += step
