"""Launch configurations of the ECLoss kernels for Hopper and Ampere, and the choice among them.

Each configuration is chosen to fit an H100: ``python -m bench.kernels`` compiles every
configuration below, for every route a loss call can take (input dtype and precision), for
``sm_90`` with the runtime JIT's own specialisation and reads registers, spills
(``cuobjdump`` ``STACK``, ``ptxas -v`` spill stores) and shared memory;
tests/test_triton_compile.py asserts, for every default, no spills (or one justified in
bench/NOTES.md) and at most 227 KB of shared memory. What was compiled, under which
Triton, and what was timed: bench/NOTES.md ("Triton kernel resources"). Speed is to be
measured and the tables replaced (``ECLOSS_TRITON_AUTOTUNE=1`` times every candidate on
first use of a shape).

Tables are keyed by kernel (``input_grad_prior`` is ``input_grad`` with a prior: the same
kernel with more registers live; ``row_stats_grad`` is ``row_stats`` with ``WITH_GRAD`` and
``input_grad_prior_fused`` ``input_grad`` with a prior and ``FUSED_PRIOR``, the training
sweeps' fused forms, each with two ``[rows, K]`` accumulators; ``FUSED`` below picks
fused or split), operand kind and the reduction length ``K``
(``k_class``: ``K <= 256``, the paper's 14x14 = 196, chunks 128 + 64 + 16; ``K <= 1024``,
28x28 = 784, chunks 512 + 256 + 16); ``default`` then picks by rows. What bounds each, as
compiled with triton 3.8:

* Every row tile holds ``16`` rows per warp (the matrix instruction's row count), so the
  registers a thread needs for a row-resident value do not depend on the tile:
  ``K`` float32 values of ``dx`` per row are ``16 K / 32 = K/2`` registers per thread (98
  at K = 196, 392 at K = 784). ``input_grad`` therefore keeps ``dx`` in slices of
  ``dx_columns`` columns, one per program, where all ``K`` do not fit; each slice
  recomputes the scores (see ``input_grad.input_grad_kernel``). Where that would be
  many slices (K = 784) the backward runs chunked instead (``CHUNKED``: ``score_grad``,
  which has ``row_stats``' tiles, and ``template_product``, a plain product).
* The template tile ``BLOCK_N`` sets the score registers (``16 BLOCK_N / 32`` per thread)
  and the shared memory of each pipeline stage (``BLOCK_N * K`` operands). At K = 196
  (maps rounded to bfloat16 by the launcher, template loads without masks) 64-template
  bfloat16 tiles fit in every kernel, ``input_grad`` with a prior only with ``dx`` in two
  128-column slices (whole, it spills 200 bytes); TF32 ``input_grad`` spills at 32
  templates (32 bytes) and fits at 16. At K = 784 the ``x`` tile alone, staged in shared
  memory for the matrix unit, is ``BLOCK_M * 784 * bytes``: 100 KB at 64 bfloat16 rows,
  so TF32 takes 32 rows (2 warps, ``mma.sync``).
* The forward sweeps (``row_stats``, ``row_prior``, ``column_sums``) take 128-row tiles
  where they fit: templates are re-read from L2 once per row tile.

Ampere (A100: 164 KB of shared memory per block, no ``wgmma``) takes the same tiles with
one stage fewer; those are not compiled by ``bench.kernels`` (Hopper only).

One rule binds every table: the sweeps of one loss must recompute bitwise the scores of
``row_stats`` (see ``_tiles``), so for the matrix-unit kinds (``bf16``, ``fp16``, ``tf32``)
every kernel and every candidate of one ``K`` class has the same ``block_n`` and 16 rows
per warp. Each warpgroup then owns 64 rows and the whole template tile, and Hopper runs one
``wgmma`` shape (m64 x ``block_n``) in all of them (TF32 at ``K <= 1024``: 2 warps, so
``mma.sync`` in all of them); Ampere's ``mma.sync`` shape does not depend on the tile.
Without that, two kernels could accumulate a score's products in a different hardware
order. The FMA kind (``ieee``) accumulates ``k`` in order in any tile. Float64 (``fp64``)
runs float64 matrix instructions, ``mma.sync`` with f64 operands, whose shape Triton picks
by release and device, the same in every kernel and tile here (read from the PTX of every
default at K = 196 and 784): m8n8k4 under triton 3.8 on sm_80 and sm_90, and under 3.6
m8n8k4 on sm_80, m16n8k16 on sm_90.
"""
from __future__ import annotations

import dataclasses

import triton

from ecloss_fast._precision import OPERAND_KINDS, operand_kind

KERNELS = ("row_stats", "row_stats_grad", "column_sums", "row_prior", "input_grad",
           "input_grad_prior", "input_grad_prior_fused", "score_grad", "template_product")
K_CLASSES = (256, 1024)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and Triton launch options of one kernel launch.

    ``block_m`` is the number of feature maps (rows) per program; for ``column_sums`` it
    is ``channels * block_b`` with ``block_b`` chosen from the batch size at launch.
    ``dx_columns`` (``input_grad`` only) is the width of the slice of ``dx`` one program
    keeps, 0 for all ``K`` columns; for ``template_product`` (a plain product: ``block_m``
    rows, ``block_n`` templates per step) the width of its column tile.
    """
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    dx_columns: int = 0


def k_class(k: int) -> int:
    """The table of a reduction length: 256 for ``K <= 256``, 1024 for ``K <= 1024``."""
    for bound in K_CLASSES:
        if k <= bound:
            return bound
    raise ValueError(f"the triton kernels take maps of at most {K_CLASSES[-1]} pixels "
                     f"(32x32), got K = {k}; use backend='torch' for larger maps")


_C = LaunchConfig
# Candidates per (kernel, operand kind, K class) for Hopper; the first is the default.
# Each one compiles without spills and within 227 KB of shared memory (bench.kernels,
# triton 3.8) unless bench/NOTES.md says otherwise.
HOPPER: dict[tuple[str, str, int], tuple[LaunchConfig, ...]] = {
    ("row_stats", "bf16", 256): (_C(128, 64, 8, 3), _C(64, 64, 4, 3)),
    ("row_stats", "tf32", 256): (_C(128, 16, 8, 3), _C(64, 16, 4, 3)),
    ("row_stats", "ieee", 256): (_C(64, 16, 4, 2),),
    ("row_stats", "fp64", 256): (_C(64, 32, 4, 2),),
    ("input_grad", "bf16", 256): (_C(128, 64, 8, 2), _C(64, 64, 4, 2)),
    ("input_grad", "tf32", 256): (_C(128, 16, 8, 2),),
    ("input_grad", "ieee", 256): (_C(32, 16, 4, 2),),
    ("input_grad", "fp64", 256): (_C(32, 16, 4, 2, 128),),
    ("input_grad_prior", "bf16", 256): (_C(128, 64, 8, 2, 128), _C(64, 64, 4, 2, 128)),
    ("input_grad_prior", "tf32", 256): (_C(128, 16, 8, 2, 128),),
    ("input_grad_prior", "ieee", 256): (_C(32, 16, 4, 2),),
    ("input_grad_prior", "fp64", 256): (_C(32, 16, 4, 2, 64),),
    ("row_stats", "bf16", 1024): (_C(64, 32, 4, 2),),
    ("row_stats", "tf32", 1024): (_C(32, 16, 2, 2),),
    ("row_stats", "ieee", 1024): (_C(32, 16, 4, 2),),
    ("row_stats", "fp64", 1024): (_C(16, 16, 4, 2),),
    ("input_grad", "bf16", 1024): (_C(64, 32, 4, 2, 128),),
    ("input_grad", "tf32", 1024): (_C(32, 16, 2, 2, 128),),
    ("input_grad", "ieee", 1024): (_C(32, 16, 4, 2, 128),),
    ("input_grad", "fp64", 1024): (_C(16, 16, 4, 2, 64),),
    ("input_grad_prior", "bf16", 1024): (_C(64, 32, 4, 2, 128),),
    ("input_grad_prior", "tf32", 1024): (_C(32, 16, 2, 2, 128),),
    ("input_grad_prior", "ieee", 1024): (_C(32, 16, 4, 2, 128),),
    ("input_grad_prior", "fp64", 1024): (_C(16, 16, 4, 2, 64),),
    # The fused sweeps keep two [rows, K] accumulators (U and V, or U and Z): half the dx
    # slice of their single-accumulator counterparts where those are sliced or spill.
    ("row_stats_grad", "bf16", 256): (_C(128, 64, 8, 2, 64), _C(64, 64, 4, 2, 64)),
    ("row_stats_grad", "tf32", 256): (_C(128, 16, 8, 2, 128),),
    ("row_stats_grad", "ieee", 256): (_C(16, 16, 4, 2),),
    # 32 rows spill 16 bytes inside the sweep under triton 3.6 (FUSED does not pick it).
    ("row_stats_grad", "fp64", 256): (_C(16, 16, 4, 2, 64),),
    ("row_stats_grad", "bf16", 1024): (_C(64, 32, 4, 2, 128),),
    ("row_stats_grad", "tf32", 1024): (_C(32, 16, 2, 2, 64),),
    ("row_stats_grad", "ieee", 1024): (_C(32, 16, 4, 2, 128),),
    ("row_stats_grad", "fp64", 1024): (_C(16, 16, 4, 2, 64),),
    ("input_grad_prior_fused", "bf16", 256): (_C(128, 64, 8, 2, 64), _C(64, 64, 4, 2, 64)),
    ("input_grad_prior_fused", "tf32", 256): (_C(128, 16, 8, 2, 128),),
    ("input_grad_prior_fused", "ieee", 256): (_C(16, 16, 4, 2, 128),),
    ("input_grad_prior_fused", "fp64", 256): (_C(16, 16, 4, 2, 64),),
    ("input_grad_prior_fused", "bf16", 1024): (_C(64, 32, 4, 2, 64),),
    ("input_grad_prior_fused", "tf32", 1024): (_C(32, 16, 2, 2, 64),),
    ("input_grad_prior_fused", "ieee", 1024): (_C(16, 16, 4, 2, 128),),
    ("input_grad_prior_fused", "fp64", 1024): (_C(16, 16, 4, 2, 64),),
    # float16 products (float16 maps, precision=None) take the bfloat16 tiles except where
    # those do not fit: the dx product multiplies float32 weights by float32 copies of the
    # template tile (TF32, see _tiles), which costs registers and shared memory that
    # bfloat16's does not. At K <= 256, 64-template tiles spill (input_grad 128x64: 160
    # bytes under triton 3.6 and 3.8), so every fp16 kernel there takes 32 templates (one
    # wgmma shape: the module docstring's rule); at K <= 1024 the split backward with a prior needs
    # 233,472 bytes of shared memory with two stages, 1 KB over the H100's 232,448, so it
    # runs one (147 KB).
    ("row_stats", "fp16", 256): (_C(128, 32, 8, 3), _C(64, 32, 4, 3)),
    ("input_grad", "fp16", 256): (_C(128, 32, 8, 2), _C(64, 32, 4, 2)),
    ("input_grad_prior", "fp16", 256): (_C(128, 32, 8, 2, 128), _C(64, 32, 4, 2, 128)),
    ("row_stats_grad", "fp16", 256): (_C(128, 32, 8, 2, 64), _C(64, 32, 4, 2, 64)),
    ("input_grad_prior_fused", "fp16", 256): (_C(128, 32, 8, 2, 64), _C(64, 32, 4, 2, 64)),
    ("row_stats", "fp16", 1024): (_C(64, 32, 4, 2),),
    ("input_grad", "fp16", 1024): (_C(64, 32, 4, 2, 128),),
    ("input_grad_prior", "fp16", 1024): (_C(64, 32, 4, 1, 128),),
    ("row_stats_grad", "fp16", 1024): (_C(64, 32, 4, 2, 128),),
    ("input_grad_prior_fused", "fp16", 1024): (_C(64, 32, 4, 2, 64),),
}
for _kind in OPERAND_KINDS:
    for _k in K_CLASSES:
        # row_prior, column_sums and score_grad have row_stats' shape of work (one product
        # per tile, then elementwise work and a row reduction or a store).
        for _kernel in ("row_prior", "column_sums", "score_grad"):
            HOPPER[(_kernel, _kind, _k)] = HOPPER[("row_stats", _kind, _k)]
# The chunked backward's product (grad @ templates, block_m x block_n x dx_columns tiles):
# a plain GEMM, no scores, so the bitwise rule above does not bind it.
HOPPER.update({
    ("template_product", "bf16", 256): (_C(128, 64, 8, 3, 128),),
    ("template_product", "fp16", 256): (_C(128, 32, 8, 3, 128),),
    ("template_product", "tf32", 256): (_C(128, 32, 8, 3, 128),),
    ("template_product", "ieee", 256): (_C(64, 16, 4, 2, 64),),
    ("template_product", "fp64", 256): (_C(64, 16, 4, 2, 64),),
})
for _kind in OPERAND_KINDS:
    HOPPER[("template_product", _kind, 1024)] = HOPPER[("template_product", _kind, 256)]

# Whether a training route runs fused (one sweep, two [rows, K] accumulators:
# ``row_stats_grad``, ``input_grad_prior_fused``) or split (two sweeps, one accumulator:
# ``row_stats`` then ``input_grad``; ``row_prior`` then ``input_grad_prior``), per operand
# kind and K class, from the cost model of bench/NOTES.md applied to the defaults above at
# the paper's rows (predicted, not timed): fused where its bound is within 2% of the split
# form's (a tie goes to fewer sweeps of exponentials). Where both accumulators do not fit
# whole, the fused sweep's slices each repeat the score product and the exponentials.
# Flops in units of 2MN (a score product at K = 196 executes 208 columns), fused against
# split, with sweeps of exponentials: uniform bf16 1344 / 4 against 624 / 2 (dx in 4 x 64
# columns against whole), tf32 928 / 2 against 624 / 2, ieee 624 / 1 against 624 / 2
# (whole), fp64 1344 / 4 against 880 / 3; with a prior bf16 1344 / 4 against 880 / 3,
# tf32 928 / 2 against 880 / 3, ieee 928 / 2 against 624 / 2, fp64 1344 / 4 against
# 1296 / 5. At K = 784 the split forms' input_grad is chunked (``CHUNKED``, below): 3
# GEMM-equivalents and 2 sweeps uniform, 3 and 2 for row_prior and input_grad with a prior,
# against the fused sweeps' 9 / 7 and 11 / 10 (their accumulators in 128- or 64-column
# slices, each repeating the score product): nothing fuses there.
FUSED: dict[tuple[str, str, int], bool] = {  # float16 products: bfloat16's choices, below
    ("row_stats_grad", "bf16", 256): False, ("row_stats_grad", "tf32", 256): False,
    ("row_stats_grad", "ieee", 256): True, ("row_stats_grad", "fp64", 256): False,
    ("row_stats_grad", "bf16", 1024): False, ("row_stats_grad", "tf32", 1024): False,
    ("row_stats_grad", "ieee", 1024): False, ("row_stats_grad", "fp64", 1024): False,
    ("input_grad_prior", "bf16", 256): False, ("input_grad_prior", "tf32", 256): False,
    ("input_grad_prior", "ieee", 256): False, ("input_grad_prior", "fp64", 256): False,
    ("input_grad_prior", "bf16", 1024): False, ("input_grad_prior", "tf32", 1024): False,
    ("input_grad_prior", "ieee", 1024): False, ("input_grad_prior", "fp64", 1024): False,
}
FUSED.update({(route, "fp16", k): FUSED[(route, "bf16", k)] for route, _, k in list(FUSED)})

# Whether ``input_grad`` (uniform, and with a prior after ``row_prior``) runs chunked:
# ``score_grad_kernel`` writes the weights of a chunk of templates to a scratch and
# ``template_product_kernel`` adds their product with the templates into ``dx``, so ``dx``
# costs one score product and one sweep of exponentials however many slices it would take
# on chip, for the scratch written and read once (``2 B*C N`` values; at most the template
# matrix's bytes at a time). Counted (predictions, bench/NOTES.md): at K = 784 the sliced
# ``input_grad`` repeats a 784-deep score product and the exponentials for each of its 7
# slices (8 GEMM-equivalents, 7 sweeps; 10 and 9 with a prior) where the chunked form does
# 2 and 1 (3 and 2), and the scratch traffic is worth about 0.7 GEMM-equivalents in bf16 on
# an H100 (3 TB/s against ~800 TFLOP/s); at K = 196 a GEMM-equivalent is four times
# cheaper and the whole ``dx`` fits on chip (1 slice uniform; 2 with a prior in bf16, tf32,
# fp64), so the same traffic would cost more than the products it saves.
CHUNKED: dict[tuple[str, int], bool] = {(kind, k): k == 1024 for kind in OPERAND_KINDS
                                        for k in K_CLASSES}

# Ampere: same tiles, one pipeline stage fewer (164 KB of shared memory on A100).
AMPERE = {key: tuple(dataclasses.replace(c, num_stages=max(1, c.num_stages - 1)) for c in value)
          for key, value in HOPPER.items()}


def candidates(kernel: str, operands: str, capability: tuple[int, int],
               k: int) -> tuple[LaunchConfig, ...]:
    """All configurations to try for a kernel on a GPU of that compute capability."""
    table = HOPPER if capability[0] >= 9 else AMPERE
    return table[(kernel, operand_kind(operands), k_class(k))]


def fused(route: str, operands: str, k: int) -> bool:
    """Whether ``route`` (``"row_stats_grad"`` or ``"input_grad_prior"``) runs as one fused
    sweep on a GPU (``FUSED``; Ampere, whose register file per thread is Hopper's, too)."""
    return FUSED[(route, operand_kind(operands), k_class(k))]


def chunked(operands: str, k: int) -> bool:
    """Whether ``input_grad`` runs in the chunked form (``CHUNKED``) on a GPU, and in the
    interpreter (there by ``K`` class alone, so that both forms run in the tests)."""
    return CHUNKED[(operand_kind(operands), k_class(k))]


def default(kernel: str, operands: str, capability: tuple[int, int], rows: int,
            multiprocessors: int, k: int) -> LaunchConfig:
    """The configuration used without tuning, keyed on ``K`` and the row count.

    The first candidate (the largest row tile) when it makes at least one program per
    multiprocessor: at the paper's 32,768 rows, 256 programs of 128 rows on 132 SMs.
    Below that the candidate with the smallest ``block_m``, which spreads the rows
    over more multiprocessors.
    """
    options = candidates(kernel, operands, capability, k)
    first = options[0]
    if triton.cdiv(rows, first.block_m) >= multiprocessors:
        return first
    return min(options, key=lambda config: config.block_m)


def interpreter(kernel: str, rows: int, templates: int, k: int) -> LaunchConfig:
    """Tiles for Triton's CPU interpreter, which runs each program in Python.

    Few, large template tiles keep the Python loop short, but at least two and up to
    about four per row so the online rescaling and the masked last tile are exercised.
    ``dx`` is kept whole up to ``K = 32`` and in two slices above (a ragged last one at
    7x7 and 14x14), so both ``input_grad`` paths run.
    """
    block_n = min(1024, max(16, triton.next_power_of_2(triton.cdiv(templates, 4))))
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    if kernel == "template_product":  # two column tiles, the second ragged unless K is 2^n
        return LaunchConfig(block_m, block_n, 1, 1,
                            max(16, triton.next_power_of_2(triton.cdiv(k, 2))))
    dx_columns = 0 if k <= 32 else max(32, triton.next_power_of_2(triton.cdiv(k, 2)))
    return LaunchConfig(block_m, block_n, 1, 1, dx_columns)
