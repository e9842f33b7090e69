"""First backward sweep with a prior: the per-map offset ``D`` that every template weight needs."""
import triton
import triton.language as tl

from ._tiles import LOG2E, load_chunks, load_template_chunks, row_coordinates, scores


@triton.jit
def row_prior_kernel(x_ptr, templates_ptr, row_max_ptr, log_sum_ptr, prior_ptr, row_weight_ptr,
                     out_ptr, B, C, N,
                     TAU: tl.constexpr, K: tl.constexpr, K0: tl.constexpr,
                     K1: tl.constexpr, K2: tl.constexpr,
                     OPERANDS: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``D[b,c] = sum_t p (w log p - prior[c,t]) / sum_t p`` for ``BLOCK_M`` channel-major rows.

    Arguments:
        x_ptr: ``(B, C, K)`` feature maps, contiguous.
        templates_ptr: ``(N', K0 + K1 + K2)`` templates of ``prepared_templates`` in the
            operand type, rows padded to whole ``BLOCK_N`` tiles.
        row_max_ptr, log_sum_ptr: ``(B, C)`` from ``row_stats``, ``ACC``, contiguous.
        prior_ptr: ``(C, N)`` prior of the backend contract (``w log_q`` for the marginal
            estimator, plus the diversity term), ``ACC``, contiguous.
        row_weight_ptr: ``(B, C)`` row weight ``w``, ``ACC``, contiguous.
        out_ptr: ``(B, C)`` output ``D``, ``ACC``, contiguous.
        TAU: the score scale ``tau``, a compile-time constant so that it is exact in
            float64 (a Python float argument would be passed as float32); a new
            value compiles the kernel once more.

    Rows run channel-major (``row = c*B + b``) so that a tile needs the prior of few
    channels. ``log p = (s - row_max) - log_sum``, with ``s`` bitwise the score of
    ``row_stats`` (``_tiles.scores``), is at most 0, so no running maximum is needed; the
    prior is finite (its logarithms are floored at ``tiny``), so ``p = 0`` terms add 0.

    ``D`` is what the gradient weight ``p ((w log p - prior) - D)`` of ``input_grad_kernel``
    needs. It is taken over the recomputed mass ``sum_t p`` (1 in exact arithmetic): then
    those weights sum to 0 to rounding, at every score magnitude.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B * C
    batch, channels = row_coordinates(rows, B, C, True)
    flat = batch * C + channels
    x0, x1, x2 = load_chunks(x_ptr, flat * K, row_mask, K, K0, K1, K2, OPERANDS)
    row_max = tl.load(row_max_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    log_sum = tl.load(log_sum_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    weight = tl.load(row_weight_ptr + flat, mask=row_mask, other=0.0).to(ACC)

    divergence = tl.zeros((BLOCK_M,), dtype=ACC)
    mass = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, N, BLOCK_N):
        templates = start + tl.arange(0, BLOCK_N).to(tl.int64)
        template_mask = templates < N
        t0, t1, t2 = load_template_chunks(templates_ptr, templates, K0, K1, K2, OPERANDS)
        s = scores(x0, x1, x2, t0, t1, t2, TAU, K1, K2, OPERANDS, ACC, INTERPRETED)
        log_p = (s - row_max[:, None]) - log_sum[:, None]
        mask = row_mask[:, None] & template_mask[None, :]
        prior = tl.load(prior_ptr + channels[:, None] * N + templates[None, :], mask=mask,
                        other=0.0)
        p = tl.where(mask, tl.exp2(log_p * LOG2E), 0.0)
        # A term with p = 0 (masked, or log_p = -inf) adds 0, never 0 * inf; NaN still
        # propagates.
        divergence += tl.sum(tl.where(p == 0, 0.0, p * (weight[:, None] * log_p - prior)), axis=1)
        mass += tl.sum(p, axis=1)
    tl.store(out_ptr + flat, divergence / mass, mask=row_mask)
