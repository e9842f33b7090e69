"""The trainer's ``beta`` schedules for ``alpha * CE + beta * ECLoss``.

``schedule="auto"`` (the default) is :class:`ecloss_fast.GradientRatioBeta`: ``beta`` such
that ``beta * |dECL/dz| = grad_ratio * alpha * |dCE/dz|`` at the target layer, raised
smoothly from the paper's 1e-5, at most ``max_growth`` times per measurement, lowered at
once when twice too strong, capped at ``max_value``. ``"constant"`` keeps ``value`` and
``"warmup"`` ramps it linearly over ``warmup_steps`` (which also ramps the automatic one).
Every ``update_every`` steps the trainer measures both norms (``torch.autograd.grad``,
combined over data-parallel ranks, so that every rank uses the same ``beta``) and reports
the effective ratio ``beta * |dECL/dz| / (alpha * |dCE/dz|)`` for every schedule.

``z`` is the target convolution's weight (``measure_at="weights"``, the default) or its
output maps (``"maps"``). Why the weights (measured on VGG13 without BatchNorm, synthetic
faces): near a uniform template softmax (``tau = 1e-3``, maps at initialisation) the
ECLoss gradient at the maps is tiny, so the ``beta`` matching it there is ~1e8; and as
the maps grow, the CE gradient at the maps shrinks like ``1/scale`` (BatchNorm after
pool5) while the ECLoss one does not, and the ECLoss gradient of every weight below grows
with the activations. A ratio at the maps of 1e-5 then already meant a parameter gradient
a thousand times the CE one, and training diverged within 50 steps; measured at the
target weights, which see the input activations, ``beta`` follows and the same run trains.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ecloss_fast.beta import GradientRatioBeta
from train.config import BetaConfig

__all__ = ["BetaSchedule", "gradient_norms"]


class BetaSchedule:
    """``value(step)`` gives ``beta``; ``observe`` takes the two gradient norms."""

    def __init__(self, config: BetaConfig, alpha: float):
        self.config, self.alpha = config, alpha
        self.auto = None
        if config.schedule == "auto" and config.grad_ratio > 0:
            self.auto = GradientRatioBeta(
                config.grad_ratio, every=config.update_every, initial=config.value,
                ema=config.ema, max_growth=config.max_growth, max_value=config.max_value)
        self.ratio = math.nan  # the last measured effective ratio
        self.measurements = 0

    @property
    def log_beta(self) -> float:
        """``log`` of the schedule's ``beta`` before the warm-up ramp."""
        if self.auto is not None:
            return self.auto.log_beta
        return math.log(self.config.value) if self.config.value > 0 else -math.inf

    @log_beta.setter
    def log_beta(self, value: float) -> None:
        if self.auto is None:
            raise AttributeError(f"beta schedule {self.config.schedule!r} with grad_ratio "
                                 f"{self.config.grad_ratio} has a fixed beta")
        self.auto.log_beta = value

    def _ramp(self, step: int) -> float:
        warmup = self.config.warmup_steps
        return min(1.0, step / warmup) if warmup > 0 else 1.0

    def value(self, step: int) -> float:
        """``beta`` for the optimiser step ``step`` (counted from 0)."""
        if self.config.schedule == "constant":
            return self.config.value
        base = self.auto.value if self.auto is not None else self.config.value
        return base * self._ramp(step)

    def measures_at(self, step: int) -> bool:
        return step % self.config.update_every == 0

    def observe(self, step: int, ce_grad_norm: float, ecloss_grad_norm: float) -> None:
        """Record ``|dCE/dz|`` and ``|dECL/dz|`` measured at ``step`` (before its update)."""
        classification = self.alpha * ce_grad_norm
        ratio = GradientRatioBeta.achieved_ratio(self.value(step), classification,
                                                 ecloss_grad_norm)
        if ratio is None:
            return
        self.ratio = ratio
        if self.auto is not None:
            self.auto.observe(classification, ecloss_grad_norm)
        self.measurements += 1

    def state_dict(self) -> dict:
        return {"log_beta": self.log_beta, "ratio": self.ratio, "measurements": self.measurements}

    def load_state_dict(self, state: dict) -> None:
        if self.auto is not None:  # the trainer counts steps itself: beta is the whole state
            self.auto.log_beta = state["log_beta"]
        self.ratio, self.measurements = state["ratio"], state["measurements"]


def gradient_norms(ce: torch.Tensor, ecl: torch.Tensor, target: torch.Tensor, measure_at: str,
                   ctx, scale: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """``(|dCE/dz|, |dECL/dz|)`` at ``target`` (``z``: the target conv's weight for
    ``measure_at="weights"``, its output maps for ``"maps"``) over all ranks of ``ctx``.

    Both losses are scaled by ``scale`` as the backward pass scales them (fp16 would
    underflow otherwise); the ratio of the norms does not depend on the scale.
    ``autograd.grad`` leaves ``.grad`` and DDP alone. A host read.
    """
    grad_ce, = torch.autograd.grad(scale(ce), target, retain_graph=True)
    grad_ecl, = torch.autograd.grad(scale(ecl), target, retain_graph=True)
    if measure_at == "weights":
        # The gradient DDP will apply is the mean over ranks: average, then the norms.
        both = ctx.all_reduce_sum(torch.stack([grad_ce.float(), grad_ecl.float()]))
        norms = both.flatten(1).norm(dim=1) / ctx.world_size
    else:  # maps are per sample: the global norm sums the squares of every rank
        squares = torch.stack([grad_ce.float().square().sum(), grad_ecl.float().square().sum()])
        norms = ctx.all_reduce_sum(squares).sqrt()
    ce_norm, ecl_norm = norms.tolist()
    return ce_norm, ecl_norm
