"""Backward sweep: ``dx`` of ECLoss, scores recomputed, accumulated in registers."""
import triton
import triton.language as tl

from ._tiles import (accumulate_weighted, load_chunks, load_template_chunks, row_coordinates,
                     scores, store_chunks, to_operand)

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def input_grad_kernel(x_ptr, templates_ptr, row_max_ptr, log_sum_ptr, neg_entropy_ptr,
                      prior_ptr, offset_ptr, row_weight_ptr, dx_ptr, B, C, N,
                      TAU: tl.constexpr, K: tl.constexpr, K0: tl.constexpr,
                      K1: tl.constexpr, K2: tl.constexpr,
                      OPERANDS: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr,
                      HAS_PRIOR: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DX_COLUMNS: tl.constexpr):
    """``dx`` for ``BLOCK_M`` rows: one sweep, two products per template tile.

    Grid ``(cdiv(B*C, BLOCK_M), slices)``. With ``DX_COLUMNS = 0`` (one slice) a program
    keeps all ``K`` columns of its rows' ``dx`` and reuses the template tile of the score
    product for the ``dx`` product. Otherwise program ``(i, j)`` keeps columns
    ``j*DX_COLUMNS ..`` only (``cdiv(K, DX_COLUMNS)`` slices): it still forms the full
    scores, so each slice repeats the score product, which is what lets ``K = 784`` fit
    (all of ``dx`` would be 392 float32 registers per thread).

    Arguments:
        x_ptr: ``(B, C, K)`` feature maps, contiguous (for half products already rounded to
            the half type by the launcher).
        templates_ptr: ``(N', K0 + K1 + K2)`` templates of ``prepared_templates`` in the
            operand type, rows padded to whole ``BLOCK_N`` tiles.
        row_max_ptr, log_sum_ptr, neg_entropy_ptr: ``(B, C)`` row statistics from
            ``row_stats``, ``ACC``.
        prior_ptr: ``(C, N)`` prior of the backend contract (``HAS_PRIOR``; else unused),
            ``ACC``, contiguous.
        offset_ptr: ``(B, C)`` ``D = sum_t p (w log p - prior) / sum_t p`` from
            ``row_prior`` (``HAS_PRIOR``; else unused).
        row_weight_ptr: ``(B, C)`` upstream weight ``w`` of each row, ``ACC``.
        dx_ptr: ``(B, C, K)`` output, contiguous, in the maps' input dtype.
        DX_COLUMNS: width of the ``dx`` slice of a program (a power of two), 0 for all.
        TAU: the score scale ``tau``, a compile-time constant so that it is exact in
            float64 (a Python float argument would be passed as float32); a new
            value compiles the kernel once more.

    With ``s = tau x.T`` (bitwise the scores of ``row_stats``, ``_tiles.scores``),
    ``log p = (s - row_max) - log_sum``, ``E = neg_entropy + log_sum = sum_t p (s - row_max)``
    and ``w = row_weight[b,c]``::

        uniform:   dx[b,c,:] = tau * w * sum_t p_t ((s_t - row_max) - E) T[t,:]
        HAS_PRIOR: dx[b,c,:] = tau * sum_t p_t ((w log p_t - prior[c,t]) - D[b,c]) T[t,:]

    Every term is formed from the shift ``s - row_max`` (at most 0, natural units, scaled
    by ``log2(e)`` only for ``exp2``), and the ``p`` are those of the forward sweep, which
    sum to 1: the weights sum to 0 up to rounding at every score magnitude. The row's
    ``[BLOCK_M, K]`` gradient stays in float32 (float64) registers for the whole sweep and
    is written once. Uniform rows run batch-major (memory order); with a prior,
    channel-major (few prior rows per tile).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B * C
    batch, channels = row_coordinates(rows, B, C, HAS_PRIOR)
    flat = batch * C + channels
    x0, x1, x2 = load_chunks(x_ptr, flat * K, row_mask, K, K0, K1, K2, OPERANDS)
    row_max = tl.load(row_max_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    log_sum = tl.load(log_sum_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    if HAS_PRIOR:
        weight = tl.load(row_weight_ptr + flat, mask=row_mask, other=0.0).to(ACC)
        offset = tl.load(offset_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    else:
        offset = tl.load(neg_entropy_ptr + flat, mask=row_mask, other=0.0).to(ACC) + log_sum

    if DX_COLUMNS == 0:
        dx0 = tl.zeros((BLOCK_M, K0), dtype=ACC)
        dx1 = dx0
        dx2 = dx0
        if K1 > 0:
            dx1 = tl.zeros((BLOCK_M, K1), dtype=ACC)
        if K2 > 0:
            dx2 = tl.zeros((BLOCK_M, K2), dtype=ACC)
    else:
        columns = tl.program_id(1) * DX_COLUMNS + tl.arange(0, DX_COLUMNS)
        column_mask = columns < K
        dx0 = tl.zeros((BLOCK_M, DX_COLUMNS), dtype=ACC)
    for start in range(0, N, BLOCK_N):
        templates = start + tl.arange(0, BLOCK_N).to(tl.int64)
        template_mask = templates < N
        t0, t1, t2 = load_template_chunks(templates_ptr, templates, K0, K1, K2, OPERANDS)
        shifted = scores(x0, x1, x2, t0, t1, t2, TAU, K1, K2, OPERANDS, ACC,
                         INTERPRETED) - row_max[:, None]
        log_p = shifted - log_sum[:, None]
        if HAS_PRIOR:
            prior = tl.load(prior_ptr + channels[:, None] * N + templates[None, :],
                            mask=row_mask[:, None] & template_mask[None, :], other=0.0)
            coefficient = (weight[:, None] * log_p - prior) - offset[:, None]
        else:
            coefficient = shifted - offset[:, None]
        # Templates past N load as zero rows; masking their weight keeps a non-finite
        # one (0 * inf in the product) out of dx.
        weights = tl.where(template_mask[None, :], tl.exp2(log_p * LOG2E) * coefficient, 0.0)
        if DX_COLUMNS == 0:
            dx0, dx1, dx2 = accumulate_weighted(dx0, dx1, dx2, weights, t0, t1, t2, K1, K2,
                                                OPERANDS)
        else:
            # Prepared rows: every template row of the tile exists; columns may pass K0+K1+K2.
            t_slice = to_operand(
                tl.load(templates_ptr + templates[:, None] * (K0 + K1 + K2) + columns[None, :],
                        mask=column_mask[None, :], other=0.0),
                OPERANDS)
            dx0, _, _ = accumulate_weighted(dx0, dx0, dx0, weights, t_slice, t_slice, t_slice,
                                            0, 0, OPERANDS)

    if HAS_PRIOR:
        row_scale = tl.full((BLOCK_M,), TAU, ACC)
    else:
        row_scale = TAU * tl.load(row_weight_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    if DX_COLUMNS == 0:
        store_chunks(dx_ptr, flat * K, row_mask, dx0 * row_scale[:, None],
                     dx1 * row_scale[:, None], dx2 * row_scale[:, None], K, K0, K1, K2)
    else:
        tl.store(dx_ptr + (flat * K)[:, None] + columns[None, :],
                 (dx0 * row_scale[:, None]).to(dx_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & column_mask[None, :])
