"""Forward sweep: per feature map, the maximum score, the log-sum and the negative entropy."""
import triton
import triton.language as tl

from ._tiles import load_chunks, load_template_chunks, scores

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def row_stats_kernel(x_ptr, templates_ptr, row_max_ptr, log_sum_ptr, neg_entropy_ptr, M, N,
                     TAU: tl.constexpr, K: tl.constexpr, K0: tl.constexpr,
                     K1: tl.constexpr, K2: tl.constexpr,
                     OPERANDS: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over template tiles for ``BLOCK_M`` rows (program ``i``: rows ``i*BLOCK_M..``).

    Arguments:
        x_ptr: ``(M, K)`` feature maps, row stride ``K``, unit column stride; float16,
            bfloat16, float32 or float64.
        templates_ptr: ``(N', K0 + K1 + K2)`` templates of ``prepared_templates`` in the
            operand type, rows padded to whole ``BLOCK_N`` tiles.
        row_max_ptr, log_sum_ptr, neg_entropy_ptr: ``(M,)`` outputs in ``ACC``, unit stride.
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
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    x0, x1, x2 = load_chunks(x_ptr, rows * K, row_mask, K, K0, K1, K2, OPERANDS)

    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    exp_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    weighted_sum = tl.zeros((BLOCK_M,), dtype=ACC)
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
        weighted_sum = rescale * (weighted_sum + gained) + tl.sum(
            tl.where(template_mask[None, :], weights * shifted, 0.0), axis=1)
        exp_sum = rescale * exp_sum + tl.sum(weights, axis=1)
        running_max = new_max

    log_sum = tl.log(exp_sum)
    tl.store(row_max_ptr + rows, running_max.to(ACC), mask=row_mask)
    tl.store(log_sum_ptr + rows, log_sum.to(ACC), mask=row_mask)
    tl.store(neg_entropy_ptr + rows, (weighted_sum / exp_sum - log_sum).to(ACC), mask=row_mask)
