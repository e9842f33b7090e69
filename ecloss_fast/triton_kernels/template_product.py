"""Chunked backward, second kernel: ``dx += grad @ templates`` over one chunk of templates."""
import triton
import triton.language as tl

from ._tiles import accumulate_weighted, to_operand


@triton.jit
def template_product_kernel(grad_ptr, templates_ptr, partial_ptr, M, chunk_start, chunk_end,
                            span, width, K: tl.constexpr, PADDED_K: tl.constexpr,
                            OPERANDS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``partial[j, r, k] += sum_t grad[r, t - chunk_start] T[t, k]``, a tiled product.

    Grid ``(cdiv(M, BLOCK_M), cdiv(K, BLOCK_K), splits)``: program ``(i, c, j)`` owns rows
    ``i*BLOCK_M ..``, columns ``c*BLOCK_K ..`` of split ``j``'s partial sum and the
    templates ``chunk_start + j*span .. chunk_end`` (``span`` a whole number of ``BLOCK_N``
    tiles). Every element has one owner per split and the chunks run in order, so the
    result does not depend on scheduling; the caller sums the splits in a fixed order.

    Arguments:
        grad_ptr: ``(M, width)`` weights of ``score_grad_kernel`` for this chunk.
        templates_ptr: ``(N', PADDED_K)`` templates of ``prepared_templates`` in the
            operand type; ``chunk_end <= N'``.
        partial_ptr: ``(splits, M, K)`` running sums in ``ACC``, contiguous (zero before the
            first chunk).

    The weights meet the templates as ``_tiles.accumulate_weighted`` has them meet in
    ``input_grad_kernel``: in the operand type (float32 in TF32 for float16 templates).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    columns = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    column_mask = columns < K
    out = (tl.program_id(2).to(tl.int64) * M + rows[:, None]) * K + columns[None, :]
    out_mask = row_mask[:, None] & column_mask[None, :]
    acc = tl.load(partial_ptr + out, mask=out_mask, other=0.0)

    first = chunk_start + tl.program_id(2).to(tl.int64) * span
    last = tl.minimum(first + span, chunk_end)
    for start in range(first, last, BLOCK_N):
        templates = start + tl.arange(0, BLOCK_N).to(tl.int64)
        template_mask = templates < last
        weights = tl.load(grad_ptr + rows[:, None] * width + (templates - chunk_start)[None, :],
                          mask=row_mask[:, None] & template_mask[None, :], other=0.0)
        tile = to_operand(tl.load(templates_ptr + templates[:, None] * PADDED_K + columns[None, :],
                                  mask=template_mask[:, None] & column_mask[None, :], other=0.0),
                          OPERANDS)
        acc, _, _ = accumulate_weighted(acc, acc, acc, weights, tile, tile, tile, 0, 0, OPERANDS)
    tl.store(partial_ptr + out, acc, mask=out_mask)
