"""The plan of bench/gpu_check.sh: its stages, their caps, and the Triton kernels each launches.

    python -m bench.gpu_plan            # the plan: stages, caps, predictions, Triton compiles
    python -m bench.gpu_plan --caps     # "NAME CAP" lines, which gpu_check.sh reads

One call of the check has ``BUDGET_S`` seconds on a 16-core H100 machine with nothing
built. The stages run in ``STAGES``' order, each under ``timeout`` at most its cap; the caps
add up to the budget, so every stage gets its time whatever the others do. The grid takes
its cap plus whatever the earlier stages left unused (``GRID``).

Triton compiles (2-6 s of CPU each) would take most of the budget if each stage's single
process made them in turn, so ``prepare`` compiles every kernel of the plan first, one
process per core (``bench.precompile``), while the extension builds: later stages find
them in Triton's cache. ``launches(stage)`` lists a stage's Triton launches as the backend
makes them (``bench.kernels.recorded_launches``: the real launchers on ``meta`` tensors of
the stage's shapes, dtypes, precisions and estimators, for a GPU of the given compute
capability and multiprocessor count), and ``compile_key`` says which of them share a
compile. Stages that run the Triton backend only through other backends' tests (the
CUDA backend's memcheck) launch none.

Predicted stage times (``Stage.predicted``) are predictions: no stage has run on a GPU
yet. bench/NOTES.md ("The GPU check") says what each rests on.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 540
TAU = 1e-3
H100 = dict(capability=(9, 0), multiprocessors=132)
GRID = "grid"


@dataclasses.dataclass(frozen=True)
class Stage:
    """``cap`` seconds at most; ``predicted`` (low, high) seconds on the 16-core H100 box,
    a prediction; ``launcher`` the name of the function of this module that makes its Triton
    launches (None: it makes none)."""
    name: str
    cap: int
    predicted: tuple[int, int]
    what: str
    launcher: str | None = None


STAGES = (
    Stage("info", 15, (5, 10), "nvidia-smi, python -m ecloss_fast (versions, backends, the "
          "extension's torch)"),
    Stage("prepare", 150, (60, 100), "setup.py build_ext (MAX_JOBS = cores, one translation "
          "unit per CUDA precision) beside python -m bench.precompile (one process per core)",
          "all_launches"),
    Stage("smoke", 45, (15, 30), "python -m bench.gpu_smoke: paper shape first, then a "
          "ragged one; triton, cuda and auto against torch; every dtype and estimator",
          "smoke_launches"),
    Stage("paper", 75, (45, 75), "python -m bench --grid paper (the compiled reference last)",
          "paper_launches"),
    Stage("tests", 75, (30, 55), "pytest -m gpu -n cores --timeout 60",
          "test_launches"),
    Stage(GRID, 95, (95, 95), "python -m bench --grid gpu without the compiled reference "
          "(28x28 and float16 early), what the cap and the earlier stages' spare time allow",
          "grid_launches"),
    Stage("kernels", 35, (15, 30), "tests/test_triton_compile.py: every default's registers, "
          "spills and shared memory on this machine's triton (kernels.json)",
          "kernel_report_launches"),
    Stage("memcheck", 50, (25, 45), "compute-sanitizer memcheck of one cuda and one triton "
          "case (25 s each)", "memcheck_launches"),
)
assert sum(stage.cap for stage in STAGES) == BUDGET_S


# ---- what each stage launches (on meta tensors, inside bench.kernels.recorded_launches) ----

def _inputs(batch, channels, pixels, dtype):
    import torch

    from ecloss_fast._dtypes import accumulation_dtype
    from ecloss_fast._templates import count_for_pixels

    accumulation = accumulation_dtype(dtype)
    count = count_for_pixels(pixels)
    x = torch.empty(batch, channels, pixels, device="meta", dtype=dtype)
    templates = torch.empty(count, pixels, device="meta", dtype=accumulation)
    stats = torch.empty(batch, channels, device="meta", dtype=accumulation)
    prior = torch.empty(channels, count, device="meta", dtype=accumulation)
    return x, templates, stats, prior


def _explicit(shape, dtype, precision, prior):
    """``ecloss(backend="triton")`` with a gradient, forward and backward (the ops' calls)."""
    from ecloss_fast.backends import triton_fused

    x, templates, stats, prior_terms = _inputs(*shape, dtype)
    if prior:
        triton_fused.row_stats(x, templates, TAU, precision)
        triton_fused.column_sums(x, templates, TAU, stats, stats, precision)
        triton_fused.input_grad(x, templates, TAU, stats, stats, stats, prior_terms, stats,
                                precision)
    else:
        triton_fused.row_stats_with_grad(x, templates, TAU, precision)


def _auto(shape, dtype, precision, prior, tau=TAU):
    """``ecloss(backend="auto")``: its warm-up compiles what its calls launch."""
    from ecloss_fast.backends import triton_fused

    x, templates, _, _ = _inputs(*shape, dtype)
    triton_fused.warm_up(x, templates, tau, precision, prior)


def _contract(shape, dtype, precision, prior):
    """The contract functions as tests/test_triton.py's GPU tests call them."""
    from ecloss_fast.backends import triton_fused

    x, templates, stats, prior_terms = _inputs(*shape, dtype)
    triton_fused.row_stats(x, templates, TAU, precision)
    if prior:
        triton_fused.column_sums(x, templates, TAU, stats, stats, precision)
    triton_fused.input_grad(x, templates, TAU, stats, stats, stats,
                            prior_terms if prior else None, stats, precision)


def _both_forms(shape, dtype, precision):
    """gpu_smoke's training sweeps: row_stats_with_grad and input_grad with a prior, fused
    and split."""
    from ecloss_fast.backends import triton_fused

    x, templates, stats, prior_terms = _inputs(*shape, dtype)
    for fused in (True, False):
        with mock.patch.object(triton_fused, "_fused", lambda *args, f=fused: f):
            triton_fused.row_stats_with_grad(x, templates, TAU, precision)
            triton_fused.input_grad(x, templates, TAU, stats, stats, stats, prior_terms, stats,
                                    precision)


def _rows(batch, channels, height, width):
    return batch, channels, height * width


def smoke_launches():
    from bench import gpu_smoke

    for shape in gpu_smoke.SHAPES.values():
        for dtype, precision in gpu_smoke.CASES:
            for estimator in gpu_smoke.ESTIMATORS:
                prior = estimator == "marginal"
                _explicit(_rows(*shape), dtype, precision, prior)
                _auto(_rows(*shape), dtype, precision, prior)
            _both_forms(_rows(*shape), dtype, precision)


def _grid_launches(grid_name, backends):
    import torch

    from bench.grids import GRIDS
    from bench.routes import ESTIMATORS, case_backends

    for case in GRIDS[grid_name].cases:
        shape = (case.batch, case.channels, case.height * case.width)
        if shape[-1] > 1024:
            continue
        dtype = getattr(torch, case.dtype)
        for backend in case_backends(case, backends):
            for estimator in ESTIMATORS:
                if backend == "triton":
                    _explicit(shape, dtype, case.precision, estimator == "marginal")
                elif backend == "auto":
                    _auto(shape, dtype, case.precision, estimator == "marginal")


# The backends the check's paper and grid stages run (the compiled reference only in paper).
CHECK_BACKENDS = ("reference", "torch", "triton", "cuda", "sdpa", "sdpa-flash", "auto")


def paper_launches():
    _grid_launches("paper", CHECK_BACKENDS)


def grid_launches():
    _grid_launches("gpu", CHECK_BACKENDS)


def _gpu_test_cases():
    """tests/_gpu_cases.py, loaded by path (tests/ is no package)."""
    spec = importlib.util.spec_from_file_location("_gpu_cases", ROOT / "tests" / "_gpu_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launches():
    import torch

    from ecloss_fast._dispatch import resolve_precision

    cases = _gpu_test_cases()
    for height, width, batch, channels in cases.GPU_CASES:
        for dtype, precision in cases.GPU_PRECISIONS:
            for prior in cases.PRIORS:
                _contract((batch, channels, height * width), dtype, precision,
                          prior != "uniform")
    height, width, batch, channels = cases.GPU_ECLOSS_CASE
    for prior in (False, True):
        _explicit((batch, channels, height * width), torch.float32, "ieee", prior)
        for dtype in cases.GPU_AUTO_DTYPES:  # precision=None, PyTorch's default setting
            _auto((batch, channels, height * width), dtype, resolve_precision("", dtype), prior,
                  cases.GPU_AUTO_TAU)


def kernel_report_launches():
    """``python -m bench.kernels --defaults-only`` (the compile test): every default, for the
    H100 that module compiles for whatever the GPU (its own recording, returned)."""
    import torch

    from bench import kernels

    return [kernels.record_launch(name, k, getattr(torch, dtype_name), precision, config)
            for name, k, dtype_name, precision, _, config, _ in kernels.cases(defaults_only=True)]


def memcheck_launches():
    """``python -m bench.memcheck_case --backend triton``."""
    from bench import memcheck_case

    for dtype, precision, estimator in memcheck_case.CASES:
        _explicit(_rows(*memcheck_case.SHAPE), dtype, precision, estimator == "marginal")


def all_launches():
    extra = []
    for stage in STAGES:
        if stage.launcher not in (None, "all_launches"):
            extra += globals()[stage.launcher]() or []
    return extra


def launches(stage: Stage, capability=H100["capability"],
             multiprocessors=H100["multiprocessors"]) -> list:
    """The ``(kernel, grid, args, kwargs)`` launches of ``stage`` on a GPU of that compute
    capability and multiprocessor count, in the order the stage makes them."""
    from bench.kernels import recorded_launches

    if stage.launcher is None:
        return []
    with recorded_launches(capability, multiprocessors) as recorded:
        extra = globals()[stage.launcher]()  # launches recorded on their own terms
    return [*recorded, *(extra or [])]


def distinct(recorded, target) -> dict:
    """``compile_key -> launch``, first launch of each compile first."""
    from bench.kernels import compile_key

    found = {}
    for launch in recorded:
        kernel, _, args, kwargs = launch
        found.setdefault(compile_key(kernel, args, kwargs, target), launch)
    return found


def compile_counts(capability=H100["capability"], multiprocessors=H100["multiprocessors"]):
    """Per stage: (distinct Triton compiles it launches, of them not compiled by an earlier
    stage). ``prepare`` compiles them all."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    seen, counts = set(), {}
    for stage in STAGES:
        keys = set(distinct(launches(stage, capability, multiprocessors), target))
        counts[stage.name] = (len(keys), len(keys - seen) if stage.name != "prepare" else 0)
        if stage.name != "prepare":
            seen |= keys
    return counts


def describe(counts=None) -> str:
    """The dry run's plan: one line per stage, then ``total: N s``."""
    lines = [f"{'stage':9s} {'cap s':>6s} {'predicted s':>12s} {'compiles':>9s} "
             f"{'new':>5s}  what"]
    for stage in STAGES:
        compiled, new = (counts or {}).get(stage.name, (0, 0))
        cap = f"{stage.cap}+" if stage.name == GRID else str(stage.cap)
        low, high = stage.predicted
        lines.append(f"{stage.name:9s} {cap:>6s} {f'{low}-{high}':>12s} {compiled:9d} "
                     f"{new:5d}  {stage.what}")
    lines.append("compiles: distinct Triton compiles a stage launches, sm_90, 132 SMs (new: not "
                 "launched by an earlier stage; prepare compiles them all first). Predicted "
                 "times are predictions (bench/NOTES.md, The GPU check). The grid also gets "
                 "the time earlier stages leave.")
    lines.append(f"total: {sum(stage.cap for stage in STAGES)} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caps", action="store_true",
                        help="print NAME CAP per stage (for gpu_check.sh) and nothing else")
    options = parser.parse_args(argv)
    if options.caps:
        print("\n".join(f"{stage.name} {stage.cap}" for stage in STAGES))
        return 0
    print(describe(compile_counts()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
