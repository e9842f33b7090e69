"""First backward sweep of the marginal estimator: ``r = sum_t p log q`` per feature map."""
import triton
import triton.language as tl

from ._tiles import load_chunks, products, row_coordinates

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def row_prior_kernel(x_ptr, templates_ptr, lse_ptr, log_q_ptr, out_ptr, B, C, N,
                     TAU: tl.constexpr, K: tl.constexpr, K0: tl.constexpr,
                     K1: tl.constexpr, K2: tl.constexpr,
                     OPERANDS: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``r[b,c] = sum_t p[b,c,t] log_q[c,t]`` for ``BLOCK_M`` channel-major rows.

    Arguments:
        x_ptr: ``(B, C, K)`` feature maps, contiguous.
        templates_ptr: ``(N, K)`` templates, row stride ``K``.
        lse_ptr: ``(B, C)`` log-partition, ``ACC``, contiguous.
        log_q_ptr: ``(C, N)`` log prior ``log max(pbar, tiny)``, ``ACC``, contiguous.
        out_ptr: ``(B, C)`` output ``r``, ``ACC``, contiguous.
        TAU: the score scale ``tau``, a compile-time constant so that it is exact in
            float64 (a Python float argument would be passed as float32); a new
            value compiles the kernel once more.

    Rows run channel-major (``row = c*B + b``) so that a tile needs the prior of few
    channels. ``p = exp(s - lse)`` with the saved ``lse`` is at most 1, no running maximum
    is needed; ``log_q`` is finite (floored at ``tiny``), so ``p = 0`` terms add 0.

    ``r`` is stored as ``sum p log_q / sum p``, equal in exact arithmetic (``sum p = 1``).
    In float32 the recomputed ``p`` sums to 1 only up to the rounding of ``s - lse``
    (``~1e-6`` relative for peaked maps), and the gradient weight ``log_q - r`` of a
    peaked row is a small difference of values of size ``log B``: normalising by the same
    ``p`` makes a constant ``log_q`` cancel exactly, which keeps ``dx`` within float32's
    own error of a float64 evaluation.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B * C
    batch, channels = row_coordinates(rows, B, C, True)
    flat = batch * C + channels
    x0, x1, x2 = load_chunks(x_ptr, flat * K, row_mask, K, K0, K1, K2, OPERANDS)
    lse = tl.load(lse_ptr + flat, mask=row_mask, other=0.0).to(ACC)

    weighted = tl.zeros((BLOCK_M,), dtype=ACC)
    mass = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, N, BLOCK_N):
        templates = start + tl.arange(0, BLOCK_N).to(tl.int64)
        template_mask = templates < N
        t0, t1, t2 = load_chunks(templates_ptr, templates * K, template_mask, K, K0, K1, K2,
                                 OPERANDS)
        log_p = products(x0, x1, x2, t0, t1, t2, K1, K2, OPERANDS, ACC) * TAU - lse[:, None]
        mask = row_mask[:, None] & template_mask[None, :]
        log_q = tl.load(log_q_ptr + channels[:, None] * N + templates[None, :], mask=mask,
                        other=0.0)
        p = tl.where(mask, tl.exp2(log_p * LOG2E), 0.0)
        weighted += tl.sum(p * log_q, axis=1)
        mass += tl.sum(p, axis=1)
    tl.store(out_ptr + flat, weighted / mass, mask=row_mask)
