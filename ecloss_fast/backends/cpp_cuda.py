"""Backend ``cuda``: the fused tensor-core kernels of csrc/cuda_kernels.cu.

float32, float16 and bfloat16 inputs; ``precision`` picks the matrix unit: ``"tf32"`` and
``"bf16"`` run WMMA (mma.sync) on the tensor cores (operands rounded, float32
accumulation), ``"ieee"`` plain float32 FMAs. The kernels have no float16 products:
``"fp16"`` (``precision=None`` for float16 maps) runs TF32 products instead: a TF32
operand holds every float16 value exactly (the same 10-bit mantissa, a wider exponent) and
the templates are rounded to that mantissa, so float16 maps lose nothing against float16
matrix units; the cost is the TF32 rate, half the float16 one. Not run on
a GPU yet: see bench/NOTES.md. Each function is one call of ``torch.ops.ecloss_fast_C.*``,
as in the CPU backend: the dispatcher sends CUDA tensors to the CUDA kernels.
"""
from __future__ import annotations

import torch

from ecloss_fast.backends.cpp_cpu import extension_error, extension_precision

__all__ = ["availability", "supports", "supports_dtype", "row_stats", "column_sums",
           "input_grad"]


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("ecloss_fast_C::row_stats", "CUDA")


def availability() -> str | None:
    if extension_error is not None:
        return extension_error
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


def supports(device: torch.device) -> bool:
    return device.type == "cuda"


def supports_dtype(dtype: torch.dtype) -> bool:
    """float64 has no tensor-core path here; the ``torch`` backend takes it."""
    return dtype in (torch.float32, torch.float16, torch.bfloat16)


def row_stats(x, templates, tau, precision):
    return torch.ops.ecloss_fast_C.row_stats(x, templates, tau,
                                             extension_precision(precision, "tf32"))


def column_sums(x, templates, tau, row_max, log_sum, precision):
    return torch.ops.ecloss_fast_C.column_sums(x, templates, tau, row_max, log_sum,
                                               extension_precision(precision, "tf32"))


def input_grad(x, templates, tau, row_max, log_sum, neg_entropy, prior, row_weight, precision):
    return torch.ops.ecloss_fast_C.input_grad(x, templates, tau, row_max, log_sum, neg_entropy,
                                              prior, row_weight,
                                              extension_precision(precision, "tf32"))
