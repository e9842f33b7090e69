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
           "make_inputs", "runs_on"]

SDPA = "sdpa"  # PyTorch's memory-efficient attention (on the CPU: its fused CPU kernel)
SDPA_FLASH = "sdpa-flash"  # PyTorch's FlashAttention-2 kernel: CUDA, float16/bfloat16 only
BASELINES = (SDPA, SDPA_FLASH)
ESTIMATORS = ("uniform", "marginal")


@dataclass(frozen=True)
class Route:
    """``backend``: an ``ecloss_fast`` backend name or one of ``BASELINES``."""

    backend: str
    estimator: str


def runs_on(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend`` is available here and takes ``x`` of this device and dtype."""
    if backend == SDPA:
        return dtype != torch.float64 or device.type == "cpu"
    if backend == SDPA_FLASH:
        return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if backend not in ef.available_backends():
        return False
    try:
        resolve_backend(backend, device, dtype)
    except (ValueError, TypeError, ef.BackendUnavailableError):
        return False
    return True


def routes_for(backends, estimators, device: torch.device, dtype: torch.dtype) -> list[Route]:
    """Every requested (backend, estimator) pair that can run; SDPA computes uniform only."""
    return [Route(backend, estimator) for backend in backends for estimator in estimators
            if runs_on(backend, device, dtype)
            and (backend not in BASELINES or estimator == "uniform")]


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
