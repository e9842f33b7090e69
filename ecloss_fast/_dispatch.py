"""Backend names, their modules, availability, and what ``backend="auto"`` runs.

``auto`` is safe by construction. It takes the device's backends fastest first
(``_AUTO_ORDER``) and passes over one that is not available here, does not take the
maps (``supports``: device, dtype and pixels per map ``K``) or says that the next one is
faster here (``slower_here``: the ``cpu`` backend on its baseline instruction-set path).
Before a backend that builds kernels at run time (one with ``warm_up``: Triton) first
runs a *route* (device, map dtype, ``K``, precision, with or without a prior, and the
backend's ``launch_class``, e.g. its row tiles), the route's forward and backward kernels
are compiled and loaded without running (``warm_up``), and the verdict is kept for the process: a route that fails goes,
forward and backward alike (the backward's saved statistics assume the forward's scores),
to the next backend, with one warning saying why and what to do. A backend named
explicitly is not second-guessed: it raises its own error.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch

# Re-exported: the trainer's config and the benchmarks name the precisions through here.
from ecloss_fast._precision import PRECISIONS, resolve_precision

__all__ = ["BACKENDS", "PRECISIONS", "available_backends", "backend_module", "resolve_backend",
           "choose_backend", "auto_choice", "resolve_precision", "BackendUnavailableError"]

BACKENDS = ("reference", "torch", "triton", "cuda", "cpu")

_MODULES = {
    "torch": "ecloss_fast.backends.streaming",
    "triton": "ecloss_fast.backends.triton_fused",
    "cuda": "ecloss_fast.backends.cpp_cuda",
    "cpu": "ecloss_fast.backends.cpp_cpu",
}

# Fastest first, per device type; the torch backend needs no compiler, so it is the
# fallback. The CPU order is measured (on AVX-512 BF16 and AVX2 CPUs; on its baseline path
# the cpu backend says it is slower, ``slower_here``), the CUDA order is by the fused
# kernels' flop and byte counts: bench/NOTES.md ("auto on the CPU", "auto on an AVX2 CPU")
# and README.md (Benchmarks) say how far.
_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
_AUTO_FALLBACK = ("torch",)

# Route key -> None (the route runs) or why its warm-up failed: one verdict per process.
_VERDICTS: dict[tuple, str | None] = {}
# Build problems (backend_module's build_problem) auto has warned about.
_WARNED_BUILDS: set[str] = set()


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


def _takes(name: str, device: torch.device, dtype: torch.dtype, pixels: int) -> bool:
    """Whether auto may take backend ``name`` for maps of this device, dtype and ``K``: it is
    available, takes them and is not slower here than the next (``slower_here``); auto warns
    once when it passes over a backend whose build does not fit this process."""
    module, why_not = _load(name)
    if why_not is not None:
        problem = module is not None and getattr(module, "build_problem", lambda: None)()
        if problem and problem not in _WARNED_BUILDS:
            _WARNED_BUILDS.add(problem)
            warnings.warn(f"ecloss_fast: backend='auto' passes over {name!r}: {problem}",
                          RuntimeWarning, stacklevel=4)
        return False
    if not module.supports(device, dtype, pixels):
        return False
    slower_here = getattr(module, "slower_here", None)
    return slower_here is None or slower_here() is None


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, pixels: int) -> str:
    """The backend for maps of this device, dtype and ``K = pixels`` before any warm-up:
    ``name``, checked, or for ``"auto"`` the first of the device's order that is available
    and takes them (``choose_backend`` is what a loss call runs)."""
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, _AUTO_FALLBACK):
            if _takes(candidate, device, dtype, pixels):
                return candidate
        return "torch"
    if name == "reference":
        return name
    module = backend_module(name)
    if not module.supports(device, dtype, pixels):
        raise ValueError(f"backend {name!r} does not take x of dtype {dtype} on {device} with "
                         f"K = {pixels} pixels per map: it takes {module.TAKES} (use "
                         f"backend='auto' or 'torch' for these maps)")
    return name


def _route_key(name, module, device, dtype, shape, precision, prior) -> tuple:
    batch, channels, pixels = shape
    launch_class = getattr(module, "launch_class", lambda *args: None)
    return (name, str(device), dtype, pixels, precision, prior,
            launch_class(device, dtype, batch * channels, pixels, precision))


def _warm_up_failure(name, module, x, templates, tau, precision, prior) -> tuple[str | None, bool]:
    """Why the route of ``x`` fails on backend ``name`` (None: it runs), from its warm-up
    (once per route and process), and whether this call ran the warm-up."""
    warm_up = getattr(module, "warm_up", None)
    if warm_up is None:
        return None, False
    key = _route_key(name, module, x.device, x.dtype, x.shape, precision, prior)
    if key in _VERDICTS:
        return _VERDICTS[key], False
    try:
        warm_up(x, templates, tau, precision, prior)
        _VERDICTS[key] = None
    except torch.OutOfMemoryError:
        raise  # the device's memory, not the route: every backend needs some
    except Exception as error:  # noqa: BLE001 -- any failure of a route means the next backend
        text = " ".join(f"{type(error).__name__}: {error}".split())  # a compile error's source
        _VERDICTS[key] = text if len(text) <= 400 else text[:400] + " ..."
    return _VERDICTS[key], True


def _describe(x, precision, prior) -> str:
    batch, channels, pixels = x.shape
    return (f"{str(x.dtype).removeprefix('torch.')} maps of K = {pixels} pixels on {x.device} "
            f"({batch * channels} rows), {precision} products, "
            f"{'with a prior (marginal estimator or diversity)' if prior else 'uniform'}")


def choose_backend(name: str, x: torch.Tensor, templates: torch.Tensor, tau: float,
                   precision: str, prior: bool) -> str:
    """The backend that runs a loss call on the rows ``x (B, C, K)`` with these templates,
    ``tau``, resolved precision and prior: ``name`` if it is not ``"auto"``, else the first of
    the device's order that is available, takes the maps and passes the route's warm-up."""
    if name != "auto":
        return resolve_backend(name, x.device, x.dtype, x.shape[-1])
    failures = []
    for candidate in _AUTO_ORDER.get(x.device.type, _AUTO_FALLBACK):
        if not _takes(candidate, x.device, x.dtype, x.shape[-1]):
            continue
        module = backend_module(candidate)
        failure, fresh = _warm_up_failure(candidate, module, x, templates, tau, precision, prior)
        if failure is None:
            break
        if fresh:
            failures.append(f"{candidate!r} failed: {failure}")
    else:
        candidate = "torch"
    if failures:
        warnings.warn(
            f"ecloss_fast: backend='auto' runs {candidate!r} for {_describe(x, precision, prior)} "
            f"(forward and backward), because " + "; ".join(failures) + ". This route stays on "
            f"{candidate!r} for the rest of the process. Please report it with the output of "
            f"`python -m ecloss_fast`; pass backend={candidate!r} to silence this warning.",
            RuntimeWarning, stacklevel=3)
    return candidate


def auto_choice(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int],
                precision: str, prior: bool) -> str:
    """What ``auto`` ran (or, if no such call ran yet, would try first) for rows of ``shape
    (B, C, K)``: the first backend whose kept verdict for that route is not a failure."""
    for candidate in _AUTO_ORDER.get(device.type, _AUTO_FALLBACK):
        if not _takes(candidate, device, dtype, shape[-1]):
            continue
        module = backend_module(candidate)
        key = _route_key(candidate, module, device, dtype, shape, precision, prior)
        if _VERDICTS.get(key) is None:
            return candidate
    return "torch"
