"""Runs a grid: for every case and route, peak memory and the three timed passes."""
from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from bench.grids import Case
from bench.memory import peak_bytes
from bench.routes import (AUTO, REFERENCE_COMPILED, Route, case_backends, cpu_path,
                          make_inputs, make_loss, route_environment, routes_for)
from bench.timing import TimingPlan, measure
from ecloss_fast._dispatch import auto_choice, resolve_precision
from ecloss_fast.backends import cpp_cpu

__all__ = ["run_cases", "input_set_count", "cpu_memory_guard"]

# The reference's peak is about this many B x C x N float tensors (7 to 9 measured on the
# CPU: scores, log p, p, the KL terms and their gradients), plus the template matrix and a
# copy (the compiled route's own). Used only to skip CPU cases that would exhaust RAM,
# where the kernel's OOM killer, not an exception, ends the run.
_REFERENCE_SCORE_COPIES = 10
_REFERENCE_TEMPLATE_COPIES = 2
_REFERENCES = ("reference", REFERENCE_COMPILED)
# Input sets cycled by the timed repeats (input_set_count).
_MAX_INPUT_SETS = 4


def input_set_count(case: Case, route: Route, device: torch.device) -> int:
    """How many input sets to rotate: enough that together they are twice the last-level
    cache (so no repeat finds its input cached), between 2 and ``_MAX_INPUT_SETS``; one for
    the reference, whose materialised scores dwarf any cache and whose retained graphs are
    gigabytes each."""
    if route.backend in _REFERENCES:
        return 1
    if device.type == "cuda":
        cache = torch.cuda.get_device_properties(device).L2_cache_size
    else:
        cache = 32 << 20  # a generous last-level cache of one CPU socket
    element = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    sets = math.ceil(2 * cache / case.workload.input_bytes(element))
    return max(2, min(_MAX_INPUT_SETS, sets))


def _available_ram_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def cpu_memory_guard(case: Case, route: Route) -> str | None:
    """Why the route must not run this case on this machine's RAM, or None when it may."""
    if route.backend not in _REFERENCES:
        return None
    element = 8 if case.dtype == "float64" else 4
    need = (_REFERENCE_SCORE_COPIES * case.workload.score_tensor_bytes(element)
            + _REFERENCE_TEMPLATE_COPIES * case.workload.template_bytes(element))
    have = _available_ram_bytes()
    if need > have // 2:
        return f"skipped: needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
    return None


def _is_oom(error: BaseException) -> bool:
    message = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError)
        and ("out of memory" in message or "can't allocate memory" in message))


def _time_passes(loss, inputs, device: torch.device, plan: TimingPlan, clock: str) -> dict:
    count = len(inputs)
    results = {"forward": measure(lambda i: loss(inputs[i]), count, device, plan, clock)}
    losses = [loss(x) for x in inputs]
    results["backward"] = measure(
        lambda i: torch.autograd.grad(losses[i], inputs[i],  # noqa: F821 -- run before the del
                                      retain_graph=True), count, device, plan, clock)
    del losses
    results["forward_backward"] = measure(
        lambda i: torch.autograd.grad(loss(inputs[i]), inputs[i]), count, device, plan, clock)
    return {name: timing.as_dict() for name, timing in results.items()}


def _measure_route(case: Case, route: Route, inputs, device: torch.device, plan: TimingPlan,
                   clock: str, memory: bool) -> dict:
    record = {"status": "ok", "input_sets": len(inputs)}
    if device.type == "cpu" and (why := cpu_memory_guard(case, route)):
        return {"status": why}
    loss = make_loss(case, route, device)
    try:
        started = time.perf_counter()
        torch.autograd.grad(loss(inputs[0]), inputs[0])  # compile, autotune, build caches
        record["first_call_s"] = time.perf_counter() - started
        if memory:
            x = inputs[0]
            record["peak_bytes"] = peak_bytes(
                lambda: torch.autograd.grad(loss(x), x), device)  # noqa: F821 -- run before the del
        record["timings"] = _time_passes(loss, inputs, device, plan, clock)
    except Exception as error:  # noqa: BLE001 -- every failure is recorded, the grid goes on
        record["status"] = "oom" if _is_oom(error) else f"error: {type(error).__name__}: {error}"
        return record
    finally:
        del loss
        if device.type == "cuda":
            gc.collect()  # an exception's traceback can hold the failed call's tensors
            torch.cuda.empty_cache()
    return record


def run_cases(cases, plan: TimingPlan, device: torch.device, backends, estimators, *,
              clock: str, memory: bool, deadline: float, on_record) -> None:
    """Measure every case with every route; ``on_record(dict)`` gets each result as soon as
    it exists (so an interrupted run keeps what it measured). Work left when
    ``time.monotonic()`` passes ``deadline`` is recorded as skipped. ``clock``: see
    ``bench.timing.measure``."""
    work = []
    for case in cases:
        for route in routes_for(case_backends(case, backends), estimators, device,
                                getattr(torch, case.dtype), case.height * case.width):
            work.append((case, route))
    inputs_case, inputs = None, []  # one case's inputs on the device at a time
    for case, route in tqdm(work, desc="bench", unit="route", file=sys.stderr, disable=not work):
        base = {"case": asdict(case), "num_templates": case.num_templates,
                "backend": route.backend, "estimator": route.estimator}
        if time.monotonic() > deadline:
            on_record({**base, "status": "skipped: time budget"})
            continue
        if case != inputs_case:
            inputs = []  # free the previous case's inputs before making these
            inputs_case, inputs = case, make_inputs(case, device, _MAX_INPUT_SETS)
        count = input_set_count(case, route, device)
        with route_environment(route.backend):
            record = _measure_route(case, route, inputs[:count], device, case.plan or plan,
                                    clock, memory)
            if route.backend == "cpu" or cpu_path(route.backend):  # its floor (bench/report.py)
                base["cpu_path"] = cpp_cpu.isa_in_use()
        if route.backend == AUTO:  # what auto ran, its warm-up's verdict included
            dtype = getattr(torch, case.dtype)
            base["resolved_backend"] = auto_choice(
                device, dtype, (case.batch, case.channels, case.height * case.width),
                resolve_precision(case.precision, dtype), route.estimator == "marginal")
        on_record({**base, **record})
