"""pytest-benchmark entries for the grid's cases, kept out of the normal test run
(``testpaths = tests``): ``pytest bench/ --benchmark-only``.

The grid is ``$BENCH_GRID`` (default ``gpu`` on CUDA, else ``cpu``); every route that runs
here is timed for each pass. Select with ``-k``, e.g. ``-k "N19307 and forward_backward"``.
"""
from __future__ import annotations

import os

import pytest
import torch

import ecloss_fast as ef
from bench.grids import GRIDS
from bench.routes import (AUTO, BASELINES, ESTIMATORS, case_backends, make_inputs, make_loss,
                          routes_for)
from bench.runner import cpu_memory_guard

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRID = GRIDS[os.environ.get("BENCH_GRID", "gpu" if DEVICE.type == "cuda" else "cpu")]
PASSES = ("forward", "backward", "forward_backward")


def _parameters():
    for case in GRID.cases:
        backends = case_backends(case, [*ef.available_backends(), *BASELINES, AUTO])
        for route in routes_for(backends, ESTIMATORS, DEVICE, getattr(torch, case.dtype),
                                case.height * case.width):
            for pass_name in PASSES:
                yield pytest.param(case, route, pass_name,
                                   id=f"{case.name}-{route.backend}-{route.estimator}-{pass_name}")


def _synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("case, route, pass_name", list(_parameters()))
def test_route(benchmark, case, route, pass_name):
    if DEVICE.type == "cpu" and (why := cpu_memory_guard(case, route)):
        pytest.skip(why)
    loss = make_loss(case, route, DEVICE)
    (x,) = make_inputs(case, DEVICE, 1)
    if pass_name == "forward":
        step = lambda: loss(x)  # noqa: E731
    elif pass_name == "backward":
        value = loss(x)
        step = lambda: torch.autograd.grad(value, x, retain_graph=True)  # noqa: E731
    else:
        step = lambda: torch.autograd.grad(loss(x), x)  # noqa: E731
    benchmark.extra_info.update(num_templates=case.num_templates, dtype=case.dtype,
                                precision=case.precision)
    benchmark.pedantic(_synchronized(step), warmup_rounds=1, rounds=GRID.plan.max_repeats)
