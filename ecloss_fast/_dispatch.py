"""Backend names, their modules, availability, and what ``backend="auto"`` picks."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

__all__ = ["BACKENDS", "PRECISIONS", "available_backends", "backend_module", "resolve_backend",
           "resolve_precision", "BackendUnavailableError"]

BACKENDS = ("reference", "torch", "triton", "cuda", "cpu")
PRECISIONS = ("ieee", "tf32", "bf16")
_MATMUL_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "bf16"}
_HALF_PRECISION = {torch.float16: "fp16", torch.bfloat16: "bf16"}

_MODULES = {
    "torch": "ecloss_fast.backends.streaming",
    "triton": "ecloss_fast.backends.triton_fused",
    "cuda": "ecloss_fast.backends.cpp_cuda",
    "cpu": "ecloss_fast.backends.cpp_cpu",
}

# Fastest first, per device type (bench/NOTES.md, "auto on the CPU"). CPU, measured on the
# 2-core AMD EPYC build box (AVX-512 BF16), 2 threads, fwd+bwd, best of 3-7, float32 ieee:
# cpu ahead of torch at every size tried: 14x14 full set (B=8, C=64) 81 vs 89 ms uniform,
# 170 vs 262 ms marginal; 7x7 2.6 vs 4.0 ms; 28x28 (B=2, C=8) 346 vs 516 ms uniform, 815 vs
# 904 ms marginal. The torch backend needs no compiler, so it stays as the fallback. CUDA:
# not yet measured (no GPU run yet); the fused kernels first, by their flop and byte counts.
_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
_AUTO_FALLBACK = ("torch",)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says how to get it."""


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as error:
        return None, f"its module could not be imported ({error})"
    return module, module.availability()


def backend_module(name: str) -> ModuleType:
    """The module of a fused backend; raises ``BackendUnavailableError`` saying why not."""
    module, why_not = _load(name)
    if why_not is not None:
        raise BackendUnavailableError(f"ECLoss backend {name!r} is not available: {why_not}")
    return module


def available_backends() -> list[str]:
    """Backends that can run in this process, in the order of ``BACKENDS``."""
    return ["reference"] + [name for name in BACKENDS[1:] if _load(name)[1] is None]


def _accepts(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    module, why_not = _load(name)
    if why_not is not None or not module.supports(device):
        return False
    return getattr(module, "supports_dtype", lambda _: True)(dtype)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs ``x`` of this device and dtype; ``"auto"`` picks the fastest."""
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, _AUTO_FALLBACK):
            if _accepts(candidate, device, dtype):
                return candidate
        return "torch"
    if name == "reference":
        return name
    module = backend_module(name)
    if not module.supports(device):
        raise ValueError(f"backend {name!r} does not run tensors on {device.type}; "
                         f"x is on {device} (use backend='auto' or move x)")
    if not getattr(module, "supports_dtype", lambda _: True)(dtype):
        raise TypeError(f"backend {name!r} does not take x of dtype {dtype}; "
                        f"use backend='torch' or 'auto' for it")
    return name


def resolve_precision(precision: str, dtype: torch.dtype = torch.float32) -> str:
    """The matrix-unit precision for maps of ``dtype``; ``""`` is the API's ``precision=None``.

    ``None`` gives float16 and bfloat16 maps products in their own half type (``"fp16"``,
    which only this resolution produces, and ``"bf16"``), so half-precision maps never take
    the slow float32 path; float32 maps follow ``torch.get_float32_matmul_precision()``
    ("highest" ieee, "high" tf32, "medium" bf16); float64 maps compute in float64, which
    every backend does for them whatever the precision. Resolved inside the ops, at run
    time, so a compiled graph follows the setting too.
    """
    if precision:
        return precision
    if dtype in _HALF_PRECISION:
        return _HALF_PRECISION[dtype]
    if dtype == torch.float64:
        return "ieee"
    return _MATMUL_PRECISION[torch.get_float32_matmul_precision()]
