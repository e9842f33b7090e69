"""The names of product precisions (docs/design.md section 4.3), in one place for every layer.

Three vocabularies, each built on the one before:

* ``PRECISIONS`` (``"ieee"``, ``"tf32"``, ``"bf16"``): what ``precision=`` takes, and what the
  C++ extension knows (its ``enum class Precision``; ``torch.ops.ecloss_fast_C.precisions()``
  lists its names, which the ``cpu`` backend compares with these when it loads the extension).
* ``RESOLVED_PRECISIONS``: what a backend receives, ``resolve_precision``'s results:
  ``PRECISIONS`` and ``FLOAT16`` (``"fp16"``), the resolution of ``precision=None`` for
  float16 maps (products of float16 operands), which only that resolution produces. A
  backend without float16 products runs another precision (``extension_precision``).
* ``OPERANDS``: what a Triton kernel's matrix unit multiplies (its ``OPERANDS`` constexpr,
  ``triton_kernels/_tiles.py``): the resolved precisions, ``"fp64"`` for float64 maps, and
  the interpreter's ``"_emulated"`` kinds, which compute the same products another way
  (``triton_operands``). Launch configurations are kept per ``OPERAND_KINDS``.
"""
from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "FLOAT16", "RESOLVED_PRECISIONS", "HALF_OPERAND_DTYPES", "FP64",
           "OPERAND_KINDS", "OPERANDS", "resolve_precision", "extension_precision",
           "triton_operands", "operand_kind"]

PRECISIONS = ("ieee", "tf32", "bf16")
FLOAT16 = "fp16"
RESOLVED_PRECISIONS = PRECISIONS + (FLOAT16,)
# The precisions whose products take operands rounded to a half type.
HALF_OPERAND_DTYPES = {"bf16": torch.bfloat16, FLOAT16: torch.float16}

FP64 = "fp64"
OPERAND_KINDS = ("bf16", FLOAT16, "tf32", "ieee", FP64)
_EMULATED = "_emulated"
OPERANDS = OPERAND_KINDS + tuple(kind + _EMULATED for kind in ("ieee", "bf16", FLOAT16))

_MATMUL_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "bf16"}
_HALF_PRECISION = {torch.float16: FLOAT16, torch.bfloat16: "bf16"}


def resolve_precision(precision: str, dtype: torch.dtype = torch.float32) -> str:
    """The matrix-unit precision for maps of ``dtype``; ``""`` is the API's ``precision=None``.

    ``None`` gives float16 and bfloat16 maps products in their own half type (``FLOAT16``
    and ``"bf16"``), so half-precision maps never take the slow float32 path; float32 maps
    follow ``torch.get_float32_matmul_precision()`` ("highest" ieee, "high" tf32, "medium"
    bf16); float64 maps compute in float64, which every backend does for them whatever the
    precision. Resolved inside the ops, at run time, so a compiled graph follows the
    setting too.
    """
    if precision:
        return precision
    if dtype in _HALF_PRECISION:
        return _HALF_PRECISION[dtype]
    if dtype == torch.float64:
        return "ieee"
    return _MATMUL_PRECISION[torch.get_float32_matmul_precision()]


def extension_precision(precision: str, float16_products: str) -> str:
    """The C++ extension's name for a resolved ``precision``: it knows ``PRECISIONS``, and
    ``FLOAT16`` takes ``float16_products``, the precision the caller's kernels run instead."""
    return float16_products if precision == FLOAT16 else precision


def triton_operands(dtype: torch.dtype, precision: str, interpreted: bool) -> str:
    """The Triton kernels' ``OPERANDS`` for maps of ``dtype`` at the resolved ``precision``.

    ``"fp64"`` for float64 maps, whatever the precision. The one place that routes products
    to their emulated kinds under the interpreter: half-precision products to float32
    products of half-rounded operands, since its bfloat16 ``tl.dot`` is wrong (triton 3.8),
    and float32 products to float64 sums (``"ieee_emulated"``), since its float32 ``tl.dot``
    (numpy's matmul) sums in an order that depends on the tile shape and the CPU, so two
    kernels would round the same score differently (docs/design.md section 4.1). The
    interpreter has no TF32: ``"tf32"`` is emulated as ``"ieee"``.
    """
    if dtype == torch.float64:
        return FP64
    if precision not in RESOLVED_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, RESOLVED_PRECISIONS))}, "
                         f"got {precision!r}")
    if interpreted:
        return ("ieee" if precision == "tf32" else precision) + _EMULATED
    return precision


def operand_kind(operands: str) -> str:
    """The ``OPERAND_KINDS`` entry of an ``OPERANDS`` value: its own, an emulation its
    kind's."""
    return operands.removesuffix(_EMULATED)
