"""The benchmark grids: which problem sizes, dtypes and timing effort each one runs.

``paper``: the paper setting alone (B=64, C=512, 14x14, full set) at every precision, the
first benchmark of bench/gpu_check.sh; the compiled reference last (its compilation takes
tens of seconds, which must not crowd out the fused backends within the script's cap).
``gpu``: the paper setting (B=64, C=512, 14x14 maps) with 400, 1,226 and 19,307 templates
and a sweep of ``N`` between them, 7x7 maps (1,226), a large batch (B=256), float32 at
TF32 beside bfloat16, float16 maps with their own products (``precision="fp16"``: the API's
``precision=None``), and 28x28 maps (N = 307,721, K = 784) in bfloat16 and float16 through
``auto`` and the fused backends; the most telling first (bench/gpu_check.sh gives it a
fixed share of its budget, which the sweep's tail may not reach). ``cpu``: the same shapes
scaled down so that the reference runs in seconds on two cores, the full set at bf16
beside ieee for the ``cpu`` backend and at ieee on its AVX2 path too (``cpu@avx2``, where
the CPU's best path is AVX-512), and 28x28 maps at B=2, C=8. ``tiny``: the CI smoke run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ecloss_fast as ef
from bench.cost import Workload
from bench.timing import TimingPlan

__all__ = ["Case", "Grid", "GRIDS"]


@dataclass(frozen=True)
class Case:
    """One problem: maps ``(batch, channels, height, width)`` and a template set.

    ``templates`` is ``"full"`` or the size ``k`` of the evenly spaced subset
    (docs/design.md, section 1). ``precision`` is ``ecloss``'s, or ``"fp16"`` for float16
    maps with ``precision=None`` (float16 products; the API has no such name). ``sweep``
    marks the cases on the time-versus-templates curve. ``backends``: the only routes this
    case runs (of those requested); None: every requested route but those that run on
    request only (``bench.routes.ON_REQUEST``), plus the ones of these named in
    ``extra_routes``. ``plan``: the case's own timing effort
    instead of the grid's.
    """

    name: str
    batch: int
    channels: int
    height: int
    width: int
    templates: int | str
    dtype: str
    precision: str
    sweep: bool = False
    backends: tuple[str, ...] | None = None
    extra_routes: tuple[str, ...] = ()
    plan: TimingPlan | None = None

    @property
    def num_templates(self) -> int:
        return (ef.num_templates(self.height, self.width) if self.templates == "full"
                else int(self.templates))

    @property
    def workload(self) -> Workload:
        return Workload(self.batch, self.channels, self.height * self.width, self.num_templates)


@dataclass(frozen=True)
class Grid:
    """Cases in the order they run (the most telling first, so a cut-short run keeps them),
    the timing effort, and the training-step benchmark's configuration (None: not run),
    which runs after the first ``train_step_after`` cases (None: after all of them)."""

    cases: tuple[Case, ...]
    plan: TimingPlan
    train_step: dict | None
    train_step_after: int | None = None


def _sweep(prefix, batch, channels, side, sizes, dtype, precision, **fields):
    return tuple(Case(f"{prefix}-N{k}", batch, channels, side, side,
                      "full" if k == ef.num_templates(side) else k, dtype, precision, sweep=True,
                      **fields)
                 for k in sizes)


_FULL_14 = ef.num_templates(14)
_COMPILED = ("reference-compiled",)
# 28x28 maps, the moonshot: N = 307,721 templates of K = 784 pixels, 965 MB in float32.
# Its calls take seconds on a GPU's torch route: fewer repeats than the rest of the grid.
_MAPS_28_PLAN = TimingPlan(warmup=1, min_repeats=3, max_repeats=10, budget_s=0.5)

_GPU_SWEEP = _sweep("paper", 64, 512, 14, (_FULL_14, 400, 1226, 4000, 100), "bfloat16", "bf16")
_GPU = Grid(
    cases=((dataclasses.replace(_GPU_SWEEP[0], extra_routes=_COMPILED),
            Case("maps28x28", 64, 512, 28, 28, "full", "bfloat16", "bf16",
                 backends=("auto", "triton", "cuda", "torch"), plan=_MAPS_28_PLAN),
            Case("paper-fp16", 64, 512, 14, 14, "full", "float16", "fp16"),
            # The route that ran out of shared memory (issue 22): float16, K = 784, a prior.
            Case("maps28x28-fp16", 64, 512, 28, 28, "full", "float16", "fp16",
                 backends=("auto", "triton"), plan=_MAPS_28_PLAN),
            Case("batch256", 256, 512, 14, 14, "full", "bfloat16", "bf16"),
            Case("paper-fp32-tf32", 64, 512, 14, 14, "full", "float32", "tf32"))
           + _GPU_SWEEP[1:3]
           + (Case("maps7x7", 64, 512, 7, 7, "full", "bfloat16", "bf16"),)
           + _GPU_SWEEP[3:]),
    plan=TimingPlan(warmup=3, min_repeats=5, max_repeats=50, budget_s=0.15),
    train_step={"arch": "vgg16", "batch": 64, "input_size": 224, "steps": 10,
                "autocast": "bfloat16", "precision": "bf16"},
    train_step_after=5,
)

_PAPER_BF16 = Case("paper-bf16", 64, 512, 14, 14, "full", "bfloat16", "bf16")
_PAPER = Grid(
    cases=(_PAPER_BF16,
           Case("paper-fp32-tf32", 64, 512, 14, 14, "full", "float32", "tf32"),
           Case("paper-fp32-ieee", 64, 512, 14, 14, "full", "float32", "ieee"),
           # Same name: its rows join paper-bf16's table and speedups (bench/report.py).
           dataclasses.replace(_PAPER_BF16, backends=_COMPILED)),
    plan=TimingPlan(warmup=2, min_repeats=3, max_repeats=20, budget_s=0.1),
    train_step=None,
)

# Sized for two cores: the full set's forward+backward takes a fraction of a second. The
# whole grid: about 6 minutes predicted from the flops (bench/NOTES.md, how to run).
_CPU_SWEEP = _sweep("small", 8, 64, 14, (_FULL_14, 400, 1226, 4000, 100), "float32", "ieee",
                    extra_routes=_COMPILED)
# The full set's cases are the ones the floors are judged on (issue 24): more repeats, so
# that a few seconds of another process on a shared machine do not move their medians.
_FLOOR_PLAN = TimingPlan(warmup=2, min_repeats=15, max_repeats=60, budget_s=4.0)
_CPU = Grid(
    cases=((dataclasses.replace(_CPU_SWEEP[0], plan=_FLOOR_PLAN,
                                extra_routes=(*_CPU_SWEEP[0].extra_routes, "cpu@avx2")),)
           # The cpu backend's bfloat16 products beside its float32 ones (report.py's ratio).
           + (dataclasses.replace(_CPU_SWEEP[0], name="small-N19307-bf16", precision="bf16",
                                  sweep=False, backends=("cpu",), extra_routes=(),
                                  plan=_FLOOR_PLAN),)
           + _CPU_SWEEP[1:]
           + (Case("maps7x7", 8, 64, 7, 7, "full", "float32", "ieee", extra_routes=_COMPILED),
              Case("batch32", 32, 64, 14, 14, 4000, "float32", "ieee", extra_routes=_COMPILED),
              Case("maps28x28", 2, 8, 28, 28, "full", "float32", "ieee",
                   backends=("auto", "cpu", "torch", "reference", "reference-compiled")))),
    plan=TimingPlan(warmup=1, min_repeats=3, max_repeats=15, budget_s=1.0),
    train_step=None,
)

_TINY_SWEEP = _sweep("tiny", 2, 8, 7, (ef.num_templates(7), 100), "float32", "ieee")
_TINY = Grid(
    cases=(dataclasses.replace(_TINY_SWEEP[0], extra_routes=("auto", "reference-compiled")),
           *_TINY_SWEEP[1:]),
    plan=TimingPlan(warmup=1, min_repeats=1, max_repeats=1, budget_s=0.0),
    train_step={"arch": "vgg16", "width": 1 / 16, "batch": 2, "input_size": 112, "steps": 1,
                "warmup": 1,
                "classes": 10, "autocast": None, "precision": "ieee"},
)

GRIDS = {"paper": _PAPER, "gpu": _GPU, "cpu": _CPU, "tiny": _TINY}
