"""``python -m bench.precompile``: compile every Triton kernel of the GPU check, one process per core.

    python -m bench.precompile [--jobs N] [--capability 9.0 --multiprocessors 132]
                               [--stages smoke paper ...]

The launches are ``bench.gpu_plan``'s, stage by stage (the paper shape first), for this
machine's GPU (its compute capability and multiprocessor count, read once here; the
workers never touch CUDA) or the one given. Each distinct compile (``gpu_plan.distinct``)
goes to a pool of ``--jobs`` processes, which compile it as Triton's runtime JIT would
(``bench.kernels.compile_like_runtime``) into Triton's on-disk cache, shared by every
process of the machine: a later launch of the same kernel loads it instead of compiling.
Prints one line per compile as it finishes (seconds, kernel, constants), then the count.
Exit status 1 if any compile failed (the failures are printed; the rest are still cached).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time

_PLAN: dict = {}


def _plan(capability, multiprocessors, stages):
    """The distinct launches of the stages, in the plan's order (each worker makes its own
    list)."""
    if "launches" not in _PLAN:
        from triton.backends.compiler import GPUTarget

        from bench import gpu_plan

        target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
        recorded = []
        for stage in gpu_plan.STAGES:
            if stage.name != "prepare" and stage.name in stages:
                recorded += gpu_plan.launches(stage, capability, multiprocessors)
        _PLAN["launches"] = list(gpu_plan.distinct(recorded, target).values())
        _PLAN["target"] = target
    return _PLAN["launches"], _PLAN["target"]


def _describe(launch) -> str:
    kernel, _, _, kwargs = launch
    keys = ("K", "OPERANDS", "BLOCK_M", "BLOCK_N", "BLOCK_K", "DX_COLUMNS", "HAS_PRIOR",
            "FUSED_PRIOR", "WITH_GRAD", "num_warps", "num_stages")
    return f"{kernel.__name__} " + " ".join(f"{key}={kwargs[key]}" for key in keys
                                            if key in kwargs)


def _compile(index, capability, multiprocessors, stages):
    """Compile launch ``index`` of the plan; (index, seconds, description, error or None)."""
    from bench.kernels import compile_like_runtime

    launches, target = _plan(capability, multiprocessors, stages)
    kernel, _, args, kwargs = launches[index]
    started = time.perf_counter()
    try:
        compile_like_runtime(kernel, args, kwargs, target)
        error = None
    except Exception as failure:  # noqa: BLE001 -- reported; the launch will raise it again
        error = f"{type(failure).__name__}: {failure}".splitlines()[0][:300]
    return index, time.perf_counter() - started, _describe(launches[index]), error


def _device_traits(capability, multiprocessors):
    if capability is not None and multiprocessors is not None:
        return capability, multiprocessors
    import torch

    properties = torch.cuda.get_device_properties(0)
    return (properties.major, properties.minor), properties.multi_processor_count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precompile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=os.cpu_count(),
                        help="compiling processes (default: one per core)")
    parser.add_argument("--capability", type=lambda text: tuple(map(int, text.split("."))),
                        help="compute capability, e.g. 9.0 (default: this machine's GPU)")
    parser.add_argument("--multiprocessors", type=int,
                        help="multiprocessor count (default: this machine's GPU)")
    parser.add_argument("--stages", nargs="+", metavar="STAGE",
                        help="the kernels of these stages of bench.gpu_plan only (default: all)")
    options = parser.parse_args(argv)
    from bench import gpu_plan

    names = [stage.name for stage in gpu_plan.STAGES]
    stages = tuple(options.stages or names)
    if set(stages) - set(names):
        parser.error(f"--stages: unknown {sorted(set(stages) - set(names))}; "
                     f"the plan's are {names}")
    if (options.capability is None) != (options.multiprocessors is None):
        parser.error("give both --capability and --multiprocessors, or neither")
    started = time.perf_counter()
    capability, multiprocessors = _device_traits(options.capability, options.multiprocessors)
    launches, _ = _plan(capability, multiprocessors, stages)
    print(f"{len(launches)} distinct Triton compiles for sm_{capability[0]}"
          f"{capability[1]}, {multiprocessors} multiprocessors, {options.jobs} processes "
          f"(planned in {time.perf_counter() - started:.1f} s)", flush=True)
    failures = 0
    # spawn: the workers need neither this process's CUDA context nor its threads.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(options.jobs, mp_context=context) as pool:
        futures = [pool.submit(_compile, index, capability, multiprocessors, stages)
                   for index in range(len(launches))]
        for future in concurrent.futures.as_completed(futures):
            index, seconds, description, error = future.result()
            failures += error is not None
            print(f"{index:4d} {seconds:6.1f} s {description}"
                  + (f" FAILED {error}" if error else ""), flush=True)
    print(f"{len(launches)} compiles, {failures} failed, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
