"""The benchmark grids: which problem sizes, dtypes and timing effort each one runs.

``paper``: the paper setting alone (B=64, C=512, 14x14, full set) at every precision, the
first benchmark of bench/gpu_check.sh. ``gpu``: the paper setting (B=64, C=512, 14x14 maps) with 400, 1,226 and 19,307 templates
and a sweep of ``N`` between them, 7x7 maps (1,226), a large batch (B=256) and float32 at
TF32 beside bfloat16. ``cpu``: the same shapes scaled down so that the reference runs in
seconds on two cores. ``tiny``: the CI smoke run.
"""
from __future__ import annotations

from dataclasses import dataclass

import ecloss_fast as ef
from bench.cost import Workload
from bench.timing import TimingPlan

__all__ = ["Case", "Grid", "GRIDS"]


@dataclass(frozen=True)
class Case:
    """One problem: maps ``(batch, channels, height, width)`` and a template set.

    ``templates`` is ``"full"`` or the size ``k`` of the evenly spaced subset
    (docs/design.md, section 1). ``sweep`` marks the cases on the time-versus-templates
    curve.
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


def _sweep(prefix, batch, channels, side, sizes, dtype, precision):
    return tuple(Case(f"{prefix}-N{k}", batch, channels, side, side,
                      "full" if k == ef.num_templates(side) else k, dtype, precision, sweep=True)
                 for k in sizes)


_FULL_14 = ef.num_templates(14)

_GPU_SWEEP = _sweep("paper", 64, 512, 14, (_FULL_14, 400, 1226, 4000, 100), "bfloat16", "bf16")
_GPU = Grid(
    cases=(_GPU_SWEEP[:3]
           + (Case("paper-fp32-tf32", 64, 512, 14, 14, "full", "float32", "tf32"),
              Case("maps7x7", 64, 512, 7, 7, "full", "bfloat16", "bf16"),
              Case("batch256", 256, 512, 14, 14, "full", "bfloat16", "bf16"))
           + _GPU_SWEEP[3:]),
    plan=TimingPlan(warmup=3, min_repeats=5, max_repeats=50, budget_s=0.15),
    train_step={"arch": "vgg16", "batch": 64, "input_size": 224, "steps": 10,
                "autocast": "bfloat16", "precision": "bf16"},
    train_step_after=4,
)

_PAPER = Grid(
    cases=(Case("paper-bf16", 64, 512, 14, 14, "full", "bfloat16", "bf16"),
           Case("paper-fp32-tf32", 64, 512, 14, 14, "full", "float32", "tf32"),
           Case("paper-fp32-ieee", 64, 512, 14, 14, "full", "float32", "ieee")),
    plan=TimingPlan(warmup=2, min_repeats=3, max_repeats=20, budget_s=0.1),
    train_step=None,
)

# Sized for two (shared) cores: the full set's forward+backward takes about a second.
_CPU_SWEEP = _sweep("small", 8, 64, 14, (_FULL_14, 400, 1226, 4000, 100), "float32", "ieee")
_CPU = Grid(
    cases=(_CPU_SWEEP
           + (Case("maps7x7", 8, 64, 7, 7, "full", "float32", "ieee"),
              Case("batch32", 32, 64, 14, 14, 4000, "float32", "ieee"))),
    plan=TimingPlan(warmup=1, min_repeats=3, max_repeats=15, budget_s=1.0),
    train_step=None,
)

_TINY = Grid(
    cases=_sweep("tiny", 2, 8, 7, (ef.num_templates(7), 100), "float32", "ieee"),
    plan=TimingPlan(warmup=1, min_repeats=1, max_repeats=1, budget_s=0.0),
    train_step={"arch": "vgg16", "width": 1 / 16, "batch": 2, "input_size": 112, "steps": 1,
                "warmup": 1,
                "classes": 10, "autocast": None, "precision": "ieee"},
)

GRIDS = {"paper": _PAPER, "gpu": _GPU, "cpu": _CPU, "tiny": _TINY}
