"""The run's ECLoss term, ``beta * ECLoss(maps)``: the criterion as configured, the
calibration of ``ecloss.tau=auto``, and the subset-cosine diagnostic
(``train.subset_cosine_every``).

The library is called through the ``ecloss_fast`` module (``ecloss_fast.ECLoss``,
``ecloss_fast.calibrate_tau``, ``metrics.subset_gradient_cosine``) at each use.
"""
from __future__ import annotations

import logging

import torch

import ecloss_fast
from ecloss_fast import metrics
from train.config import ECLossConfig

__all__ = ["build_criterion", "calibrate_tau", "saved_tau", "subset_cosine"]


def build_criterion(config: ECLossConfig, calibrated_tau: float | None, ctx):
    """:class:`ecloss_fast.ECLoss` as configured, over the ranks of ``ctx`` where the loss
    needs the global batch; ``None`` when disabled, and while ``tau=auto`` waits for its
    first batch (``calibrated_tau`` ``None``, see :func:`calibrate_tau`)."""
    tau = calibrated_tau if config.tau == "auto" else config.tau
    if not config.enabled or tau is None:
        return None
    # The batch marginal pbar (marginal estimator, diversity) is over the global batch.
    group = ctx.group if config.estimator == "marginal" or config.diversity > 0 else None
    return ecloss_fast.ECLoss(tau=tau, radius=config.radius, templates=config.templates,
                              estimator=config.estimator, reduction="mean", backend=config.backend,
                              precision=config.precision, process_group=group,
                              diversity=config.diversity, normalize=config.normalize)


def calibrate_tau(config: ECLossConfig, maps: torch.Tensor, ctx, log: logging.Logger,
                  step: int) -> float:
    """``ecloss.tau=auto``: the tau calibrated on ``maps`` (the first batch, every rank's;
    ``step`` is its 1-based number, for the log)."""
    tau = ecloss_fast.calibrate_tau(maps, radius=config.radius, templates=config.templates,
                                    spread=config.score_spread, normalize=config.normalize,
                                    process_group=ctx.group)
    log.info("ecloss.tau=auto: tau = %.6g, calibrated on the maps of step %d: the mean std "
             "of their scores over the templates is %g", tau, step, config.score_spread)
    return tau


def saved_tau(config: ECLossConfig, state: dict | None, log: logging.Logger) -> float | None:
    """The tau that ``tau=auto`` calibrated in the run that the checkpoint ``state``
    continues; ``None`` for a configured tau, a new run, or one not calibrated yet."""
    if config.tau != "auto" or state is None:
        return None
    tau = state.get("calibrated_tau")  # absent from checkpoints of a configured tau
    if tau is not None:
        log.info("ecloss.tau=auto: tau = %.6g, calibrated at the start of the run "
                 "this one continues", tau)
    return tau


def subset_cosine(config: ECLossConfig, tau: float, subset: int, maps: torch.Tensor,
                  ctx) -> torch.Tensor:
    """The cosine between the full set's and the ``subset``-template subset's ECLoss
    gradients at the batch's ``maps`` (docs/design.md 7.3), with the run's ``tau`` and
    loss options, over the global batch of ``ctx``: a diagnostic on detached maps, so the
    step is the same with it or without. A device scalar."""
    return metrics.subset_gradient_cosine(
        maps, tau=tau, subset=subset, estimator=config.estimator, radius=config.radius,
        normalize=config.normalize, diversity=config.diversity, backend=config.backend,
        precision=config.precision, process_group=ctx.group)
