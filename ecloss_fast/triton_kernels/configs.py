"""Launch configurations of the ECLoss kernels for Hopper and Ampere, and the choice among them.

None of these numbers was measured: this project has not had a GPU yet. They are reasoned
from the kernels' structure and checked on the CPU only for fitting an H100 (every one is
compiled for ``sm_90`` in ``tests/test_triton_compile.py``: shared memory at most 227 KB,
no register spills, matrix instructions present). Measure and replace them
(``ECLOSS_TRITON_AUTOTUNE=1`` times every candidate on first use of a shape).

The reasoning, per kernel, for ``K = 196`` (chunks 128 + 64 + 16 = 208):

* ``row_stats`` / ``row_prior`` are FlashAttention's forward without the ``P V`` product:
  a ``[BLOCK_M, 208]`` tile of ``x`` stays resident and ``[BLOCK_N, 208]`` template tiles
  stream through. Template traffic per row is ``N * 208 * bytes / BLOCK_M``, so
  ``BLOCK_M = 128`` (one warpgroup pair on Hopper) keeps it below the matrix unit's rate.
  With bfloat16 operands a 64-template tile is 27 KB; three stages plus ``x`` (53 KB) fit
  comfortably. With float32 operands (tf32) everything doubles, so ``BLOCK_N = 32``.
* ``input_grad`` also keeps the ``[BLOCK_M, 208]`` float32 gradient in registers
  (``BLOCK_M * 208 / (32 * num_warps)`` registers per thread: 104 at 128 rows and 8 warps),
  so ``BLOCK_M = 64`` with 4 warps, as in FlashAttention's backward.
* ``column_sums`` tiles ``CHANNELS x BLOCK_B`` maps (all maps of a channel when ``B`` is
  at most 128), otherwise as ``row_stats``.
* ``"ieee"`` float32 products run on the FMA units (Triton lowers them without the matrix
  unit), so smaller tiles; ``"fp64"`` uses the float64 matrix instructions (``mma`` f64).

Ampere (A100: 164 KB of shared memory per block, no ``wgmma``) takes the same tiles with
one stage fewer.

One rule binds every table: the sweeps of one loss must recompute bitwise the scores of
``row_stats`` (see ``_tiles``), so for the matrix-unit kinds (``bf16``, ``tf32``) every
kernel and every candidate has the same ``block_n`` and 16 rows per warp. Each
warpgroup then owns 64 rows and the whole template tile, and Hopper runs one
``wgmma`` shape (m64 x ``block_n``) in all of them; Ampere's ``mma.sync`` shape does not
depend on the tile. Without that, two kernels could accumulate a score's products in a
different hardware order. The FMA kinds (``ieee``, ``fp64``) accumulate ``k`` in order in
any tile.
"""
from __future__ import annotations

import dataclasses

import triton

KERNELS = ("row_stats", "column_sums", "row_prior", "input_grad")
OPERAND_KINDS = ("bf16", "tf32", "ieee", "fp64")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and Triton launch options of one kernel launch.

    ``block_m`` is the number of feature maps (rows) per program; for ``column_sums`` it
    is ``channels * block_b`` with ``block_b`` chosen from the batch size at launch.
    """
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Candidates per (kernel, operand kind) for Hopper; the first is the default.
# Not measured (no GPU so far): reasoned as in the module docstring.
HOPPER: dict[tuple[str, str], tuple[LaunchConfig, ...]] = {
    ("row_stats", "bf16"): (LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 3)),
    ("row_stats", "tf32"): (LaunchConfig(128, 32, 8, 3), LaunchConfig(64, 32, 4, 3)),
    ("row_stats", "ieee"): (LaunchConfig(64, 32, 4, 2),),
    ("row_stats", "fp64"): (LaunchConfig(64, 32, 4, 2),),
    ("input_grad", "bf16"): (LaunchConfig(64, 64, 4, 2), LaunchConfig(128, 64, 8, 2)),
    ("input_grad", "tf32"): (LaunchConfig(64, 32, 4, 2), LaunchConfig(128, 32, 8, 2)),
    ("input_grad", "ieee"): (LaunchConfig(32, 32, 4, 2),),
    ("input_grad", "fp64"): (LaunchConfig(32, 32, 4, 2),),
}
# row_prior has row_stats' shape of work (one product per tile, a row reduction).
HOPPER.update({("row_prior", kind): HOPPER[("row_stats", kind)] for kind in OPERAND_KINDS})
HOPPER.update({("column_sums", kind): HOPPER[("row_stats", kind)] for kind in OPERAND_KINDS})

# Ampere: same tiles, one pipeline stage fewer (164 KB of shared memory on A100).
AMPERE = {key: tuple(dataclasses.replace(c, num_stages=max(1, c.num_stages - 1)) for c in value)
          for key, value in HOPPER.items()}


def operand_kind(operands: str) -> str:
    """Configuration family of a kernel ``OPERANDS`` value.

    Float16 products take the bfloat16 tiles: the same operand size and the same matrix
    instruction shapes; the interpreter's emulations are their own kind's.
    """
    return "bf16" if operands in ("bf16_emulated", "fp16", "fp16_emulated") else operands


def candidates(kernel: str, operands: str, capability: tuple[int, int]) -> tuple[LaunchConfig, ...]:
    """All configurations to try for a kernel on a GPU of that compute capability."""
    table = HOPPER if capability[0] >= 9 else AMPERE
    return table[(kernel, operand_kind(operands))]


def default(kernel: str, operands: str, capability: tuple[int, int], rows: int,
            multiprocessors: int) -> LaunchConfig:
    """The configuration used without tuning, keyed on the row count.

    Rows are bucketed by the number of programs they make: when the default tile would
    leave most multiprocessors idle (fewer than two programs per multiprocessor), the
    candidate with the smallest ``block_m`` is taken instead.
    """
    options = candidates(kernel, operands, capability)
    first = options[0]
    if triton.cdiv(rows, first.block_m) >= 2 * multiprocessors:
        return first
    return min(options, key=lambda config: config.block_m)


def interpreter(kernel: str, rows: int, templates: int) -> LaunchConfig:
    """Tiles for Triton's CPU interpreter, which runs each program in Python.

    Few, large template tiles keep the Python loop short, but at least two and up to
    about four per row so the online rescaling and the masked last tile are exercised.
    """
    block_n = min(1024, max(16, triton.next_power_of_2(triton.cdiv(templates, 4))))
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    return LaunchConfig(block_m, block_n, 1, 1)
