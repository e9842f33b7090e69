"""``ECLoss``, the ``torch.nn.Module`` twin of ``ecloss_fast.ecloss``."""
from __future__ import annotations

import torch

from ecloss_fast.functional import ecloss

__all__ = ["ECLoss"]


class ECLoss(torch.nn.Module):
    """Explainable channel loss over activation templates; see ``ecloss_fast.ecloss``.

    Holds no parameters or buffers: the templates live in a per-device cache shared by
    every instance, so moving a model does not move (or copy) them. A templates tensor
    given here is used as it is on each call: templates are constants, and one that
    requires grad gets no gradient.
    """

    def __init__(self, tau: float = 1e-3, radius: float = 4.0, templates="full",
                 estimator: str = "uniform", reduction: str = "mean", backend: str = "auto",
                 precision: str | None = None, process_group=None):
        super().__init__()
        self.tau, self.radius, self.templates = tau, radius, templates
        self.estimator, self.reduction, self.backend = estimator, reduction, backend
        self.precision, self.process_group = precision, process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ecloss(x, tau=self.tau, radius=self.radius, templates=self.templates,
                      estimator=self.estimator, reduction=self.reduction, backend=self.backend,
                      precision=self.precision, process_group=self.process_group)

    def extra_repr(self) -> str:
        templates = "tensor" if isinstance(self.templates, torch.Tensor) else self.templates
        return (f"tau={self.tau}, radius={self.radius}, templates={templates!r}, "
                f"estimator={self.estimator!r}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
