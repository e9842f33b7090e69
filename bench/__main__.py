"""``python -m bench``: time every ECLoss backend, the reference and the baselines.

    python -m bench                       # the gpu grid on CUDA, else the cpu grid
    python -m bench --grid tiny --out /tmp/b --backends reference torch sdpa

Writes ``results.json`` (rewritten after every measurement, so an interrupted run keeps
what it measured), ``results.md`` and ``results.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import os
import platform
import signal
import sys
import time
from pathlib import Path

import torch

import ecloss_fast as ef
from ecloss_fast._dispatch import BACKENDS
from bench.grids import GRIDS
from bench.cpu import cpu_model, describe_cpu
from bench.peak import higher_peaks, measure_peaks
from bench.report import enrich, markdown, write_json, write_plot
from bench.routes import (AUTO, BASELINES, CPU_PATH_ROUTES, ESTIMATORS, cpu_path_routes,
                          routes_for, skipped_routes)
from bench.runner import run_cases
from bench.timing import CLOCKS
from bench.train_step import run_train_steps


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time every ECLoss backend, the reference and the baselines.")
    parser.add_argument("--grid", choices=sorted(GRIDS),
                        help="problem sizes (default: gpu when CUDA is available, else cpu)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="where to run (default: cuda when available)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: bench/results/<grid>-<UTC date>)")
    parser.add_argument("--json", type=Path,
                        help="write results.json here instead of into --out (rewritten after "
                             "every measurement, as there)")
    parser.add_argument("--backends", nargs="+",
                        help="routes to time (default: every available backend, "
                             f"{', '.join(BASELINES)}, {AUTO} and the cpu backend's paths "
                             "below this CPU's best, cpu@avx2 and so on; the last three "
                             "run only in the cases that name them)")
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop starting new measurements after this long (recorded as skipped)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="CPU timer: wall time, or the process's CPU time (for --threads 1 "
                             "on a machine other processes load; see bench/timing.py)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-train-step", action="store_true",
                        help="skip the training-step benchmark")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1; got {args.threads}")
    if args.time_budget is not None and not args.time_budget > 0:
        parser.error(f"--time-budget must be a positive number of seconds; got {args.time_budget}")
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu times CPU runs only; CUDA runs are timed with CUDA events")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    known = {*BACKENDS, *BASELINES, AUTO, *CPU_PATH_ROUTES}
    unknown = sorted(set(args.backends or ()) - known)
    if unknown:
        parser.error(f"--backends: unknown {unknown}; choose from {sorted(known)}")

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.grid = args.grid or ("gpu" if args.device.type == "cuda" else "cpu")
    args.date = datetime.datetime.now(datetime.timezone.utc)
    args.out = args.out or Path("bench/results") / f"{args.grid}-{args.date:%Y-%m-%d}"
    problem = _unwritable(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    args.backends = args.backends or [*ef.available_backends(), *BASELINES, AUTO,
                                      *cpu_path_routes()]
    shapes = sorted({(case.dtype, case.height * case.width) for case in GRIDS[args.grid].cases})
    args.skipped = skipped_routes(args.backends, args.estimators, args.device, shapes)
    if not any(routes_for(args.backends, args.estimators, args.device, getattr(torch, dtype),
                          pixels)
               for dtype, pixels in shapes):
        parser.error(f"no route of --backends {' '.join(args.backends)} can run the {args.grid} "
                     f"grid on {args.device.type}: " + "; ".join(args.skipped))
    return args


def _unwritable(out: Path) -> str | None:
    """Why the folder ``out`` cannot be created or written, or None."""
    if out.exists() and not out.is_dir():
        return "exists and is not a folder"
    existing = next(path for path in (out, *out.absolute().parents) if path.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def _install_sigterm_handler():
    """``timeout`` sends SIGTERM: turn it into KeyboardInterrupt so the outputs get written."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def main(argv=None) -> int:
    args = _parse(argv)
    for line in args.skipped:
        print(f"bench: skipped {line}", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, grid_name, now, out = args.device, args.grid, args.date, args.out
    grid = GRIDS[grid_name]
    clock = args.clock  # ignored on CUDA, which is timed with CUDA events
    out.mkdir(parents=True, exist_ok=True)
    backends = args.backends
    started = time.monotonic()
    deadline = started + args.time_budget if args.time_budget else float("inf")
    _install_sigterm_handler()

    document = {"meta": {
        "grid": grid_name, "device": device.type, "device_name": _device_name(device),
        "torch": torch.__version__, "triton": _triton_version(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
        "clock": "cuda events" if device.type == "cuda" else clock,
        "date": now.isoformat(timespec="seconds"), "available_backends": ef.available_backends(),
        "cpu": describe_cpu(),
        "command": " ".join(sys.argv), "timing_plan": grid.plan.__dict__,
        "skipped_routes": args.skipped,
    }, "cases": [], "train_step": []}
    paths = {kind: out / f"results.{kind}" for kind in ("json", "md", "png")}
    if args.json:
        paths["json"] = args.json

    def save():
        write_json(enrich(document), paths["json"])

    def add(section):
        def on_record(record):
            document[section].append(record)
            save()
        return on_record

    try:
        document["meta"].update(measure_peaks(device, clock))
        save()
        split = len(grid.cases) if grid.train_step_after is None else grid.train_step_after
        measure_cases = functools.partial(
            run_cases, plan=grid.plan, device=device, backends=backends,
            estimators=args.estimators, clock=clock, memory=not args.no_memory,
            deadline=deadline, on_record=add("cases"))
        measure_cases(grid.cases[:split])
        if grid.train_step and not args.no_train_step:
            run_train_steps(grid.train_step, device, backends, deadline=deadline,
                            on_record=add("train_step"))
        measure_cases(grid.cases[split:])
        if device.type == "cpu":  # the floors from the higher of two measurements
            document["meta"].update(higher_peaks(document["meta"], measure_peaks(device, clock)))
    except KeyboardInterrupt:
        document["meta"]["interrupted"] = True
        print("bench: interrupted; writing what was measured", file=sys.stderr)
    finally:
        document["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
        save()
        paths["md"].write_text(markdown(document))
        if not write_plot(document, paths["png"]):
            paths.pop("png")
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 130 if document["meta"].get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
