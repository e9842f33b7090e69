"""The comparison every kernel test makes (docs/design.md section 4.4): a result against its
float64 truth, within a relative bound or a few times the error of PyTorch's own float32
evaluation of the same formula with the kernels' operand rounding (the baseline)."""
import contextlib

import torch

from ecloss_fast._precision import HALF_OPERAND_DTYPES

# Relative bounds of docs/design.md section 4.4 per precision; float16 products round the
# templates to float16's mantissa, as TF32 does (2^-11).
PRECISION_RELATIVE = {"ieee": 1e-5, "tf32": 3e-3, "bf16": 3e-2, "fp16": 3e-3}
BASELINE_MARGIN = 8.0  # a kernel may be this many times less exact than PyTorch's float32


def rounded(tensor, precision):
    """``tensor`` in float32 with the operand rounding the kernels apply at ``precision``
    (TF32's comes from torch's own switch: ``tf32_products``)."""
    half = HALF_OPERAND_DTYPES.get(precision)
    return tensor.float() if half is None else tensor.to(half).float()


@contextlib.contextmanager
def tf32_products(enabled):
    """torch's float32 CUDA GEMMs in TF32 within the block when ``enabled``, for the float32
    baselines of ``"tf32"``; the switch is restored after."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def assert_close(name, got, truth, baseline, relative, scale=0.0, margin=BASELINE_MARGIN):
    """``got`` within ``relative`` of ``truth`` (or of ``scale``, the size of the terms whose
    difference ``truth`` is, where that matters), or within ``margin`` times ``baseline``'s
    own error, in norm."""
    error = (got.double() - truth).norm().item()
    allowed = max(relative * max(truth.norm().item(), scale),
                  margin * (baseline.double() - truth).norm().item(), 1e-30)
    assert error <= allowed, f"{name}: error {error:.3g} > allowed {allowed:.3g}"
