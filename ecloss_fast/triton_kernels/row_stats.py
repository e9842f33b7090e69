"""Forward sweep: per feature map, the log-partition and the negative entropy of the softmax."""
import triton
import triton.language as tl

from ._tiles import load_chunks, products

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def row_stats_kernel(x_ptr, templates_ptr, lse_ptr, neg_entropy_ptr, M, N,
                     TAU: tl.constexpr, K: tl.constexpr, K0: tl.constexpr,
                     K1: tl.constexpr, K2: tl.constexpr,
                     OPERANDS: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over template tiles for ``BLOCK_M`` rows (program ``i``: rows ``i*BLOCK_M..``).

    Arguments:
        x_ptr: ``(M, K)`` feature maps, row stride ``K``, unit column stride; float16,
            bfloat16, float32 or float64.
        templates_ptr: ``(N, K)`` unit-scaled templates, row stride ``K``; float32 (or
            bfloat16 when ``OPERANDS`` is ``"bf16"``, float64 for ``"fp64"``).
        lse_ptr, neg_entropy_ptr: ``(M,)`` outputs in ``ACC``, unit stride.
        TAU: the score scale ``tau``, a compile-time constant so that it is exact in
            float64 (a Python float argument would be passed as float32); a new
            value compiles the kernel once more.
        K0, K1, K2: chunk widths covering ``K`` (see ``_tiles``).

    Computes, with ``s = tau * x @ templates^T`` and ``p = softmax(s)`` over templates::

        lse         = log sum_t exp(s_t)
        neg_entropy = sum_t p_t (s_t - lse)

    Stability: the row keeps ``(m, l, a)`` in base 2 over the templates seen so far, with
    ``m`` the running maximum of ``s2``, ``l = sum 2^(s2 - m)``, ``a = sum 2^(s2 - m) (s2 - m)``.
    Every exponent is at most 0, so nothing overflows; when a new tile raises the maximum
    to ``m'`` both sums are rescaled by ``2^(m - m')`` and ``a`` also gains ``(m - m') l``.
    At the end ``lse = ln2 (m + log2 l)`` and ``neg_entropy = ln2 (a / l - log2 l)``: the
    entropy is formed from values relative to the maximum, never as the difference
    ``sum p s - lse`` of two large numbers.
    """
    SCALE2: tl.constexpr = TAU * LOG2E  # s2 = SCALE2 * x.T is the score in base 2
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    x0, x1, x2 = load_chunks(x_ptr, rows * K, row_mask, K, K0, K1, K2, OPERANDS)

    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    exp_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    weighted_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, N, BLOCK_N):
        templates = start + tl.arange(0, BLOCK_N).to(tl.int64)
        template_mask = templates < N
        t0, t1, t2 = load_chunks(templates_ptr, templates * K, template_mask, K, K0, K1, K2,
                                 OPERANDS)
        s2 = products(x0, x1, x2, t0, t1, t2, K1, K2, OPERANDS, ACC) * SCALE2
        s2 = tl.where(template_mask[None, :], s2, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(s2, axis=1))
        shifted = s2 - new_max[:, None]
        weights = tl.exp2(shifted)
        rescale = tl.exp2(running_max - new_max)
        # (m - m') l is 0 * -inf before the first tile; exp_sum is 0 exactly then.
        max_shift = tl.where(exp_sum > 0, (running_max - new_max) * exp_sum, 0.0)
        weighted_sum = rescale * (weighted_sum + max_shift) + tl.sum(
            tl.where(template_mask[None, :], weights * shifted, 0.0), axis=1)
        exp_sum = rescale * exp_sum + tl.sum(weights, axis=1)
        running_max = new_max

    log2_sum = tl.log2(exp_sum)
    tl.store(lse_ptr + rows, ((running_max + log2_sum) * LN2).to(ACC), mask=row_mask)
    tl.store(neg_entropy_ptr + rows, ((weighted_sum / exp_sum - log2_sum) * LN2).to(ACC),
             mask=row_mask)
