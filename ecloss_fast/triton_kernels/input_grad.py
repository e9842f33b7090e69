"""Backward sweep: ``dx`` of ECLoss, scores recomputed, accumulated in registers."""
import triton
import triton.language as tl

from ._tiles import accumulate_weighted, load_chunks, products, row_coordinates, store_chunks

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def input_grad_kernel(x_ptr, templates_ptr, lse_ptr, neg_entropy_ptr, log_q_ptr, prior_ptr,
                      row_weight_ptr, dx_ptr, B, C, N,
                      TAU: tl.constexpr, K: tl.constexpr, K0: tl.constexpr,
                      K1: tl.constexpr, K2: tl.constexpr,
                      OPERANDS: tl.constexpr, ACC: tl.constexpr, HAS_PRIOR: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``dx`` for ``BLOCK_M`` rows: one sweep, two products per template tile.

    Arguments:
        x_ptr: ``(B, C, K)`` feature maps, contiguous; also the dtype of ``dx``.
        templates_ptr: ``(N, K)`` templates, row stride ``K``.
        lse_ptr, neg_entropy_ptr: ``(B, C)`` row statistics from ``row_stats``, ``ACC``.
        log_q_ptr: ``(C, N)`` log prior (``HAS_PRIOR``; else unused), ``ACC``, contiguous.
        prior_ptr: ``(B, C)`` ``r = sum_t p log_q`` from ``row_prior`` (``HAS_PRIOR``).
        row_weight_ptr: ``(B, C)`` upstream weight of each row, ``ACC``.
        dx_ptr: ``(B, C, K)`` output, contiguous, ``x``'s dtype.
        TAU: the score scale ``tau``, a compile-time constant so that it is exact in
            float64 (a Python float argument would be passed as float32); a new
            value compiles the kernel once more.

    With ``s = tau x.T``, ``p = exp(s - lse)``, and ``log_q = r = 0`` for the uniform prior::

        dx[b,c,:] = tau * row_weight[b,c]
                    * sum_t p_t (s_t - lse - neg_entropy - log_q[c,t] + r[b,c]) T[t,:]

    The weight of each template is formed from ``log p = s - lse`` (at most 0; in natural
    units from the recomputed score, then scaled by ``log2(e)`` for ``exp2``) and saved
    per-row values, so no large terms cancel beyond
    those of the formula itself; ``p <= 1``. The row's ``[BLOCK_M, K]`` gradient stays in
    float32 (float64) registers for the whole sweep and is written once. Uniform rows run
    batch-major (memory order); with a prior, channel-major (few prior rows per tile).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B * C
    batch, channels = row_coordinates(rows, B, C, HAS_PRIOR)
    flat = batch * C + channels
    x0, x1, x2 = load_chunks(x_ptr, flat * K, row_mask, K, K0, K1, K2, OPERANDS)
    lse = tl.load(lse_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    offset = tl.load(neg_entropy_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    if HAS_PRIOR:
        offset -= tl.load(prior_ptr + flat, mask=row_mask, other=0.0).to(ACC)

    dx0 = tl.zeros((BLOCK_M, K0), dtype=ACC)
    dx1 = dx0
    dx2 = dx0
    if K1 > 0:
        dx1 = tl.zeros((BLOCK_M, K1), dtype=ACC)
    if K2 > 0:
        dx2 = tl.zeros((BLOCK_M, K2), dtype=ACC)
    for start in range(0, N, BLOCK_N):
        templates = start + tl.arange(0, BLOCK_N).to(tl.int64)
        template_mask = templates < N
        t0, t1, t2 = load_chunks(templates_ptr, templates * K, template_mask, K, K0, K1, K2,
                                 OPERANDS)
        log_p = products(x0, x1, x2, t0, t1, t2, K1, K2, OPERANDS, ACC) * TAU - lse[:, None]
        coefficient = log_p - offset[:, None]
        if HAS_PRIOR:
            coefficient -= tl.load(log_q_ptr + channels[:, None] * N + templates[None, :],
                                   mask=row_mask[:, None] & template_mask[None, :], other=0.0)
        # Templates past N load as zero rows; masking their weight keeps a non-finite
        # one (0 * inf in the product) out of dx.
        weights = tl.where(template_mask[None, :], tl.exp2(log_p * LOG2E) * coefficient, 0.0)
        dx0, dx1, dx2 = accumulate_weighted(dx0, dx1, dx2, weights, t0, t1, t2, K1, K2, OPERANDS)

    row_scale = TAU * tl.load(row_weight_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    store_chunks(dx_ptr, flat * K, row_mask, dx0 * row_scale[:, None], dx1 * row_scale[:, None],
                 dx2 * row_scale[:, None], K, K0, K1, K2)
