"""Tile helpers shared by the ECLoss kernels: row mapping, chunked loads, the two products.

Every kernel forms its scores with ``scores`` (the same ``products``, the same ``K``
chunks, then one rounded multiply by ``tau``), so the scores that a backward or marginal
sweep recomputes are bitwise those that gave ``row_max``: at float32 scores near 1e7 one
ulp is about 1, and a shift of one ulp would scale ``p`` by ``e``. The per-element order
of accumulation does not depend on the tile shape: the FMA products (``"ieee"``) run ``k``
in order whatever the tile; for the matrix units, float64's ``mma.sync`` among them, the
launch configurations keep one instruction shape per operand kind (see ``configs``).

The reduction length ``K = H*W`` is rarely a power of two (196 for 14x14) and ``tl.arange``
needs one, so a row of ``x`` or of the templates is held as up to three power-of-two
chunks of widths ``K0 >= K1 >= K2`` (multiples of 16, the matrix unit's step) that cover
``K`` rounded up to 16: 196 -> 128 + 64 + 16 = 208, so only 6% of the products are padding
(a single 256-wide tile would waste 30%). Rows of ``x`` are loaded masked at ``K`` (zero
fill). The templates are prepared once (``ecloss_fast._templates.prepared_templates``):
zero-padded to ``K0 + K1 + K2`` columns (a row of 208 bfloat16 is 416 bytes, 16-byte
aligned, where 196 would be 392) and to whole template tiles, so ``load_template_chunks``
reads them with neither a column nor a row mask; the kernels exclude the padding rows
from their sums (score -inf or weight 0 for ``t >= N``). An absent chunk has width 0; the
helpers then return the first chunk in its place, which the callers never read (the
compiler drops it).

``OPERANDS`` (a constexpr string that the launcher takes from ``ecloss_fast._precision``'s
vocabulary) fixes what the matrix unit sees:

* ``"ieee"``: float32 operands, full-precision products (``input_precision="ieee"``);
* ``"tf32"``: float32 operands, TF32 products;
* ``"bf16"``: operands rounded to bfloat16, float32 accumulation;
* ``"bf16_emulated"``: the same rounding, then float32 products. Only the Triton
  interpreter uses it: its ``tl.dot`` on bfloat16 operands returns garbage (triton 3.8),
  while rounding to bfloat16 and multiplying in float32 is the same arithmetic (a product
  of two bfloat16 values is exact in float32);
* ``"fp16"``: operands rounded to float16, float32 accumulation (float16 maps). The
  ``dx`` product keeps its weights in float32 and runs in TF32 (exact for the float16
  templates): a float16 weight ``p * (s - E)`` underflows near a uniform softmax (``p`` near
  ``1/N``, ``s - E`` near 1e-3 at ``tau = 1e-3``: about 5e-8, float16's smallest subnormal);
* ``"fp16_emulated"``: the float16 rounding, then float32 products, in the interpreter;
* ``"fp64"``: float64 operands and accumulation (float64 inputs), on the float64 matrix
  instructions (``mma.sync`` f64; see ``configs``);
* ``"ieee_emulated"``: float32 operands whose products (exact in float64) are summed in
  float64 and rounded once to float32 per chunk. Only the interpreter uses it (for
  ``"ieee"`` and ``"tf32"``): its float32 ``tl.dot`` is numpy's matmul, whose order of
  summation per element depends on the tile shape and on the CPU's SIMD kernels, so two
  kernels with different tiles could round the same score differently, which a GPU's
  fixed ``k`` order never does. Summed in float64, two orders give the same float32 score
  unless the sum lies within about ``K * 2^-29`` (relative) of a float32 rounding boundary.

Every ``tl.dot`` names its ``out_dtype``, the accumulator's: triton 3.6 defaults it to
float32 and rejects a float64 accumulator otherwise.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = tl.constexpr(1.4426950408889634)  # exp(v) = exp2(v * LOG2E)


@triton.jit
def row_coordinates(rows, B, C, CHANNEL_MAJOR: tl.constexpr):
    """Feature map ``(b, c)`` of each flat row index (int64 ``[R]``).

    Batch-major rows (``row = b*C + c``) are the memory order of ``x``; channel-major rows
    (``row = c*B + b``) keep the ``B`` maps of a channel together, so a tile reads few rows
    of the ``(C, N)`` prior and those repeat (cache hits).
    """
    if CHANNEL_MAJOR:
        b = rows % B
        c = rows // B
    else:
        b = rows // C
        c = rows % C
    return b, c


@triton.jit
def to_operand(values, OPERANDS: tl.constexpr):
    """Cast a tile to the matrix unit's operand type (see the module docstring)."""
    if OPERANDS == "bf16":
        return values.to(tl.bfloat16)
    elif OPERANDS == "bf16_emulated":
        return values.to(tl.bfloat16).to(tl.float32)
    elif OPERANDS == "fp16":
        return values.to(tl.float16)
    elif OPERANDS == "fp16_emulated":
        return values.to(tl.float16).to(tl.float32)
    elif OPERANDS == "fp64":
        return values.to(tl.float64)
    else:
        return values.to(tl.float32)


@triton.jit
def _load_chunk(ptr, row_offsets, row_mask, START: tl.constexpr, WIDTH: tl.constexpr,
                K: tl.constexpr, OPERANDS: tl.constexpr):
    columns = START + tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (columns < K)[None, :]
    values = tl.load(ptr + row_offsets[:, None] + columns[None, :], mask=mask, other=0.0)
    return to_operand(values, OPERANDS)


@triton.jit
def load_chunks(ptr, row_offsets, row_mask, K: tl.constexpr, K0: tl.constexpr,
                K1: tl.constexpr, K2: tl.constexpr, OPERANDS: tl.constexpr):
    """Rows ``ptr[row_offsets + k]``, ``k < K``, as three operand chunks (masked rows are 0).

    ``row_offsets`` is int64 ``[R]`` (element offsets of each row's first value),
    ``row_mask`` bool ``[R]``. Returns tiles ``[R, K0]``, ``[R, K1]``, ``[R, K2]``.
    """
    chunk0 = _load_chunk(ptr, row_offsets, row_mask, 0, K0, K, OPERANDS)
    chunk1 = chunk0
    chunk2 = chunk0
    if K1 > 0:
        chunk1 = _load_chunk(ptr, row_offsets, row_mask, K0, K1, K, OPERANDS)
    if K2 > 0:
        chunk2 = _load_chunk(ptr, row_offsets, row_mask, K0 + K1, K2, K, OPERANDS)
    return chunk0, chunk1, chunk2


@triton.jit
def load_template_chunks(ptr, templates, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                         OPERANDS: tl.constexpr):
    """Rows ``templates`` (int64 ``[Nt]``) of the prepared templates as three operand chunks.

    ``ptr`` is the ``(N', K0 + K1 + K2)`` matrix of ``prepared_templates``, already in the
    operand type: every tile of rows and every chunk lies inside it, so nothing is masked.
    """
    offsets = templates * (K0 + K1 + K2)
    chunk0 = to_operand(tl.load(ptr + offsets[:, None] + tl.arange(0, K0)[None, :]), OPERANDS)
    chunk1 = chunk0
    chunk2 = chunk0
    if K1 > 0:
        chunk1 = to_operand(tl.load(ptr + offsets[:, None] + (K0 + tl.arange(0, K1))[None, :]),
                            OPERANDS)
    if K2 > 0:
        chunk2 = to_operand(
            tl.load(ptr + offsets[:, None] + (K0 + K1 + tl.arange(0, K2))[None, :]), OPERANDS)
    return chunk0, chunk1, chunk2


@triton.jit
def _dot(a, b, acc, OPERANDS: tl.constexpr):
    if OPERANDS == "tf32":
        return tl.dot(a, b, acc, input_precision="tf32", out_dtype=acc.dtype)
    elif OPERANDS == "bf16" or OPERANDS == "fp16":
        return tl.dot(a, b, acc, out_dtype=acc.dtype)
    elif OPERANDS == "ieee_emulated":
        return acc + tl.dot(a.to(tl.float64), b.to(tl.float64), out_dtype=tl.float64).to(acc.dtype)
    else:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit
def products(x0, x1, x2, t0, t1, t2, K1: tl.constexpr, K2: tl.constexpr,
             OPERANDS: tl.constexpr, ACC: tl.constexpr):
    """Unscaled scores ``x @ templates^T``: ``[R, Nt]`` in ``ACC`` from chunks ``[R, Kc]``, ``[Nt, Kc]``."""
    acc = tl.zeros((x0.shape[0], t0.shape[0]), dtype=ACC)
    acc = _dot(x0, tl.trans(t0), acc, OPERANDS)
    if K1 > 0:
        acc = _dot(x1, tl.trans(t1), acc, OPERANDS)
    if K2 > 0:
        acc = _dot(x2, tl.trans(t2), acc, OPERANDS)
    return acc


@triton.jit
def scores(x0, x1, x2, t0, t1, t2, TAU: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
           OPERANDS: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr):
    """Scores ``tau * x @ templates^T`` in natural units, ``[R, Nt]`` in ``ACC``, rounded once.

    The multiply by ``tau`` is rounded on its own (``mul_rn``): left to the compiler,
    ``tau * acc - row_max`` may become one FMA, whose shift is not the rounded score minus
    the rounded maximum that ``row_stats`` took. Triton's interpreter (numpy, every
    operation rounded; no libdevice) multiplies plainly.
    """
    acc = products(x0, x1, x2, t0, t1, t2, K1, K2, OPERANDS, ACC)
    if INTERPRETED:
        return acc * TAU
    else:
        return libdevice.mul_rn(acc, tl.full(acc.shape, TAU, ACC))


@triton.jit
def accumulate_weighted(acc0, acc1, acc2, weights, t0, t1, t2, K1: tl.constexpr,
                        K2: tl.constexpr, OPERANDS: tl.constexpr):
    """``acc += weights @ templates`` per chunk: ``weights [R, Nt]``, ``t [Nt, Kc]``, ``acc [R, Kc]``.

    Float16 operands multiply their float32 weights in TF32 (``"ieee"`` when emulated),
    see the module docstring.
    """
    if OPERANDS == "fp16":
        acc0, acc1, acc2 = _accumulate(acc0, acc1, acc2, weights.to(tl.float32),
                                       t0.to(tl.float32), t1.to(tl.float32), t2.to(tl.float32),
                                       K1, K2, "tf32")
    elif OPERANDS == "fp16_emulated":
        acc0, acc1, acc2 = _accumulate(acc0, acc1, acc2, weights.to(tl.float32), t0, t1, t2,
                                       K1, K2, "ieee")
    else:
        acc0, acc1, acc2 = _accumulate(acc0, acc1, acc2, to_operand(weights, OPERANDS), t0, t1,
                                       t2, K1, K2, OPERANDS)
    return acc0, acc1, acc2


@triton.jit
def _accumulate(acc0, acc1, acc2, w, t0, t1, t2, K1: tl.constexpr, K2: tl.constexpr,
                OPERANDS: tl.constexpr):
    acc0 = _dot(w, t0, acc0, OPERANDS)
    if K1 > 0:
        acc1 = _dot(w, t1, acc1, OPERANDS)
    if K2 > 0:
        acc2 = _dot(w, t2, acc2, OPERANDS)
    return acc0, acc1, acc2


@triton.jit
def store_chunks(ptr, row_offsets, row_mask, chunk0, chunk1, chunk2, K: tl.constexpr,
                 K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):
    """Write the three chunks back as rows ``ptr[row_offsets + k]``, ``k < K``, in ``ptr``'s dtype."""
    columns = tl.arange(0, K0)
    mask = row_mask[:, None] & (columns < K)[None, :]
    tl.store(ptr + row_offsets[:, None] + columns[None, :],
             chunk0.to(ptr.dtype.element_ty), mask=mask)
    if K1 > 0:
        columns = K0 + tl.arange(0, K1)
        mask = row_mask[:, None] & (columns < K)[None, :]
        tl.store(ptr + row_offsets[:, None] + columns[None, :],
                 chunk1.to(ptr.dtype.element_ty), mask=mask)
    if K2 > 0:
        columns = K0 + K1 + tl.arange(0, K2)
        mask = row_mask[:, None] & (columns < K)[None, :]
        tl.store(ptr + row_offsets[:, None] + columns[None, :],
                 chunk2.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def zero_accumulator(BLOCK_M: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
                     K2: tl.constexpr, DX_COLUMNS: tl.constexpr, ACC: tl.constexpr):
    """A zero ``[BLOCK_M, K]`` accumulator: three chunks, or with ``DX_COLUMNS`` one slice.

    A sliced accumulator is the first value; the other two are that value again, never read
    (as for absent chunks).
    """
    if DX_COLUMNS == 0:
        acc0 = tl.zeros((BLOCK_M, K0), dtype=ACC)
        acc1 = acc0
        acc2 = acc0
        if K1 > 0:
            acc1 = tl.zeros((BLOCK_M, K1), dtype=ACC)
        if K2 > 0:
            acc2 = tl.zeros((BLOCK_M, K2), dtype=ACC)
    else:
        acc0 = tl.zeros((BLOCK_M, DX_COLUMNS), dtype=ACC)
        acc1 = acc0
        acc2 = acc0
    return acc0, acc1, acc2


@triton.jit
def slice_columns(K: tl.constexpr, DX_COLUMNS: tl.constexpr):
    """Columns of program axis 1's ``dx`` slice and their mask (``< K``); the slice is
    ``tl.program_id(1) * DX_COLUMNS ..`` (with ``DX_COLUMNS = 0`` the caller never reads them)."""
    if DX_COLUMNS > 0:
        columns = tl.program_id(1) * DX_COLUMNS + tl.arange(0, DX_COLUMNS)
    else:
        columns = tl.arange(0, 16)
    return columns, columns < K


@triton.jit
def accumulate_templates(acc0, acc1, acc2, weights, templates_ptr, templates, t0, t1, t2,
                         columns, column_mask, K0: tl.constexpr, K1: tl.constexpr,
                         K2: tl.constexpr, OPERANDS: tl.constexpr, DX_COLUMNS: tl.constexpr):
    """``acc += weights @ templates``, ``weights [R, Nt]``, into all chunks or one slice.

    Whole (``DX_COLUMNS = 0``): the tile ``t0, t1, t2`` of the score product is reused.
    Sliced: the slice's columns of the prepared rows are loaded (every template row of the
    tile exists; columns may pass ``K0 + K1 + K2`` and are masked).
    """
    if DX_COLUMNS == 0:
        acc0, acc1, acc2 = accumulate_weighted(acc0, acc1, acc2, weights, t0, t1, t2, K1, K2,
                                               OPERANDS)
    else:
        t_slice = to_operand(
            tl.load(templates_ptr + templates[:, None] * (K0 + K1 + K2) + columns[None, :],
                    mask=column_mask[None, :], other=0.0),
            OPERANDS)
        acc0, _, _ = accumulate_weighted(acc0, acc0, acc0, weights, t_slice, t_slice, t_slice,
                                         0, 0, OPERANDS)
    return acc0, acc1, acc2


@triton.jit
def store_accumulator(ptr, row_offsets, row_mask, acc0, acc1, acc2, columns, column_mask,
                      K: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                      DX_COLUMNS: tl.constexpr):
    """Write an accumulator of ``zero_accumulator`` (all chunks, or its slice) to rows
    ``ptr[row_offsets + k]``, in ``ptr``'s dtype."""
    if DX_COLUMNS == 0:
        store_chunks(ptr, row_offsets, row_mask, acc0, acc1, acc2, K, K0, K1, K2)
    else:
        tl.store(ptr + row_offsets[:, None] + columns[None, :],
                 acc0.to(ptr.dtype.element_ty), mask=row_mask[:, None] & column_mask[None, :])


@triton.jit
def template_weights(s, row_max, log_sum, offset, weight, prior, template_mask,
                     HAS_PRIOR: tl.constexpr):
    """The weight of each template in a row's ``dx`` (``dx = scale * sum_t weight_t T_t``).

    ``s [R, Nt]`` the tile's scores (``scores``); ``row_max``, ``log_sum``, ``offset``,
    ``weight`` ``[R]``; ``prior [R, Nt]`` (read only with ``HAS_PRIOR``); ``template_mask``
    ``[Nt]`` (false past ``N``: weight 0, so a non-finite value of a padding row's product
    never reaches ``dx``). With ``log p = (s - row_max) - log_sum``::

        uniform:   p ((s - row_max) - offset),            offset = E = neg_entropy + log_sum
        HAS_PRIOR: p ((weight log p - prior) - offset),   offset = D of ``row_prior``

    Every term is formed from the shift ``s - row_max`` (at most 0, natural units, scaled
    by ``log2(e)`` only for ``exp2``), so the weights of a row sum to 0 up to rounding at
    every score magnitude. The uniform ``dx`` is then scaled by ``tau w``, with a prior by
    ``tau`` (``input_grad_kernel``).
    """
    shifted = s - row_max[:, None]
    log_p = shifted - log_sum[:, None]
    if HAS_PRIOR:
        value = weight[:, None] * log_p - prior
    else:
        value = shifted
    return tl.where(template_mask[None, :], tl.exp2(log_p * LOG2E) * (value - offset[:, None]),
                    0.0)
