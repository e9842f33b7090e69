"""First backward sweep of the marginal estimator: ``D = KL(p || q)`` per feature map."""
import triton
import triton.language as tl

from ._tiles import load_chunks, row_coordinates, scores

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def row_prior_kernel(x_ptr, templates_ptr, row_max_ptr, log_sum_ptr, log_q_ptr, out_ptr,
                     B, C, N,
                     TAU: tl.constexpr, K: tl.constexpr, K0: tl.constexpr,
                     K1: tl.constexpr, K2: tl.constexpr,
                     OPERANDS: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``D[b,c] = sum_t p[b,c,t] (log p[b,c,t] - log_q[c,t])`` for ``BLOCK_M`` channel-major rows.

    Arguments:
        x_ptr: ``(B, C, K)`` feature maps, contiguous.
        templates_ptr: ``(N, K)`` templates, row stride ``K``.
        row_max_ptr, log_sum_ptr: ``(B, C)`` from ``row_stats``, ``ACC``, contiguous.
        log_q_ptr: ``(C, N)`` log prior ``log max(pbar, tiny)``, ``ACC``, contiguous.
        out_ptr: ``(B, C)`` output ``D``, ``ACC``, contiguous.
        TAU: the score scale ``tau``, a compile-time constant so that it is exact in
            float64 (a Python float argument would be passed as float32); a new
            value compiles the kernel once more.

    Rows run channel-major (``row = c*B + b``) so that a tile needs the prior of few
    channels. ``log p = (s - row_max) - log_sum``, with ``s`` bitwise the score of
    ``row_stats`` (``_tiles.scores``), is at most 0, no running maximum is needed;
    ``log_q`` is finite (floored at ``tiny``), so ``p = 0`` terms add 0.

    ``D`` is what the gradient weight ``(log p - log_q) - D`` of ``input_grad_kernel``
    needs; it equals the contract's ``E - log_sum - r`` (``r = sum_t p log_q``), but
    ``E`` and ``r`` are of the size of the entropies while ``log p - log_q`` stays within
    ``log B`` of ``D`` wherever ``p`` matters, so their difference would round several
    times worse. It is stored as ``sum p (log p - log_q) / sum p``, equal in exact
    arithmetic: then the weights ``p ((log p - log_q) - D)`` sum to 0 to rounding.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B * C
    batch, channels = row_coordinates(rows, B, C, True)
    flat = batch * C + channels
    x0, x1, x2 = load_chunks(x_ptr, flat * K, row_mask, K, K0, K1, K2, OPERANDS)
    row_max = tl.load(row_max_ptr + flat, mask=row_mask, other=0.0).to(ACC)
    log_sum = tl.load(log_sum_ptr + flat, mask=row_mask, other=0.0).to(ACC)

    divergence = tl.zeros((BLOCK_M,), dtype=ACC)
    mass = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, N, BLOCK_N):
        templates = start + tl.arange(0, BLOCK_N).to(tl.int64)
        template_mask = templates < N
        t0, t1, t2 = load_chunks(templates_ptr, templates * K, template_mask, K, K0, K1, K2,
                                 OPERANDS)
        s = scores(x0, x1, x2, t0, t1, t2, TAU, K1, K2, OPERANDS, ACC, INTERPRETED)
        log_p = (s - row_max[:, None]) - log_sum[:, None]
        mask = row_mask[:, None] & template_mask[None, :]
        log_q = tl.load(log_q_ptr + channels[:, None] * N + templates[None, :], mask=mask,
                        other=0.0)
        p = tl.where(mask, tl.exp2(log_p * LOG2E), 0.0)
        # A term with p = 0 (masked, or log_p = -inf) adds 0, never 0 * inf; NaN still
        # propagates.
        divergence += tl.sum(tl.where(p == 0, 0.0, p * (log_p - log_q)), axis=1)
        mass += tl.sum(p, axis=1)
    tl.store(out_ptr + flat, divergence / mass, mask=row_mask)
