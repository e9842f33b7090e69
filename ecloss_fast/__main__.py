"""``python -m ecloss_fast``: what this installation can run, for bug reports.

Prints the versions (ecloss-fast, Python, torch, triton, CUDA), every backend with
"available" or why not and how to get it, what ``precision=None`` resolves to for float32,
bfloat16 and float16 maps under the current ``torch.get_float32_matmul_precision()``, the
``cpu`` backend's instruction-set path (and the paths this CPU has), the torch the
built extension ``ecloss_fast._C`` was built against (a mismatch said plainly, with how
to rebuild), and the GPU architectures it carries code for.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess

import torch

import ecloss_fast
from ecloss_fast import _dispatch
from ecloss_fast._precision import resolve_precision

_EXTENSION = "ecloss_fast._C"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _cuda() -> str:
    if torch.version.cuda is None:
        return "none (torch is a CPU build)"
    if not torch.cuda.is_available():
        return f"{torch.version.cuda} (torch's build); no CUDA device visible"
    devices = ", ".join(
        "{} (sm_{}{})".format(torch.cuda.get_device_name(index),
                              *torch.cuda.get_device_capability(index))
        for index in range(torch.cuda.device_count()))
    return f"{torch.version.cuda} (torch's build); devices: {devices}"


def _cuobjdump() -> str | None:
    """CUDA's cuobjdump: the one on PATH, else the copy that Triton ships."""
    found = shutil.which("cuobjdump")
    if found is not None:
        return found
    try:
        from triton import knobs
    except ImportError:
        return None
    return knobs.nvidia.cuobjdump.path


def _extension_torch() -> str:
    cpp_cpu = _dispatch._load("cpu")[0]  # the cpu backend is the extension's loader
    if importlib.util.find_spec(_EXTENSION) is None:
        return "not built"
    problem = cpp_cpu.build_problem()
    if problem is not None:
        return f"MISMATCH: {problem}"
    built = cpp_cpu.extension_torch_version()
    if built is None:
        return ("not recorded (built before ecloss-fast recorded it); rebuild it if it does "
                "not load: `python setup.py build_ext --inplace --force`")
    return f"torch {built} (the running torch)"


def _extension_architectures() -> str:
    why_not = _dispatch._load("cpu")[1]  # the cpu backend is the extension's loader
    if why_not is not None:
        return why_not
    path = importlib.util.find_spec(_EXTENSION).origin
    if not torch._C._dispatch_has_kernel_for_dispatch_key("ecloss_fast_C::row_stats", "CUDA"):
        return f"{path}: the C++ CPU kernels only, no CUDA kernels"
    tool = _cuobjdump()
    if tool is None:
        return f"{path}: CUDA kernels (architectures unknown: no cuobjdump found)"
    listed = {}
    for kind in ("elf", "ptx"):
        listing = subprocess.run([tool, f"--list-{kind}", path], capture_output=True,
                                 text=True).stdout
        listed[kind] = sorted(set(re.findall(r"\bsm_\d+[a-z]?", listing)),
                              key=lambda arch: int(re.sub(r"\D", "", arch)))
    ptx = f"; PTX for {', '.join(listed['ptx'])}" if listed["ptx"] else "; no PTX"
    return f"{path}: CUDA kernels for {', '.join(listed['elf']) or 'none'}{ptx}"


def _cpu_path() -> str:
    """The cpu backend's instruction-set path in use and the paths this CPU has."""
    if _dispatch._load("cpu")[1] is not None:
        return "none: the C++ extension is not built"
    from ecloss_fast.backends import cpp_cpu

    try:
        in_use = cpp_cpu.isa_in_use()
    except ValueError as error:
        return str(error)
    cap = os.environ.get(cpp_cpu.ISA_VARIABLE)
    why = f"set by {cpp_cpu.ISA_VARIABLE}={cap}" if cap else "the best this CPU has"
    return f"{in_use} ({why}); this CPU has: {', '.join(cpp_cpu.isa_paths())}"


def _cpu_auto() -> str:
    """What ``backend="auto"`` runs for CPU maps here (its CPU order: ``cpu``, then ``torch``),
    and why it passes over ``cpu``; without calling auto, which warns."""
    if _dispatch._load("cpu")[1] is not None:
        return "torch (backend cpu is not available)"
    from ecloss_fast.backends import cpp_cpu

    try:
        why = cpp_cpu.slower_here()
    except ValueError as error:  # a bad ECLOSS_FAST_CPU_ISA
        return str(error)
    return "cpu" if why is None else f"torch ('cpu' passed over: {why})"


def report() -> str:
    """The report ``python -m ecloss_fast`` prints."""
    lines = [
        ("ecloss-fast", ecloss_fast.__version__),
        ("python", f"{platform.python_version()} ({platform.system()} {platform.machine()})"),
        ("torch", torch.__version__),
        ("triton", _triton_version()),
        ("CUDA", _cuda()),
    ]
    for name in _dispatch.BACKENDS:
        why_not = None if name == "reference" else _dispatch._load(name)[1]
        lines.append((f"backend {name}", "available" if why_not is None else why_not))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lines.append((f"precision=None, {str(dtype).removeprefix('torch.')}",
                      resolve_precision("", dtype)))
    lines.append(("float32 matmul precision", repr(torch.get_float32_matmul_precision())))
    lines.append(("cpu backend path", _cpu_path()))
    lines.append(("auto on the CPU", _cpu_auto()))
    lines.append(("extension built against", _extension_torch()))
    lines.append(("extension", _extension_architectures()))
    width = max(len(key) for key, _ in lines)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in lines)


if __name__ == "__main__":
    print(report())
