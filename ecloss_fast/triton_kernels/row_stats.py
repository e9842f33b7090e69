"""Forward sweep: per feature map, the maximum score, the log-sum and the negative entropy,
and for training the gradient of the negative entropy from the same exponentials."""
import triton
import triton.language as tl

from ._tiles import (LOG2E, accumulate_templates, load_chunks, load_template_chunks, scores,
                     slice_columns, store_accumulator, zero_accumulator)


@triton.jit
def row_stats_kernel(x_ptr, templates_ptr, row_max_ptr, log_sum_ptr, neg_entropy_ptr, grad_ptr,
                     M, N,
                     TAU: tl.constexpr, K: tl.constexpr, K0: tl.constexpr,
                     K1: tl.constexpr, K2: tl.constexpr,
                     OPERANDS: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr,
                     WITH_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DX_COLUMNS: tl.constexpr):
    """Online softmax over template tiles for ``BLOCK_M`` rows (program ``i``: rows ``i*BLOCK_M..``).

    Arguments:
        x_ptr: ``(M, K)`` feature maps, row stride ``K``, unit column stride; float16,
            bfloat16, float32 or float64.
        templates_ptr: ``(N', K0 + K1 + K2)`` templates of ``prepared_templates`` in the
            operand type, rows padded to whole ``BLOCK_N`` tiles.
        row_max_ptr, log_sum_ptr, neg_entropy_ptr: ``(M,)`` outputs in ``ACC``, unit stride.
        grad_ptr: ``(M, K)`` output ``neg_entropy_grad`` in ``ACC``, contiguous
            (``WITH_GRAD``; else unused).
        WITH_GRAD: also accumulate ``neg_entropy_grad`` (training); without it the kernel
            is the inference sweep, unchanged.
        DX_COLUMNS: with ``WITH_GRAD``, the width of the gradient slice a program keeps (a
            power of two; grid ``(cdiv(M, BLOCK_M), cdiv(K, DX_COLUMNS))``), 0 for all ``K``.
        TAU: the score scale ``tau``, a compile-time constant so that it is exact in
            float64 (a Python float argument would be passed as float32); a new
            value compiles the kernel once more.
        K0, K1, K2: chunk widths covering ``K`` (see ``_tiles``).
        INTERPRETED: the kernel runs in Triton's interpreter (see ``_tiles.scores``).

    Computes, with ``s = tau * x @ templates^T`` (``_tiles.scores``, natural units)::

        row_max     = max_t s_t
        log_sum     = log sum_t exp(s_t - row_max)
        neg_entropy = sum_t p_t (s_t - row_max) - log_sum,   p_t = exp(s_t - row_max - log_sum)

    Stability: the row keeps ``(m, l, a)`` over the templates seen so far, with ``m`` the
    running maximum of ``s``, ``l = sum e^(s - m)``, ``a = sum e^(s - m) (s - m)``. Every
    exponent is at most 0, so nothing overflows; when a new tile raises the maximum to
    ``m'`` both sums are rescaled by ``e^(m - m')`` and ``a`` also gains ``(m - m') l``. The
    shift ``s - m`` is formed in natural units from the rounded score and maximum, and
    only the exponent is scaled by ``log2(e)`` for ``exp2``, as every later sweep does. The
    maximum and the log-sum are stored apart: their sum, rounded, would not give back
    ``p`` that sum to 1 once ``m`` has an ulp near ``log l``. The entropy is formed from
    values relative to the maximum, never as the difference of two large numbers.

    ``WITH_GRAD`` adds, from the same weights ``e^(s - m)``, ``U = sum e^(s - m) T[t]`` and
    ``V = sum e^(s - m) (s - m) T[t]`` (``[BLOCK_M, K]``, rescaled like ``l`` and ``a``:
    ``U *= e^(m - m')``, ``V = e^(m - m') (V + (m - m') U)``) and writes
    ``neg_entropy_grad = tau (V - (a / l) U) / l = tau sum_t p ((s - m) - E) T[t]``. The
    products take the weights as ``input_grad_kernel`` does (``_tiles.accumulate_weighted``:
    rounded to bfloat16 for bfloat16 products, float32 for float16 ones). Where both
    accumulators do not fit whole (``DX_COLUMNS``), each slice's program repeats the whole
    score product and exponentials for its columns; only slice 0 stores the statistics
    (every slice computes them bitwise alike).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    x0, x1, x2 = load_chunks(x_ptr, rows * K, row_mask, K, K0, K1, K2, OPERANDS)

    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    exp_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    weighted_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    if WITH_GRAD:
        u0, u1, u2 = zero_accumulator(BLOCK_M, K0, K1, K2, DX_COLUMNS, ACC)
        v0, v1, v2 = zero_accumulator(BLOCK_M, K0, K1, K2, DX_COLUMNS, ACC)
        columns, column_mask = slice_columns(K, DX_COLUMNS)
    for start in range(0, N, BLOCK_N):
        templates = start + tl.arange(0, BLOCK_N).to(tl.int64)
        template_mask = templates < N
        t0, t1, t2 = load_template_chunks(templates_ptr, templates, K0, K1, K2, OPERANDS)
        s = scores(x0, x1, x2, t0, t1, t2, TAU, K1, K2, OPERANDS, ACC, INTERPRETED)
        s = tl.where(template_mask[None, :], s, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(s, axis=1))
        shifted = s - new_max[:, None]
        weights = tl.exp2(shifted * LOG2E)
        max_shift = running_max - new_max
        rescale = tl.exp2(max_shift * LOG2E)
        # (m - m') l is 0 * -inf before the first tile; exp_sum is 0 exactly then.
        gained = tl.where(exp_sum > 0, max_shift * exp_sum, 0.0)
        shifted_weights = tl.where(template_mask[None, :], weights * shifted, 0.0)
        weighted_sum = rescale * (weighted_sum + gained) + tl.sum(shifted_weights, axis=1)
        if WITH_GRAD:
            # Before the first tile U = V = 0 and (m - m') is -inf: no gain.
            gain = tl.where(exp_sum > 0, max_shift, 0.0)[:, None]
            scale = rescale[:, None]
            v0 = scale * (v0 + gain * u0)
            v1 = scale * (v1 + gain * u1)
            v2 = scale * (v2 + gain * u2)
            u0, u1, u2 = u0 * scale, u1 * scale, u2 * scale
            u0, u1, u2 = accumulate_templates(u0, u1, u2, weights, templates_ptr, templates,
                                              t0, t1, t2, columns, column_mask, K0, K1, K2,
                                              OPERANDS, DX_COLUMNS)
            v0, v1, v2 = accumulate_templates(v0, v1, v2, shifted_weights, templates_ptr,
                                              templates, t0, t1, t2, columns, column_mask, K0,
                                              K1, K2, OPERANDS, DX_COLUMNS)
        exp_sum = rescale * exp_sum + tl.sum(weights, axis=1)
        running_max = new_max

    log_sum = tl.log(exp_sum)
    stats_mask = row_mask
    if WITH_GRAD:
        mean_shift = (weighted_sum / exp_sum)[:, None]
        scale = (TAU / exp_sum)[:, None]
        store_accumulator(grad_ptr, rows * K, row_mask, (v0 - mean_shift * u0) * scale,
                          (v1 - mean_shift * u1) * scale, (v2 - mean_shift * u2) * scale,
                          columns, column_mask, K, K0, K1, K2, DX_COLUMNS)
        stats_mask = row_mask & (tl.program_id(1) == 0)
    tl.store(row_max_ptr + rows, running_max.to(ACC), mask=stats_mask)
    tl.store(log_sum_ptr + rows, log_sum.to(ACC), mask=stats_mask)
    tl.store(neg_entropy_ptr + rows, (weighted_sum / exp_sum - log_sum).to(ACC), mask=stats_mask)
