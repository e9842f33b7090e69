"""Peak memory of one call beyond what was allocated before it.

CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus the allocation
before. CPU: the resident set's high-water mark (``VmHWM``, reset by writing 5 to
``/proc/self/clear_refs``) minus the resident set before the call. Memory that the C
allocator keeps after earlier frees would be reused without raising the resident set,
so ``malloc_trim`` hands it back first; checked against a fresh interpreter per case in
bench/NOTES.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import re

import torch

__all__ = ["peak_bytes"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M).group(1))


def _release_free_heap() -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):  # glibc only
            libc.malloc_trim(0)


def _cpu_peak_bytes(fn) -> int:
    _release_free_heap()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def _cuda_peak_bytes(fn, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_bytes(fn, device: torch.device) -> int:
    """Bytes that ``fn()`` needs on ``device`` at its peak, beyond what was allocated before."""
    if device.type == "cuda":
        return _cuda_peak_bytes(fn, device)
    return _cpu_peak_bytes(fn)
