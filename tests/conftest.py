"""Shared markers and fixtures, and the isolation that lets every test pass in any order.

``_isolated_process_state`` (autouse) puts back, after each test, the process-wide state a
test or the code under test may change: environment variables, torch's global switches
(matmul precision, threads, determinism, subnormal flushing, default dtype, grad mode), the
global random generators, and Triton's language modules as imported. The last one is not a
test's doing: Triton's interpreter (3.8) leaves its patches of ``triton.language`` in place,
so a later ``triton.compile`` in the process would fail (see
``ecloss_fast.triton_kernels.interpreter``, which undoes them after each launch and whose
snapshot and restore this isolation shares).
"""
import contextlib
import os
import random

import numpy as np
import pytest
import torch

from ecloss_fast.triton_kernels import interpreter as triton_interpreter


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _flushes_subnormals() -> bool:
    """torch has a setter for flush-to-zero but no getter: a subnormal times one tells."""
    return (torch.tensor(1e-40) * 1.0).item() == 0.0


try:  # taken at import, before any test ran: Triton as it is without the interpreter
    _TRITON_AS_IMPORTED = triton_interpreter.language_names()
except ImportError:  # no triton
    _TRITON_AS_IMPORTED = []


@contextlib.contextmanager
def _torch_switches_restored():
    saved = (torch.get_float32_matmul_precision(), torch.get_num_threads(),
             torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             _flushes_subnormals(), torch.get_default_dtype(), torch.is_grad_enabled())
    try:
        yield
    finally:
        (precision, threads, deterministic, warn_only, benchmark, cudnn_deterministic,
         flush, dtype, grad) = saved
        torch.set_float32_matmul_precision(precision)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.set_flush_denormal(flush)
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)


@contextlib.contextmanager
def _random_state_restored():
    """Each test draws from the global generators as if it ran first."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


@contextlib.contextmanager
def _environment_restored():
    saved = dict(os.environ)
    try:
        yield
    finally:
        if dict(os.environ) != saved:
            os.environ.clear()
            os.environ.update(saved)


@pytest.fixture(autouse=True)
def _isolated_process_state():
    with _environment_restored(), _torch_switches_restored(), _random_state_restored():
        try:
            yield
        finally:
            triton_interpreter.restore_language(_TRITON_AS_IMPORTED)


@pytest.fixture
def one_thread():
    """Tiny models and convolutions: OpenMP threads only add contention on a 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cpu_isa_paths() -> list[str]:
    """The ``cpu`` backend's instruction-set paths this CPU has (none without the extension)."""
    from ecloss_fast.backends import cpp_cpu

    return cpp_cpu.isa_paths() if cpp_cpu.availability() is None else []


CPU_ISA_PATHS = _cpu_isa_paths()


@pytest.fixture(params=CPU_ISA_PATHS or [None])
def cpu_isa(request):
    """Runs the test once per instruction-set path of the ``cpu`` backend that this CPU has
    (``ECLOSS_FAST_CPU_ISA``): an AVX-512 BF16 machine runs all four, an AVX2 one two, so a
    path that breaks is caught on any machine that has it. ``None`` without the extension
    (the test's own skip then applies). The environment is restored after the test."""
    if request.param is not None:
        os.environ["ECLOSS_FAST_CPU_ISA"] = request.param
    return request.param
