"""Backend ``cuda``: the fused tensor-core kernels of csrc/cuda_sweep.cuh (csrc/cuda_ops.cpp).

float32, float16 and bfloat16 inputs; ``precision`` picks the matrix unit: ``"tf32"`` and
``"bf16"`` run WMMA (mma.sync) on the tensor cores (operands rounded, float32
accumulation), ``"ieee"`` plain float32 FMAs. The kernels have no float16 products:
``"fp16"`` (``precision=None`` for float16 maps) runs TF32 products instead: a TF32
operand holds every float16 value exactly (the same 10-bit mantissa, a wider exponent) and
the templates are rounded to that mantissa, so float16 maps lose nothing against float16
matrix units; the cost is the TF32 rate, half the float16 one. Each function is one call
of ``torch.ops.ecloss_fast_C.*``, as in the CPU backend: the dispatcher sends CUDA tensors
to the CUDA kernels, which read the templates from ``operand_templates(templates,
precision)``, made once and cached. The contract: docs/design.md section 9.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ecloss_fast._precision import extension_precision
from ecloss_fast._templates import prepared_templates
from ecloss_fast.backends.cpp_cpu import build_problem, extension_error

__all__ = ["availability", "supports", "build_problem", "row_stats", "row_stats_with_grad",
           "column_sums", "input_grad", "warm_up", "operand_templates", "round_to_tf32", "TAKES"]

# The operand layout of the kernels (csrc/ecloss_layout.h), checked against the extension's
# operand_layout() when this module loads: templates per tile, and the multiple that K is
# padded to (the bf16 WMMA k step).
TEMPLATE_TILE = 32
PIXEL_MULTIPLE = 16

# The float32 operand copy of prepared_templates -> its TF32 rounding: an entry goes with
# that copy, which goes with its source matrix or an in-place change of it.
_tf32_copies = WeakIdKeyDictionary()


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("ecloss_fast_C::row_stats", "CUDA")


def _layout_problem() -> str | None:
    """Why the extension's operand layout is not this module's (``None``: it is)."""
    if extension_error is not None:
        return None
    layout = tuple(torch.ops.ecloss_fast_C.operand_layout())
    if layout == (TEMPLATE_TILE, PIXEL_MULTIPLE):
        return None
    return (f"the extension ecloss_fast._C lays out operand templates in tiles of {layout[0]} "
            f"templates with K padded to a multiple of {layout[1]}, this module in "
            f"{TEMPLATE_TILE} and {PIXEL_MULTIPLE}: rebuild it with `python setup.py build_ext "
            f"--inplace`, and if that does not help, make csrc/ecloss_layout.h and "
            f"ecloss_fast/backends/cpp_cuda.py agree")


_LAYOUT_PROBLEM = _layout_problem()


def availability() -> str | None:
    if extension_error is not None:
        return extension_error
    if _LAYOUT_PROBLEM is not None:
        return _LAYOUT_PROBLEM
    if not _has_cuda_kernels():
        return ("the extension ecloss_fast._C was built without its CUDA kernels (no CUDA "
                "toolkit or a CPU build of torch at build time); install the CUDA toolkit "
                "(nvcc) matching torch.version.cuda and rebuild with "
                "`python setup.py build_ext --inplace`")
    if not torch.cuda.is_available():
        return ("no CUDA device is visible to torch (torch.cuda.is_available() is False); "
                "run on a machine with an NVIDIA GPU, its driver (check `nvidia-smi`) and "
                "CUDA_VISIBLE_DEVICES including it, or use backend='cpu' or 'torch' for "
                "tensors on the CPU")
    return None


# The kernels hold a block's 64 maps, a template tile and the dx accumulator in shared
# memory: at 16x16 that fits an H100 at every precision (the float32 operands up to about
# K = 336); larger maps go to triton or torch. An A100 (163 KB per block) runs float32
# operands up to K = 240: warm_up finds that (the kernels' own shared-memory check).
MAX_PIXELS = 256
TAKES = ("CUDA tensors of float32, float16 or bfloat16 with at most "
         f"{MAX_PIXELS} pixels per map (16x16)")


def supports(device: torch.device, dtype: torch.dtype, pixels: int) -> bool:
    """CUDA tensors of float32, float16 and bfloat16 (float64 has no tensor-core path here;
    the ``torch`` backend takes it) with at most ``MAX_PIXELS`` pixels per map."""
    return (torch.device(device).type == "cuda"
            and dtype in (torch.float32, torch.float16, torch.bfloat16)
            and pixels <= MAX_PIXELS)


def warm_up(x, templates, tau, precision, prior):
    """Run one map of ``x`` through the route's kernels and wait for them: a build without
    code for this GPU, or maps whose shared memory the GPU lacks, fails here instead of in
    a loss call (the kernels are compiled already; one map takes microseconds)."""
    one = x[:1, :1].contiguous()
    if prior:
        row_max, log_sum, neg_entropy = row_stats(one, templates, tau, precision)
        column_sums(one, templates, tau, row_max, log_sum, precision)
        input_grad(one, templates, tau, row_max, log_sum, neg_entropy,
                   torch.zeros(1, templates.shape[0], device=x.device, dtype=row_max.dtype),
                   torch.ones_like(row_max), precision)
    else:
        row_stats(one, templates, tau, precision)
        row_stats_with_grad(one, templates, tau, precision)
    torch.cuda.synchronize(x.device)


def round_to_tf32(values: torch.Tensor) -> torch.Tensor:
    """float32 ``values`` rounded to TF32 (10 mantissa bits), to nearest with ties away from
    zero: the rounding of ``cvt.rna.tf32.f32`` (``wmma::__float_to_tf32``), which the kernels
    apply to the maps. Adding half a TF32 ulp to the magnitude bits and clearing the 13 low
    bits does it (a carry into the exponent is the round-up); NaN and inf are kept."""
    bits = values.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & -0x2000).view(torch.float32)
    return torch.where(torch.isfinite(values), rounded, values)


def operand_templates(templates: torch.Tensor, precision: str) -> torch.Tensor | None:
    """The copy of ``templates (N, K)`` that the CUDA kernels read: ``prepared_templates``'
    ``(N', K')``, ``N`` rounded up to whole tiles of ``TEMPLATE_TILE`` and ``K`` to
    ``PIXEL_MULTIPLE`` (196 -> 208: the kernels' shared-memory rows are 208 long for the
    WMMA k steps, so a tile row is copied whole, in 16-byte chunks, with no bounds test),
    zero outside ``(N, K)``, in the operand type: bfloat16 (round to nearest even) for
    ``"bf16"``, float32 rounded by ``round_to_tf32`` for ``"tf32"``, float32 for ``"ieee"``.
    The zero rows score 0; the kernels leave every template past ``N`` out of the softmax.

    ``precision`` is the extension's (``"ieee"``, ``"tf32"`` or ``"bf16"``). Cached with
    ``prepared_templates``' copies (remade after an in-place change of ``templates``, freed
    with it). ``None`` for ``templates`` that are not a matrix: the kernels' argument check
    names the problem.
    """
    if templates.dim() != 2:
        return None
    columns = -(-templates.shape[1] // PIXEL_MULTIPLE) * PIXEL_MULTIPLE
    if precision == "bf16":
        return prepared_templates(templates, torch.bfloat16, columns, TEMPLATE_TILE)
    operands = prepared_templates(templates, torch.float32, columns, TEMPLATE_TILE)
    if precision != "tf32":
        return operands
    rounded = _tf32_copies.get(operands)
    if rounded is None:
        rounded = _tf32_copies[operands] = round_to_tf32(operands)
    return rounded


def row_stats(x, templates, tau, precision):
    precision = extension_precision(precision, "tf32")
    return torch.ops.ecloss_fast_C.row_stats(x, templates, tau, precision,
                                             operand_templates(templates, precision))


def row_stats_with_grad(x, templates, tau, precision):
    precision = extension_precision(precision, "tf32")
    return torch.ops.ecloss_fast_C.row_stats_with_grad(x, templates, tau, precision,
                                                       operand_templates(templates, precision))


def column_sums(x, templates, tau, row_max, log_sum, precision):
    precision = extension_precision(precision, "tf32")
    return torch.ops.ecloss_fast_C.column_sums(x, templates, tau, row_max, log_sum, precision,
                                               operand_templates(templates, precision))


def input_grad(x, templates, tau, row_max, log_sum, neg_entropy, prior, row_weight, precision):
    precision = extension_precision(precision, "tf32")
    return torch.ops.ecloss_fast_C.input_grad(x, templates, tau, row_max, log_sum, neg_entropy,
                                              prior, row_weight, precision,
                                              operand_templates(templates, precision))
