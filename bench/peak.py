"""The rates that ``% peak`` divides by, and the GEMM rates beside them.

CUDA: ``torch.matmul`` of 8192^3 random matrices at each precision (bf16, tf32, ieee): the
matrix units are what the loss's GEMMs run on. CPU: a GEMM is not the roof (MKL's sgemm
at 2048^3 reaches about three quarters of what the FMA units do), so the peak is the FMA
rate of bench/fma_peak.c, compiled now with the system C compiler and loaded with ctypes:
float32 FMAs (AVX-512, else AVX2+FMA) for ``ieee`` and ``tf32`` (the CPU has no TF32), and
``vdpbf16ps`` (a pair of bfloat16 products per float32 lane) for ``bf16`` where the CPU has
avx512_bf16, else float32 FMAs. One OpenMP thread per benchmark thread. Without a
compiler (or on a CPU that is not x86-64) the peak falls back to the GEMM rates, and
``peak_source`` in results.json says so.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.cpu import cpu_flags, has_bf16_arithmetic
from bench.timing import CLOCKS, TimingPlan, matmul_peak_tflops

__all__ = ["FmaPeakUnavailable", "FmaKernel", "FmaLibrary", "build_fma_library", "fma_rate_tflops",
           "measure_peaks", "higher_peaks", "PRECISIONS"]

PRECISIONS = ("bf16", "tf32", "ieee")
_SOURCE = Path(__file__).with_name("fma_peak.c")
_GEMM_PLAN = TimingPlan(warmup=2, min_repeats=5, max_repeats=20, budget_s=0.3)
_BF16_ONE = 0x3F80  # the bfloat16 bit pattern of 1.0


class FmaPeakUnavailable(RuntimeError):
    """The FMA microbenchmark cannot run here; the message says why."""


@dataclass(frozen=True)
class FmaKernel:
    """One kernel of bench/fma_peak.c: its symbol, the /proc/cpuinfo flags it needs, the
    operand type, and per thread its chains, float32 lanes and flops per lane per iteration."""

    symbol: str
    cpu_flags: tuple[str, ...]
    operands: str
    chains: int
    lanes: int
    flops_per_lane: int

    @property
    def flops_per_iteration(self) -> int:
        """Per thread."""
        return self.chains * self.lanes * self.flops_per_lane


class FmaLibrary:
    """The compiled bench/fma_peak.c: its kernels, the compiler that built it."""

    def __init__(self, library: ctypes.CDLL, compiler: str, with_bf16: bool):
        self._library, self.compiler, self.with_bf16 = library, compiler, with_bf16

    def kernel(self, symbol: str, cpu_flags, operands: str) -> FmaKernel:
        chains, lanes, flops = (ctypes.c_int * 3).in_dll(self._library, f"{symbol}_shape")
        return FmaKernel(symbol, tuple(cpu_flags), operands, chains, lanes, flops)

    def run(self, kernel: FmaKernel, threads: int, iterations: int, first: float,
            second: float) -> np.ndarray:
        """Final accumulators ``(threads, chains, lanes)``: float32 kernels do ``acc = acc *
        first + second``; the bf16 kernel ``acc += first * second + first * second`` with
        both operands rounded to bfloat16. Chain ``j`` starts at ``j + 1``."""
        if threads < 1 or iterations < 0:
            raise ValueError(f"threads must be >= 1 and iterations >= 0; got {threads}, "
                             f"{iterations}")
        out = np.zeros((threads, kernel.chains, kernel.lanes), dtype=np.float32)
        function = getattr(self._library, kernel.symbol)
        if kernel.operands == "bf16":
            operand_type = ctypes.c_uint16
            first, second = _bf16_bits(first), _bf16_bits(second)
        else:
            operand_type = ctypes.c_float
        function.argtypes = [ctypes.c_int, ctypes.c_int64, operand_type, operand_type,
                             ctypes.POINTER(ctypes.c_float)]
        function.restype = None
        function(threads, iterations, first, second,
                 out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        return out


def _bf16_bits(value: float) -> int:
    """The bfloat16 nearest ``value`` (round to nearest even), as its 16-bit pattern."""
    return int(torch.tensor(value, dtype=torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def _compiler() -> list[str] | None:
    """The C compiler: ``$CC``, else the one Python was built with, else cc, gcc or clang."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC")):
        if candidate:
            words = shlex.split(candidate)
            if words and shutil.which(words[0]):
                return words
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def build_fma_library() -> FmaLibrary:
    """Compile bench/fma_peak.c into a temporary folder and load it; the bf16 kernel is left
    out when the compiler does not know avx512bf16. Raises ``FmaPeakUnavailable``."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise FmaPeakUnavailable(f"the kernels are x86-64; this CPU is {platform.machine()}")
    compiler = _compiler()
    if compiler is None:
        raise FmaPeakUnavailable("no C compiler found ($CC, cc, gcc, clang)")
    errors = []
    with tempfile.TemporaryDirectory(prefix="fma_peak_") as folder:
        for with_bf16 in (True, False):
            target = Path(folder) / f"fma_peak{'_bf16' if with_bf16 else ''}.so"
            command = [*compiler, "-O2", "-fopenmp", "-shared", "-fPIC",
                       *(["-DFMA_PEAK_BF16"] if with_bf16 else []), str(_SOURCE), "-o",
                       str(target)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                      check=False)
            except (OSError, subprocess.TimeoutExpired) as error:
                raise FmaPeakUnavailable(f"{shlex.join(command)} failed: {error}") from error
            if done.returncode == 0:
                try:  # loaded before the folder goes: the mapping outlives the file
                    library = ctypes.CDLL(str(target))
                except OSError as error:
                    raise FmaPeakUnavailable(f"built {target.name}, could not load it: "
                                             f"{error}") from error
                return FmaLibrary(library, shlex.join(compiler), with_bf16)
            errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"])
    raise FmaPeakUnavailable(f"{shlex.join(compiler)} could not build {_SOURCE.name}: "
                             + "; ".join(e[0] for e in errors))


def fma_rate_tflops(library: FmaLibrary, kernel: FmaKernel, threads: int, *, clock: str = "wall",
                    seconds: float = 0.1, repeats: int = 5) -> float:
    """The best of ``repeats`` runs of about ``seconds`` each, in TFLOP/s over all threads."""
    now = CLOCKS[clock]
    operands = (1.0, 1.0) if kernel.operands == "bf16" else (0.5, 0.25)  # no overflow, no subnormals

    def elapsed(iterations):
        begin = now()
        library.run(kernel, threads, iterations, *operands)
        return now() - begin

    iterations = 1 << 14
    while (spent := elapsed(iterations)) < seconds / 4:  # also starts the OpenMP threads
        iterations *= 4
    iterations = max(1, int(iterations * seconds / spent))
    best = min(elapsed(iterations) for _ in range(repeats))
    return threads * iterations * kernel.flops_per_iteration / best / 1e12


def _fma_kernels(library: FmaLibrary) -> dict[str, FmaKernel]:
    """The kernel this CPU runs for each operand type ("float32", and "bf16" when present)."""
    flags = cpu_flags()
    candidates = {"float32": [("fma_peak_f32_avx512", ("avx512f",)),
                              ("fma_peak_f32_avx2", ("avx2", "fma"))],
                  "bf16": [("fma_peak_bf16_avx512", ("avx512f", "avx512_bf16"))]}
    if not library.with_bf16:
        candidates["bf16"] = []
    chosen = {}
    for operands, options in candidates.items():
        for symbol, needs in options:
            if flags.issuperset(needs):
                chosen[operands] = library.kernel(symbol, needs, operands)
                break
    return chosen


def _cpu_peaks(threads: int, clock: str, matmul: dict) -> dict:
    try:
        library = build_fma_library()
        kernels = _fma_kernels(library)
        if "float32" not in kernels:
            raise FmaPeakUnavailable("the CPU has neither AVX-512 nor AVX2 with FMA")
    except FmaPeakUnavailable as why:
        fastest = max(("ieee", "bf16"), key=lambda p: matmul[p] or 0.0)
        return {"fma_peak": {"error": str(why)},
                "peak_tflops": {"ieee": matmul["ieee"], "tf32": matmul["ieee"],
                                "bf16": matmul[fastest]},
                "peak_source": {p: f"fallback, no FMA microbenchmark ({why}): torch.matmul "
                                   f"2048^3 {'bfloat16' if source == 'bf16' else 'float32'}"
                                for p, source in (("ieee", "ieee"), ("tf32", "ieee"),
                                                  ("bf16", fastest))}}
    rates = {operands: fma_rate_tflops(library, kernel, threads, clock=clock)
             for operands, kernel in kernels.items()}
    path_peaks = _path_peaks(library, kernels, rates, threads, clock)
    described = {operands: f"FMA microbenchmark {k.symbol} ({'+'.join(k.cpu_flags)}, "
                           f"{k.chains} chains per thread, {threads} threads)"
                 for operands, k in kernels.items()}
    bf16_basis = "bf16" if "bf16" in rates else "float32"
    return {"fma_peak_tflops": rates,
            "fma_peak": {"compiler": library.compiler, "threads": threads,
                         "kernels": {o: k.symbol for o, k in kernels.items()}},
            "peak_tflops": {"ieee": rates["float32"], "tf32": rates["float32"],
                            "bf16": rates[bf16_basis]},
            "peak_source": {"ieee": described["float32"], "tf32": described["float32"],
                            "bf16": described[bf16_basis]},
            "path_peak_tflops": path_peaks}


def _path_peaks(library: FmaLibrary, kernels: dict[str, FmaKernel], rates: dict, threads: int,
                clock: str) -> dict:
    """The floor of each instruction-set path of the ``cpu`` backend this CPU has
    (``ecloss_fast.backends.cpp_cpu.ISA_PATHS``), per operand type: ``avx2`` the AVX2 FMA
    rate (measured here when the float32 peak is AVX-512's), ``avx512`` the AVX-512 one,
    ``avx512_bf16`` that and the ``vdpbf16ps`` rate for its bfloat16 products. The baseline
    path (SSE2, no FMA) has no kernel: its routes keep the precision's peak."""
    flags = cpu_flags()
    float32 = kernels["float32"]
    if float32.symbol == "fma_peak_f32_avx2":
        avx2 = rates["float32"]
    else:
        avx2 = (fma_rate_tflops(library, library.kernel("fma_peak_f32_avx2", ("avx2", "fma"),
                                                        "float32"), threads, clock=clock)
                if flags.issuperset(("avx2", "fma")) else None)
    peaks = {"avx2": {"float32": avx2}} if avx2 else {}
    if float32.symbol == "fma_peak_f32_avx512":
        peaks["avx512"] = {"float32": rates["float32"]}
        if "bf16" in rates:
            peaks["avx512_bf16"] = {"float32": rates["float32"], "bf16": rates["bf16"]}
    return peaks


def measure_peaks(device: torch.device, clock: str = "wall") -> dict:
    """The ``meta`` fields of results.json: ``matmul_peak_tflops`` (GEMM rates per precision;
    on the CPU, bf16 is None where the CPU has no bfloat16 arithmetic),
    ``peak_tflops`` and ``peak_source`` (the ``% peak`` basis per precision and where it
    comes from) and, on the CPU, ``fma_peak_tflops`` ("float32", "bf16"), ``fma_peak``
    (kernels and compiler, or the error that made it fall back) and ``path_peak_tflops``
    (the floor of each ``cpu`` backend instruction-set path, ``_path_peaks``)."""
    if device.type == "cuda":
        matmul = {p: matmul_peak_tflops(device, p, _GEMM_PLAN, clock) for p in PRECISIONS}
        return {"matmul_peak_tflops": matmul, "peak_tflops": dict(matmul),
                "peak_source": {p: f"torch.matmul 8192^3 at {p}" for p in PRECISIONS}}
    # torch's bfloat16 GEMM is emulated where the CPU has no bfloat16 arithmetic (about 1
    # GFLOP/s: a 2048^3 product takes 14 s there): not measured, and None says so.
    matmul = {"ieee": matmul_peak_tflops(device, "ieee", _GEMM_PLAN, clock),
              "bf16": (matmul_peak_tflops(device, "bf16", _GEMM_PLAN, clock)
                       if has_bf16_arithmetic() else None)}
    started = time.perf_counter()
    peaks = _cpu_peaks(torch.get_num_threads(), clock, matmul)
    peaks["fma_peak"]["seconds"] = round(time.perf_counter() - started, 2)
    return {"matmul_peak_tflops": matmul, **peaks}


_RATES = ("matmul_peak_tflops", "peak_tflops", "fma_peak_tflops", "path_peak_tflops")


def higher_peaks(first: dict, second: dict) -> dict:
    """``first`` (``measure_peaks``'s fields) with each rate the higher of its two
    measurements: a measured rate is a lower bound of what the hardware does, and another
    process on the machine can only lower it (2026-12-07, a shared 2-core VM: one run of
    four measured the bf16 FMA rate at half its value, 0.234 against 0.467 TFLOP/s, and put
    every bf16 route under its floor). ``python -m bench`` measures the CPU's peaks before
    and after its cases."""
    def higher(one, other):
        if isinstance(one, dict):
            other = other if isinstance(other, dict) else {}
            return {key: higher(value, other.get(key)) for key, value in one.items()}
        if isinstance(one, float) and isinstance(other, float):
            return max(one, other)
        return one

    return {**first, **{key: higher(first[key], second.get(key)) for key in _RATES
                        if key in first}}
