"""Non-finite steps: a step whose gradient or BatchNorm statistics are not finite changes
nothing, is counted, reported, and stops the run when too many come in a row.

The step's finite flag is read on the host before the optimizer step (one read per step;
on a CUDA device a synchronisation, as PyTorch's fp16 GradScaler makes anyway): a finite
step runs ``optimizer.step()`` as it would without the guard, bit for bit, and a
non-finite one does not run it at all. Undoing an applied step would need a copy of every
parameter and of the optimizer state before each step; deciding first needs none. The one
thing a step changes before the flag is known is BatchNorm's running statistics (in the
forward pass): :meth:`StepGuard.before_forward` copies them (2 channels' worth of floats
per BatchNorm layer, about 0.06% of a VGG16-BN's parameters) into a buffer kept for the
run, and a skipped step copies them back.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from train.checkpoint import NonFiniteError
from train.logs import record_error

__all__ = ["StepGuard", "NonFiniteError", "diverged"]


def diverged(problem: str, last_checkpoint: tuple[Path, int] | None) -> NonFiniteError:
    """The error that stops a diverged run: ``problem``, then the checkpoint to go back to
    (every checkpoint is checked to be finite before it is written)."""
    if last_checkpoint is None:
        where = "no checkpoint of this run was written before"
    else:
        path, step = last_checkpoint
        where = f"the last checkpoint, {path} (step {step}), holds finite values: resume from it"
    return NonFiniteError(f"{problem}; {where} with a lower optim.lr, optim.grad_clip set or "
                          "train.amp=bf16")


class StepGuard:
    """Gates the optimizer step of ``module``'s training on a finite flag, restores its
    BatchNorm running statistics after a skipped step, and counts the skips.

    ``skipped`` counts every skipped step of the run (restored on resume), ``streak`` the
    skipped steps in a row; ``limit`` in a row stop the run (:class:`NonFiniteError`).
    """

    def __init__(self, module: nn.Module, limit: int, log: logging.Logger):
        self.statistics = [buffer for layer in module.modules()
                           if isinstance(layer, nn.modules.batchnorm._BatchNorm)
                           for buffer in layer.buffers()]
        self._saved = [buffer.clone() for buffer in self.statistics]
        self.limit, self.log = limit, log
        self.skipped = self.streak = 0

    def before_forward(self) -> None:
        """Copy the running statistics that the forward pass is about to update."""
        if self.statistics:
            torch._foreach_copy_(self._saved, self.statistics)

    def finite(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """The step's flag, on the device: the gradient norm and the updated running
        statistics are finite (huge activations can overflow the variance alone)."""
        floating = [s for s in self.statistics if s.is_floating_point()]
        flags = [torch.isfinite(grad_norm)] + [torch.isfinite(s).all() for s in floating]
        return torch.stack(flags).all()

    def step(self, finite: torch.Tensor, apply: Callable[[], None]) -> bool:
        """``apply()`` (the optimizer step) when ``finite`` holds; else restore the running
        statistics. Returns whether the step was applied."""
        if bool(finite):  # the one host read of a step
            apply()
            self.streak = 0
            return True
        if self.statistics:
            torch._foreach_copy_(self.statistics, self._saved)
        self.skipped += 1
        self.streak += 1
        return False

    def optimizer_step(self, finite: torch.Tensor, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler) -> bool:
        """:meth:`step` with ``optimizer.step``, through ``scaler`` when it is enabled (fp16)."""
        if not scaler.is_enabled():
            return self.step(finite, optimizer.step)
        applied = self.step(finite, lambda: scaler.step(optimizer))
        scaler.update()  # its new scale follows the found-inf flags of unscale_
        return applied

    def report(self, step: int, values: list[float], scale: float | None,
               last_checkpoint: tuple[Path, int] | None) -> None:
        """Log a skipped ``step`` with its (loss, ce, ecloss) ``values``; stop the run when
        the streak reaches the limit."""
        loss, ce, ecl = values
        self.log.warning("step %d: non-finite gradient or BatchNorm statistics (loss %.4g, ce "
                         "%.4g, ecloss %.4g); update skipped, model unchanged%s", step, loss, ce,
                         ecl, f", fp16 loss scale now {scale:g}" if scale is not None else "")
        if self.streak >= self.limit:
            error = diverged(f"{self.streak} consecutive non-finite steps up to step {step}; "
                             "stopping", last_checkpoint)
            record_error(self.log, error)  # the command line prints it as its error line
            raise error
