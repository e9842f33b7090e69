"""Timing of one callable: warm-up, then the median of many repeats, rotating input sets.

On CUDA each repeat sits between two CUDA events (no host clock, no synchronisation
inside the timed region); on the CPU between two reads of a clock: ``"wall"``
(``perf_counter``) or ``"cpu"`` (``process_time``, the CPU time of the whole process).
The CPU clock is for single-threaded runs on a shared machine: there it counts only the
time the process ran, so other processes' load does not enter the numbers; on an idle
machine a single-threaded run gives the same time on both clocks. The callable
takes the index of the input set to use, so consecutive repeats read different buffers
and the caches hold none of them when the inputs are larger than half the cache.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

__all__ = ["TimingPlan", "Timing", "CLOCKS", "measure", "matmul_peak_tflops"]


@dataclass(frozen=True)
class TimingPlan:
    """How hard to time: ``warmup`` calls, then repeats until ``min_repeats`` are done and
    ``budget_s`` seconds are spent, at most ``max_repeats``."""

    warmup: int
    min_repeats: int
    max_repeats: int
    budget_s: float


@dataclass(frozen=True)
class Timing:
    """Median and quartiles of the repeats, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "q1_ms": self.q1_ms, "q3_ms": self.q3_ms,
                "repeats": self.repeats}


def _quartiles(samples_ms: list[float]) -> Timing:
    if len(samples_ms) == 1:
        only = samples_ms[0]
        return Timing(only, only, only, 1)
    q1, median, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return Timing(median, q1, q3, len(samples_ms))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(fn, input_sets: int, device: torch.device, plan: TimingPlan,
            clock: str = "wall") -> Timing:
    """Time ``fn(i)`` with ``i`` cycling over ``range(input_sets)``; ``clock`` is ``"wall"``
    or ``"cpu"`` (used on the CPU only)."""
    now = CLOCKS[clock]
    for i in range(plan.warmup):
        fn(i % input_sets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples_ms: list[float] = []
    start_wall = time.perf_counter()
    while len(samples_ms) < plan.max_repeats:
        index = len(samples_ms) % input_sets
        if device.type == "cuda":
            # Launch a batch of repeats between events, then read them all at once.
            batch = min(plan.max_repeats - len(samples_ms), input_sets)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(batch)]
            for offset, (begin, end) in enumerate(events):
                begin.record()
                fn((index + offset) % input_sets)
                end.record()
            torch.cuda.synchronize(device)
            samples_ms.extend(begin.elapsed_time(end) for begin, end in events)
        else:
            begin = now()
            fn(index)
            samples_ms.append((now() - begin) * 1e3)
        spent = time.perf_counter() - start_wall
        if len(samples_ms) >= plan.min_repeats and spent >= plan.budget_s:
            break
    return _quartiles(samples_ms)


def matmul_peak_tflops(device: torch.device, precision: str, plan: TimingPlan,
                       clock: str = "wall") -> float:
    """Measured matrix-unit rate of ``torch.matmul`` on this device, in TFLOP/s.

    ``precision``: ``"bf16"`` (bfloat16 operands), ``"tf32"`` or ``"ieee"`` (float32 with
    TF32 on or off). Square products of random data (zeros run faster on some cards), large
    enough to fill the chip: 8192 on CUDA, 2048 on the CPU (where 1024 stays below what
    MKL's sgemm reaches).
    """
    size = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    left = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    right = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        timing = measure(lambda _: torch.matmul(left, right), 1, device, plan, clock)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2 * size**3 / (timing.median_ms * 1e-3) / 1e12
