"""Second forward sweep of the marginal estimator: ``sum_b p[b,c,t]``, in a fixed order."""
import triton
import triton.language as tl

from ._tiles import LOG2E, load_chunks, load_template_chunks, scores


@triton.jit
def column_sums_kernel(x_ptr, templates_ptr, row_max_ptr, log_sum_ptr, partial_ptr, B, C, N,
                       tiles_per_program,
                       TAU: tl.constexpr, K: tl.constexpr, K0: tl.constexpr,
                       K1: tl.constexpr, K2: tl.constexpr,
                       OPERANDS: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr,
                       CHANNELS: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column sums of the softmax for ``CHANNELS`` channels x ``BLOCK_B`` maps of each.

    Grid ``(cdiv(C, CHANNELS), cdiv(B, BLOCK_B), template splits)``. Program ``(g, j, s)``
    owns channels ``g*CHANNELS ..`` and maps ``b = j*BLOCK_B ..`` of each (a row tile of
    ``CHANNELS * BLOCK_B`` maps, channel-major) and template tiles
    ``s*tiles_per_program ..``; it writes::

        partial[j, c, t] = sum_{b in block j} exp((s[b,c,t] - row_max[b,c]) - log_sum[b,c])

    Arguments:
        x_ptr: ``(B, C, K)`` feature maps, contiguous (strides ``C*K, K, 1``).
        templates_ptr: ``(N', K0 + K1 + K2)`` templates of ``prepared_templates`` in the
            operand type, rows padded to whole ``BLOCK_N`` tiles.
        row_max_ptr, log_sum_ptr: ``(B, C)`` from ``row_stats``, ``ACC``, contiguous.
        partial_ptr: ``(cdiv(B, BLOCK_B), C, N)`` output in ``ACC``, contiguous. The caller
            sums it over its first axis (a fixed order); with one block it is the result.
        TAU: the score scale ``tau``, a compile-time constant so that it is exact in
            float64 (a Python float argument would be passed as float32); a new
            value compiles the kernel once more.

    Deterministic: every sum has one owner and a fixed order, no atomics. Consistent:
    ``s`` is bitwise the score of ``row_stats`` (``_tiles.scores``) and ``log p`` is formed
    in natural units as ``(s - row_max) - log_sum``, so the ``p`` of a row sum to 1 up to
    the rounding of that sum, whatever the size of ``s``; only then is it scaled by
    ``log2(e)`` for ``exp2``. Each ``p`` lies in ``[0, 1]``.
    """
    BLOCK_M: tl.constexpr = CHANNELS * BLOCK_B
    tl.static_assert(BLOCK_M >= 16, "the matrix unit needs at least 16 rows per tile")
    channel_block = tl.program_id(0)
    batch_block = tl.program_id(1)
    local = tl.arange(0, BLOCK_M)
    channels = channel_block.to(tl.int64) * CHANNELS + local // BLOCK_B
    batch = batch_block.to(tl.int64) * BLOCK_B + local % BLOCK_B
    row_mask = (channels < C) & (batch < B)
    flat = batch * C + channels
    x0, x1, x2 = load_chunks(x_ptr, flat * K, row_mask, K, K0, K1, K2, OPERANDS)
    row_max = tl.load(row_max_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    log_sum = tl.load(log_sum_ptr + flat, mask=row_mask, other=0.0).to(ACC)

    out_channels = channel_block.to(tl.int64) * CHANNELS + tl.arange(0, CHANNELS)
    out_rows = (batch_block.to(tl.int64) * C + out_channels) * N
    first = tl.program_id(2) * tiles_per_program * BLOCK_N
    last = tl.minimum(first + tiles_per_program * BLOCK_N, N)
    for start in range(first, last, BLOCK_N):
        templates = start + tl.arange(0, BLOCK_N).to(tl.int64)
        template_mask = templates < N
        t0, t1, t2 = load_template_chunks(templates_ptr, templates, K0, K1, K2, OPERANDS)
        s = scores(x0, x1, x2, t0, t1, t2, TAU, K1, K2, OPERANDS, ACC, INTERPRETED)
        log_p = (s - row_max[:, None]) - log_sum[:, None]
        probabilities = tl.exp2(log_p * LOG2E)
        probabilities = tl.where(row_mask[:, None] & template_mask[None, :], probabilities, 0.0)
        sums = tl.sum(tl.reshape(probabilities, (CHANNELS, BLOCK_B, BLOCK_N)), axis=1)
        tl.store(partial_ptr + out_rows[:, None] + templates[None, :], sums,
                 mask=(out_channels < C)[:, None] & template_mask[None, :])
