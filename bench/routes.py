"""What is measured: a *route* is one backend of ``ecloss_fast`` (or the SDPA baseline) with
one estimator; this module builds its loss callable and the inputs it runs on."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import ecloss_fast as ef
from ecloss_fast._dispatch import resolve_backend
from bench.grids import Case
from bench.sdpa_route import sdpa_ecloss
from ecloss_fast.testing import peaked_maps

__all__ = ["SDPA", "SDPA_FLASH", "BASELINES", "ESTIMATORS", "Route", "routes_for", "make_loss",
           "make_inputs", "runs_on", "why_not", "skipped_routes"]

SDPA = "sdpa"  # PyTorch's memory-efficient attention (on the CPU: its fused CPU kernel)
SDPA_FLASH = "sdpa-flash"  # PyTorch's FlashAttention-2 kernel: CUDA, float16/bfloat16 only
BASELINES = (SDPA, SDPA_FLASH)
ESTIMATORS = ("uniform", "marginal")


@dataclass(frozen=True)
class Route:
    """``backend``: an ``ecloss_fast`` backend name or one of ``BASELINES``."""

    backend: str
    estimator: str


def why_not(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot take ``x`` of this device and dtype here; ``None`` when it can."""
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
    try:
        resolve_backend(backend, device, dtype)
    except (ValueError, TypeError, ef.BackendUnavailableError) as error:
        return str(error)
    return None


def runs_on(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend`` is available here and takes ``x`` of this device and dtype."""
    return why_not(backend, device, dtype) is None


def _computes(backend: str, estimator: str) -> bool:
    return backend not in BASELINES or estimator == "uniform"


def routes_for(backends, estimators, device: torch.device, dtype: torch.dtype) -> list[Route]:
    """Every requested (backend, estimator) pair that can run; SDPA computes uniform only."""
    return [Route(backend, estimator) for backend in backends for estimator in estimators
            if runs_on(backend, device, dtype) and _computes(backend, estimator)]


def skipped_routes(backends, estimators, device: torch.device, dtype_names) -> list[str]:
    """One line per requested backend that will not run some of the cases, saying why:
    ``"triton (float32 on cpu): the triton backend needs a CUDA GPU ..."``."""
    lines = []
    for backend in backends:
        if not any(_computes(backend, estimator) for estimator in estimators):
            lines.append(f"{backend}: computes the uniform estimator only; --estimators "
                         f"asks for {' '.join(estimators)}")
            continue
        reasons: dict[str, list[str]] = {}
        for name in dtype_names:
            why = why_not(backend, device, getattr(torch, name))
            if why is not None:
                reasons.setdefault(why, []).append(name)
        lines += [f"{backend} ({', '.join(names)} on {device.type}): {why}"
                  for why, names in reasons.items()]
    return lines


def make_loss(case: Case, route: Route, device: torch.device):
    """``x -> scalar loss`` (mean over channels) for this case and route."""
    if route.backend in BASELINES:
        subset = None if case.templates == "full" else case.templates
        templates = ef.make_templates(case.height, case.width, subset=subset, device=device)
        kernel = "flash" if route.backend == SDPA_FLASH else "efficient"
        return lambda x: sdpa_ecloss(x, templates, kernel=kernel)
    return lambda x: ef.ecloss(x, templates=case.templates, estimator=route.estimator,
                               backend=route.backend, precision=case.precision)


def make_inputs(case: Case, device: torch.device, count: int) -> list[torch.Tensor]:
    """``count`` independent input sets: maps with a peaked softmax, as trained maps have
    (seeds 0, 1, ...), in the case's dtype, requiring grad."""
    dtype = getattr(torch, case.dtype)
    return [peaked_maps(case.batch, case.channels, case.height, case.width, seed=seed)
            .to(device=device, dtype=dtype).requires_grad_()
            for seed in range(count)]
