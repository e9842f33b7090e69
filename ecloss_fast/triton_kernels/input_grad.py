"""Backward sweep: ``dx`` of ECLoss, scores recomputed, accumulated in registers."""
import triton
import triton.language as tl

from ._tiles import (LOG2E, accumulate_templates, load_chunks, load_template_chunks,
                     row_coordinates, scores, slice_columns, store_accumulator, template_weights,
                     zero_accumulator)


@triton.jit
def input_grad_kernel(x_ptr, templates_ptr, row_max_ptr, log_sum_ptr, neg_entropy_ptr,
                      prior_ptr, offset_ptr, row_weight_ptr, dx_ptr, B, C, N,
                      TAU: tl.constexpr, K: tl.constexpr, K0: tl.constexpr,
                      K1: tl.constexpr, K2: tl.constexpr,
                      OPERANDS: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr,
                      HAS_PRIOR: tl.constexpr, FUSED_PRIOR: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DX_COLUMNS: tl.constexpr):
    """``dx`` for ``BLOCK_M`` rows: one sweep, score product then ``dx`` product(s) per tile.

    Grid ``(cdiv(B*C, BLOCK_M), slices)``. With ``DX_COLUMNS = 0`` (one slice) a program
    keeps all ``K`` columns of its rows' ``dx`` and reuses the template tile of the score
    product for the ``dx`` product. Otherwise program ``(i, j)`` keeps columns
    ``j*DX_COLUMNS ..`` only (``cdiv(K, DX_COLUMNS)`` slices): it still forms the full
    scores, so each slice repeats the score product, which is what lets ``K = 784`` fit
    (all of ``dx`` would be 392 float32 registers per thread); the backend runs that class
    chunked instead (``score_grad_kernel`` and ``template_product_kernel``, one score
    product for all columns).

    Arguments:
        x_ptr: ``(B, C, K)`` feature maps, contiguous (for half products already rounded to
            the half type by the launcher).
        templates_ptr: ``(N', K0 + K1 + K2)`` templates of ``prepared_templates`` in the
            operand type, rows padded to whole ``BLOCK_N`` tiles.
        row_max_ptr, log_sum_ptr, neg_entropy_ptr: ``(B, C)`` row statistics from
            ``row_stats``, ``ACC``.
        prior_ptr: ``(C, N)`` prior of the backend contract (``HAS_PRIOR``; else unused),
            ``ACC``, contiguous.
        offset_ptr: ``(B, C)`` ``D`` from ``row_prior`` (``HAS_PRIOR`` without
            ``FUSED_PRIOR``; else unused), ``ACC``.
        FUSED_PRIOR: with a prior, accumulate ``D`` in this sweep (below) instead of
            reading it.
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
        HAS_PRIOR: dx[b,c,:] = tau * sum_t p_t (z_t - D) T[t,:] = tau * (Z - D' U),
                   z_t = w log p_t - prior[c,t],   D = sum_t p_t z_t / sum_t p_t

    Uniform: every term is formed from the shift ``s - row_max`` (at most 0, natural
    units, scaled by ``log2(e)`` only for ``exp2``), and the ``p`` are those of the forward
    sweep, which sum to 1: the weights sum to 0 up to rounding at every score magnitude.

    With a prior and ``offset_ptr`` (``row_prior`` ran first) the weights are
    ``p ((w log p - prior) - D)``. With ``FUSED_PRIOR`` ``D`` is not known before the sweep:
    it accumulates ``U = sum p T``, ``Z = sum p (z - c) T``, ``sum p (z - c)`` and the
    recomputed mass ``sum p``, relative to a reference ``c`` that is, after each tile, the
    running mean ``sum p z / sum p`` of the templates seen so far (those sums including the
    tile). When ``c`` moves to ``c'`` before the tile's weights are added,
    ``Z += (c - c') U`` and ``sum p (z - c) += (c - c') sum p``. At the end
    ``D' = sum p (z - c) / sum p`` (``D - c``, a rounding residual; over the recomputed
    mass, so that a row's weights sum to 0 to rounding) and ``dx = tau (Z - D' U)``. Each
    weight is ``p (z - c)`` with ``c`` close to ``D``, the weight of the split form, so
    neither a peaked row's dominant ``p z`` nor a flat row's mean cancels in ``Z - D' U``
    (a reference at the best template instead left a near-uniform row's ``D' U`` to cancel:
    up to 15 times the float32 error of the direct form, tests/test_triton.py shapes).
    That is one sweep where ``row_prior`` + this kernel take two, for a second
    ``[BLOCK_M, K]`` accumulator (``U``); ``configs.FUSED`` says where that pays.

    The row's gradient stays in float32 (float64) registers for the whole sweep and is
    written once. Uniform rows run batch-major (memory order); with a prior,
    channel-major (few prior rows per tile).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B * C
    batch, channels = row_coordinates(rows, B, C, HAS_PRIOR)
    flat = batch * C + channels
    x0, x1, x2 = load_chunks(x_ptr, flat * K, row_mask, K, K0, K1, K2, OPERANDS)
    row_max = tl.load(row_max_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    log_sum = tl.load(log_sum_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    if HAS_PRIOR and not FUSED_PRIOR:
        weight = tl.load(row_weight_ptr + flat, mask=row_mask, other=0.0).to(ACC)
        offset = tl.load(offset_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    elif HAS_PRIOR:
        weight = tl.load(row_weight_ptr + flat, mask=row_mask, other=0.0).to(ACC)
        reference = tl.zeros((BLOCK_M,), dtype=ACC)
        relative_sum = tl.zeros((BLOCK_M,), dtype=ACC)
        mass = tl.zeros((BLOCK_M,), dtype=ACC)
        u0, u1, u2 = zero_accumulator(BLOCK_M, K0, K1, K2, DX_COLUMNS, ACC)
    else:
        offset = tl.load(neg_entropy_ptr + flat, mask=row_mask, other=0.0).to(ACC) + log_sum
        weight = offset  # not read by the sweep: the row weight scales dx at the end

    dx0, dx1, dx2 = zero_accumulator(BLOCK_M, K0, K1, K2, DX_COLUMNS, ACC)
    columns, column_mask = slice_columns(K, DX_COLUMNS)
    for start in range(0, N, BLOCK_N):
        templates = start + tl.arange(0, BLOCK_N).to(tl.int64)
        template_mask = templates < N
        t0, t1, t2 = load_template_chunks(templates_ptr, templates, K0, K1, K2, OPERANDS)
        s = scores(x0, x1, x2, t0, t1, t2, TAU, K1, K2, OPERANDS, ACC, INTERPRETED)
        prior = s  # read only with a prior
        if HAS_PRIOR:
            mask = row_mask[:, None] & template_mask[None, :]
            prior = tl.load(prior_ptr + channels[:, None] * N + templates[None, :], mask=mask,
                            other=0.0)
        if HAS_PRIOR and FUSED_PRIOR:
            log_p = (s - row_max[:, None]) - log_sum[:, None]
            z = weight[:, None] * log_p - prior
            p = tl.where(mask, tl.exp2(log_p * LOG2E), 0.0)
            # A term with p = 0 (masked, or log_p = -inf) adds 0, never 0 * inf; NaN still
            # propagates.
            mass += tl.sum(p, axis=1)
            relative_sum += tl.sum(tl.where(p == 0, 0.0, p * (z - reference[:, None])), axis=1)
            new_reference = tl.where(mass > 0, reference + relative_sum / mass, reference)
            change = reference - new_reference
            dx0 += change[:, None] * u0
            dx1 += change[:, None] * u1
            dx2 += change[:, None] * u2
            relative_sum += change * mass
            reference = new_reference
            weights = tl.where(p == 0, 0.0, p * (z - reference[:, None]))
            u0, u1, u2 = accumulate_templates(u0, u1, u2, p, templates_ptr, templates, t0, t1,
                                              t2, columns, column_mask, K0, K1, K2, OPERANDS,
                                              DX_COLUMNS)
        else:
            weights = template_weights(s, row_max, log_sum, offset, weight, prior,
                                       template_mask, HAS_PRIOR)
        dx0, dx1, dx2 = accumulate_templates(dx0, dx1, dx2, weights, templates_ptr, templates,
                                             t0, t1, t2, columns, column_mask, K0, K1, K2,
                                             OPERANDS, DX_COLUMNS)

    if HAS_PRIOR and FUSED_PRIOR:
        mean = (relative_sum / mass)[:, None]
        dx0, dx1, dx2 = dx0 - mean * u0, dx1 - mean * u1, dx2 - mean * u2
    if HAS_PRIOR:
        row_scale = tl.full((BLOCK_M,), TAU, ACC)[:, None]
    else:
        weight = tl.load(row_weight_ptr + flat, mask=row_mask, other=0.0).to(ACC)
        row_scale = (TAU * weight)[:, None]
    store_accumulator(dx_ptr, flat * K, row_mask, dx0 * row_scale, dx1 * row_scale,
                      dx2 * row_scale, columns, column_mask, K, K0, K1, K2, DX_COLUMNS)
