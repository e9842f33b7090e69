"""The weight ``beta`` of ECLoss in ``alpha * CE + beta * ECLoss``.

The paper sets ``beta = 1e-5`` "initially and then automatically changed by the program to
reduce the total loss", without saying how. At the target layer the ECLoss gradient
carries ``tau / (B * C)`` (SPEC section 2), so a fixed small ``beta`` leaves it many
orders of magnitude below the classification gradient and changes nothing. What is
implemented instead ties ``beta`` to the quantity that decides its effect, the ratio of
the two gradients at the target layer::

    ratio = beta * |dECL/dz| / (alpha * |dCE/dz|)

``z`` is the target convolution's weight (``measure_at="weights"``, the default) or its
output maps (``"maps"``). Every ``update_every`` steps the trainer measures both norms
(``torch.autograd.grad``, summed over data-parallel ranks) and reports ``ratio`` for every
schedule. With ``schedule="auto"`` it also solves for the ``beta`` that gives ``ratio =
grad_ratio`` and moves towards it:

- upwards smoothly: an exponential moving average of ``log beta`` (``beta`` spans orders of
  magnitude; a geometric average does not let one noisy batch dominate), and at most by a
  factor ``max_growth`` per measurement, starting from ``value`` (the paper's 1e-5);
- downwards at once, when the measured ratio is more than twice the target;
- never above ``max_value`` (1e5): at initialisation the softmax over templates is nearly
  uniform, the ECLoss gradient tiny, and the matching ``beta`` (1e8-1e9) overflowed the
  maps as soon as they sharpened.

Why the weights by default (measured on VGG13 without BatchNorm,
synthetic faces): near a uniform template softmax (``tau = 1e-3``, maps at
initialisation) the ECLoss gradient at the maps is tiny, so the ``beta`` matching it there
is ~1e8; and as the maps grow, the CE gradient at the maps shrinks like ``1/scale``
(BatchNorm after pool5) while the ECLoss one does not, and the ECLoss gradient of every
weight below grows with the activations. A ratio at the maps of 1e-5 then already meant a
parameter gradient a thousand times the CE one, and training diverged within 50 steps;
measured at the target weights, which see the input activations, ``beta`` follows and the
same run trains. A measurement costs one more ECLoss backward pass, two short backward
passes as far as the target layer and a host synchronisation, hence every
``update_every`` (10) steps by default rather than every step.
"""
from __future__ import annotations

import math

from train.config import BetaConfig

__all__ = ["BetaSchedule"]


class BetaSchedule:
    """``value(step)`` gives ``beta``; ``observe`` takes the two gradient norms."""

    def __init__(self, config: BetaConfig, alpha: float):
        self.config, self.alpha = config, alpha
        self.log_beta = math.log(config.value) if config.value > 0 else -math.inf
        self.ratio = math.nan  # the last measured effective ratio
        self.measurements = 0

    def _ramp(self, step: int) -> float:
        warmup = self.config.warmup_steps
        return min(1.0, step / warmup) if warmup > 0 else 1.0

    def value(self, step: int) -> float:
        """``beta`` for the optimiser step ``step`` (counted from 0)."""
        if self.config.schedule == "constant":
            return self.config.value
        if self.config.schedule == "warmup":
            return self.config.value * self._ramp(step)
        return math.exp(self.log_beta) * self._ramp(step)

    def measures_at(self, step: int) -> bool:
        return step % self.config.update_every == 0

    def observe(self, step: int, ce_grad_norm: float, ecloss_grad_norm: float) -> None:
        """Record ``|dCE/dz|`` and ``|dECL/dz|`` measured at ``step`` (before its update)."""
        usable = (math.isfinite(ce_grad_norm) and math.isfinite(ecloss_grad_norm)
                  and ce_grad_norm > 0 and ecloss_grad_norm > 0)
        if not usable:
            return
        self.ratio = self.value(step) * ecloss_grad_norm / (self.alpha * ce_grad_norm)
        if self.config.schedule == "auto" and self.config.grad_ratio > 0:
            target = math.log(self.config.grad_ratio * self.alpha * ce_grad_norm / ecloss_grad_norm)
            if target < self.log_beta - math.log(2):
                self.log_beta = target  # ECLoss more than twice too strong: at once
            else:
                ema = self.config.ema
                smoothed = ema * self.log_beta + (1 - ema) * target
                self.log_beta = min(smoothed, self.log_beta + math.log(self.config.max_growth))
            self.log_beta = min(self.log_beta, math.log(self.config.max_value))
        self.measurements += 1

    def state_dict(self) -> dict:
        return {"log_beta": self.log_beta, "ratio": self.ratio, "measurements": self.measurements}

    def load_state_dict(self, state: dict) -> None:
        self.log_beta, self.ratio = state["log_beta"], state["ratio"]
        self.measurements = state["measurements"]
