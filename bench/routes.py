"""What is measured: a *route* is one backend of ``ecloss_fast``, ``auto`` or a baseline,
with one estimator; this module builds its loss callable and the inputs it runs on.

Baselines: ``sdpa`` and ``sdpa-flash`` (PyTorch's fused attention, uniform only, see
bench/sdpa_route.py) and ``reference-compiled``, the reference under ``torch.compile``
(Inductor), compiled afresh for each case and estimator. ``auto`` is what ``ecloss`` runs
with ``backend="auto"``. ``cpu@avx2`` and the other paths of the ``cpu`` backend below the
best one the CPU has (``cpu_path_routes``) are the ``cpu`` backend with
``ECLOSS_FAST_CPU_ISA`` set to the path while the route is measured
(``route_environment``): one run times every path side by side, each against its own FMA
floor (bench/peak.py). These run only in the cases that name them (``ON_REQUEST``).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch._functorch.config

import ecloss_fast as ef
from ecloss_fast._dispatch import resolve_backend
from ecloss_fast.backends import cpp_cpu
from bench.grids import Case
from bench.sdpa_route import sdpa_ecloss
from ecloss_fast.testing import peaked_maps

__all__ = ["SDPA", "SDPA_FLASH", "REFERENCE_COMPILED", "AUTO", "BASELINES", "ON_REQUEST",
           "CPU_PATH_ROUTES", "ESTIMATORS", "Route", "case_backends", "routes_for", "make_loss",
           "make_inputs", "runs_on", "why_not", "skipped_routes", "cpu_path",
           "cpu_path_routes", "route_environment"]

SDPA = "sdpa"  # PyTorch's memory-efficient attention (on the CPU: its fused CPU kernel)
SDPA_FLASH = "sdpa-flash"  # PyTorch's FlashAttention-2 kernel: CUDA, float16/bfloat16 only
REFERENCE_COMPILED = "reference-compiled"  # the reference under torch.compile (Inductor)
AUTO = "auto"  # the backend ecloss picks with backend="auto"
BASELINES = (SDPA, SDPA_FLASH, REFERENCE_COMPILED)
_UNIFORM_ONLY = (SDPA, SDPA_FLASH)
# "cpu@<path>": the cpu backend on one instruction-set path; it repeats the cpu route's work.
CPU_PATH_ROUTES = tuple(f"cpu@{path}" for path in cpp_cpu.ISA_PATHS)
# Routes that run only in the cases that name them: auto and the cpu paths repeat another
# backend; the compiled reference takes seconds to minutes to compile per case and estimator.
ON_REQUEST = (AUTO, REFERENCE_COMPILED, *CPU_PATH_ROUTES)
ESTIMATORS = ("uniform", "marginal")


@dataclass(frozen=True)
class Route:
    """``backend``: an ``ecloss_fast`` backend name, ``AUTO`` or one of ``BASELINES`` or
    ``CPU_PATH_ROUTES``."""

    backend: str
    estimator: str


def cpu_path(backend: str) -> str | None:
    """The instruction-set path a ``cpu@<path>`` route names; None for any other route."""
    return backend.removeprefix("cpu@") if backend in CPU_PATH_ROUTES else None


def cpu_path_routes() -> list[str]:
    """The ``cpu@<path>`` routes of the paths this CPU has below its best (the ``cpu`` route
    runs the best); none without the extension."""
    if cpp_cpu.availability() is not None:
        return []
    return [f"cpu@{path}" for path in cpp_cpu.isa_paths()[:-1]]


@contextlib.contextmanager
def route_environment(backend: str):
    """``ECLOSS_FAST_CPU_ISA`` set to a ``cpu@<path>`` route's path while it runs (the
    variable as it was afterwards); nothing for any other route."""
    path = cpu_path(backend)
    if path is None:
        yield
        return
    before = os.environ.get(cpp_cpu.ISA_VARIABLE)
    os.environ[cpp_cpu.ISA_VARIABLE] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ[cpp_cpu.ISA_VARIABLE]
        else:
            os.environ[cpp_cpu.ISA_VARIABLE] = before


def _why_not_path(path: str, device: torch.device) -> str | None:
    if device.type != "cpu":
        return "the cpu backend's instruction-set paths run on the CPU only"
    if cpp_cpu.availability() is not None:
        return cpp_cpu.availability()
    paths = cpp_cpu.isa_paths()
    if path not in paths:
        return f"this CPU has no {path} path (it has: {', '.join(paths)})"
    if path == paths[-1]:
        return f"{path} is this CPU's best path, which the cpu route runs"
    return None


def why_not(backend: str, device: torch.device, dtype: torch.dtype, pixels: int) -> str | None:
    """Why ``backend`` cannot take maps of this device, dtype and ``K = pixels`` here;
    ``None`` when it can."""
    if (path := cpu_path(backend)) is not None:
        return _why_not_path(path, device) or why_not("cpu", device, dtype, pixels)
    if backend == SDPA:
        if dtype == torch.float64 and device.type != "cpu":
            return "PyTorch's memory-efficient attention takes no float64 on CUDA"
        return None
    if backend == SDPA_FLASH:
        if device.type != "cuda":
            return "PyTorch's FlashAttention kernel runs on CUDA only"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"PyTorch's FlashAttention kernel takes float16 and bfloat16 only, not {dtype}"
        return None
    if backend == REFERENCE_COMPILED:
        return None  # a failed compilation is recorded as the route's error
    try:
        resolve_backend(backend, device, dtype, pixels)
    except (ValueError, TypeError, ef.BackendUnavailableError) as error:
        return str(error)
    return None


def runs_on(backend: str, device: torch.device, dtype: torch.dtype, pixels: int) -> bool:
    """Whether ``backend`` is available here and takes maps of this device, dtype and size."""
    return why_not(backend, device, dtype, pixels) is None


def _computes(backend: str, estimator: str) -> bool:
    return backend not in _UNIFORM_ONLY or estimator == "uniform"


def case_backends(case: Case, backends) -> list[str]:
    """The requested ``backends`` that ``case`` runs: those of ``case.backends``, or when it
    names none all but the ``ON_REQUEST`` ones that it does not list in ``extra_routes``."""
    if case.backends is not None:
        return [b for b in backends if b in case.backends]
    return [b for b in backends if b not in ON_REQUEST or b in case.extra_routes]


def routes_for(backends, estimators, device: torch.device, dtype: torch.dtype,
               pixels: int) -> list[Route]:
    """Every requested (backend, estimator) pair that can run maps of this dtype and
    ``K = pixels``; SDPA computes uniform only."""
    return [Route(backend, estimator) for backend in backends for estimator in estimators
            if runs_on(backend, device, dtype, pixels) and _computes(backend, estimator)]


def skipped_routes(backends, estimators, device: torch.device, shapes) -> list[str]:
    """One line per requested backend that will not run some of the cases, saying why:
    ``"triton (float32 on cpu): the triton backend needs a CUDA GPU ..."``. ``shapes``:
    the grid's ``(dtype name, pixels per map)`` pairs."""
    lines = []
    for backend in backends:
        if not any(_computes(backend, estimator) for estimator in estimators):
            lines.append(f"{backend}: computes the uniform estimator only; --estimators "
                         f"asks for {' '.join(estimators)}")
            continue
        reasons: dict[str, list[str]] = {}
        for name, pixels in shapes:
            why = why_not(backend, device, getattr(torch, name), pixels)
            if why is not None and name not in reasons.setdefault(why, []):
                reasons[why].append(name)
        lines += [f"{backend} ({', '.join(names)} on {device.type}): {why}"
                  for why, names in reasons.items()]
    return lines


def _case_templates(case: Case, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    subset = None if case.templates == "full" else case.templates
    return ef.make_templates(case.height, case.width, subset=subset, device=device, dtype=dtype)


def _compiled_reference(case: Case, estimator: str, device: torch.device):
    # The backward is timed as autograd.grad(..., retain_graph=True) on one forward's graph,
    # which AOTAutograd refuses when its backward reuses ("donates") the saved tensors. Its
    # on-disk cache does not key on that setting (a graph cached with donation fails the
    # same way), so it is off too; Inductor's kernel cache still spares recompiling kernels.
    torch._functorch.config.donated_buffer = False
    torch._functorch.config.enable_autograd_cache = False
    # A fresh compile per case and estimator: shapes static, as a user compiling one model
    # gets, and no route falls back to eager by reaching Dynamo's recompile limit.
    torch._dynamo.reset()
    accumulate = torch.float64 if case.dtype == "float64" else torch.float32
    templates = _case_templates(case, device, accumulate)
    return torch.compile(lambda x: ef.ecloss(x, templates=templates, estimator=estimator,
                                             backend="reference"))


def make_loss(case: Case, route: Route, device: torch.device):
    """``x -> scalar loss`` (mean over channels) for this case and route."""
    if route.backend in _UNIFORM_ONLY:
        templates = _case_templates(case, device)
        kernel = "flash" if route.backend == SDPA_FLASH else "efficient"
        return lambda x: sdpa_ecloss(x, templates, kernel=kernel)
    if route.backend == REFERENCE_COMPILED:
        return _compiled_reference(case, route.estimator, device)
    precision = None if case.precision == "fp16" else case.precision  # see Case
    backend = "cpu" if cpu_path(route.backend) else route.backend  # see route_environment
    return lambda x: ef.ecloss(x, templates=case.templates, estimator=route.estimator,
                               backend=backend, precision=precision)


def make_inputs(case: Case, device: torch.device, count: int) -> list[torch.Tensor]:
    """``count`` independent input sets: maps with a peaked softmax, as trained maps have
    (seeds 0, 1, ...), in the case's dtype, requiring grad."""
    dtype = getattr(torch, case.dtype)
    return [peaked_maps(case.batch, case.channels, case.height, case.width, seed=seed)
            .to(device=device, dtype=dtype).requires_grad_()
            for seed in range(count)]
