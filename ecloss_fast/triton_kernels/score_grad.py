"""Chunked backward, first kernel: each template's weight in ``dx``, written to a scratch."""
import triton
import triton.language as tl

from ._tiles import load_chunks, load_template_chunks, row_coordinates, scores, template_weights


@triton.jit
def score_grad_kernel(x_ptr, templates_ptr, row_max_ptr, log_sum_ptr, offset_ptr, prior_ptr,
                      row_weight_ptr, grad_ptr, B, C, N, chunk_start, chunk_end, span, width,
                      TAU: tl.constexpr, K: tl.constexpr, K0: tl.constexpr,
                      K1: tl.constexpr, K2: tl.constexpr,
                      OPERANDS: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr,
                      HAS_PRIOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``grad[r, t - chunk_start] = template_weights`` of templates ``chunk_start .. chunk_end``.

    Grid ``(cdiv(B*C, BLOCK_M), splits)``: program ``(i, j)`` takes ``BLOCK_M`` rows and
    the templates ``chunk_start + j*span ..`` (``span`` a whole number of ``BLOCK_N``
    tiles), forms their scores (bitwise those of ``row_stats``: ``_tiles.scores``, the
    same tile), the weights of ``_tiles.template_weights`` and stores them. The product of
    those weights with the templates is ``template_product_kernel``'s: so ``dx`` is formed
    by one score product and one sweep of exponentials however wide it is, where
    ``input_grad_kernel`` repeats both for each slice of ``dx`` it keeps on chip.

    Arguments:
        x_ptr: ``(B, C, K)`` feature maps, contiguous.
        templates_ptr: ``(N', K0 + K1 + K2)`` templates of ``prepared_templates`` in the
            operand type, rows padded to whole ``BLOCK_N`` tiles.
        row_max_ptr, log_sum_ptr: ``(B, C)`` from ``row_stats``, ``ACC``.
        offset_ptr: ``(B, C)``, ``ACC``: ``E = neg_entropy + log_sum`` (uniform) or ``D``
            from ``row_prior`` (``HAS_PRIOR``).
        prior_ptr: ``(C, N)`` prior of the backend contract (``HAS_PRIOR``; else unused),
            ``ACC``, contiguous.
        row_weight_ptr: ``(B, C)`` row weight ``w`` (``HAS_PRIOR``; else unused), ``ACC``.
        grad_ptr: ``(B*C, width)`` scratch, row ``b*C + c`` (memory order), in the type
            ``template_product_kernel`` reads; ``chunk_end - chunk_start <= width``.
        chunk_start, chunk_end: multiples of ``BLOCK_N``, ``chunk_end <= N'``.
        TAU: the score scale ``tau``, a compile-time constant (exact in float64).

    Rows run batch-major without a prior, channel-major with one (few prior rows per tile).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B * C
    batch, channels = row_coordinates(rows, B, C, HAS_PRIOR)
    flat = batch * C + channels
    x0, x1, x2 = load_chunks(x_ptr, flat * K, row_mask, K, K0, K1, K2, OPERANDS)
    row_max = tl.load(row_max_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    log_sum = tl.load(log_sum_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    offset = tl.load(offset_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    weight = offset  # read only with a prior
    if HAS_PRIOR:
        weight = tl.load(row_weight_ptr + flat, mask=row_mask, other=0.0).to(ACC)

    first = chunk_start + tl.program_id(1).to(tl.int64) * span
    last = tl.minimum(first + span, chunk_end)
    for start in range(first, last, BLOCK_N):
        templates = start + tl.arange(0, BLOCK_N).to(tl.int64)
        template_mask = templates < N
        t0, t1, t2 = load_template_chunks(templates_ptr, templates, K0, K1, K2, OPERANDS)
        s = scores(x0, x1, x2, t0, t1, t2, TAU, K1, K2, OPERANDS, ACC, INTERPRETED)
        prior = s  # read only with a prior
        if HAS_PRIOR:
            prior = tl.load(prior_ptr + channels[:, None] * N + templates[None, :],
                            mask=row_mask[:, None] & template_mask[None, :], other=0.0)
        weights = template_weights(s, row_max, log_sum, offset, weight, prior, template_mask,
                                   HAS_PRIOR)
        tl.store(grad_ptr + flat[:, None] * width + (templates - chunk_start)[None, :],
                 weights.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None])
