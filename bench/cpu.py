"""What the CPU is: its model, the instruction-set flags the kernels care about, and the
``cpu`` backend's path, recorded beside every CPU figure (results.json's ``meta.cpu``)."""
from __future__ import annotations

import platform

__all__ = ["cpu_flags", "cpu_model", "has_bf16_arithmetic", "describe_cpu", "KERNEL_FLAGS"]

# The flags that decide which kernels run: the cpu backend's paths (csrc/cpu_kernels.cpp),
# bench/fma_peak.c's kernels and torch's bfloat16 GEMMs.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512vl", "avx512dq", "avx512bw", "avx512_bf16",
                "amx_bf16")


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The flags of /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "cpu"


def has_bf16_arithmetic() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX). Without it
    torch's bfloat16 GEMMs are emulated at about 1 GFLOP/s (2026-12-07, an AVX2-only EPYC)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def describe_cpu() -> dict:
    """``{"model", "flags", "cpu_backend_path"}``: the model name, which of ``KERNEL_FLAGS``
    the CPU has, and the instruction-set path the ``cpu`` backend runs (None without the
    extension)."""
    from ecloss_fast.backends import cpp_cpu

    flags = cpu_flags()
    path = cpp_cpu.isa_in_use() if cpp_cpu.availability() is None else None
    return {"model": cpu_model(), "flags": [flag for flag in KERNEL_FLAGS if flag in flags],
            "cpu_backend_path": path}
