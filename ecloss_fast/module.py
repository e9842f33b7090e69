"""``ECLoss``, the ``torch.nn.Module`` twin of ``ecloss_fast.ecloss``."""
from __future__ import annotations

import torch

from ecloss_fast._ops import DIAGNOSTICS
from ecloss_fast.functional import loss_and_diagnostics

__all__ = ["ECLoss"]


class ECLoss(torch.nn.Module):
    """Explainable channel loss over activation templates; see ``ecloss_fast.ecloss``.

    Holds no parameters or buffers: the templates live in a per-device cache shared by
    every instance, so moving a model does not move (or copy) them. A templates tensor
    given here is used as it is on each call: templates are constants, and one that
    requires grad gets no gradient.

    ``last_diagnostics`` holds the diagnostics of the last call (docs/design.md section
    8.4), detached 0-d tensors on the maps' device, computed without a host
    synchronisation and without a sweep over the templates:

    * ``mi_over_log_n``: ``mean_c MI[c] / log N`` (``MI`` without the diversity term; 0 when
      no template is matched, 1 when every map matches one);
    * ``max_p``: ``mean_{b,c} max_t p[b,c,t]`` (``1/N`` for a uniform softmax);
    * ``score_std``: ``mean_{b,c} std_t s[b,c,t]``, the spread ``calibrate_tau`` sets (of
      the normalised maps with ``normalize=True``).

    Under ``process_group`` each process holds its own maps' share, weighted as its loss
    is: their mean over the processes is the value of the global batch.
    """

    def __init__(self, tau: float = 1e-3, radius: float = 4.0, templates="full",
                 estimator: str = "uniform", reduction: str = "mean", backend: str = "auto",
                 precision: str | None = None, process_group=None, diversity: float = 0.0,
                 normalize: bool = False):
        super().__init__()
        self.tau, self.radius, self.templates = tau, radius, templates
        self.estimator, self.reduction, self.backend = estimator, reduction, backend
        self.precision, self.process_group = precision, process_group
        self.diversity, self.normalize = diversity, normalize
        self.last_diagnostics: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        loss, summary = loss_and_diagnostics(
            x, tau=self.tau, radius=self.radius, templates=self.templates,
            estimator=self.estimator, reduction=self.reduction, backend=self.backend,
            precision=self.precision, process_group=self.process_group,
            diversity=self.diversity, normalize=self.normalize, diagnostics=True)
        self.last_diagnostics = dict(zip(DIAGNOSTICS, summary.unbind()))
        return loss

    def extra_repr(self) -> str:
        templates = "tensor" if isinstance(self.templates, torch.Tensor) else self.templates
        return (f"tau={self.tau}, radius={self.radius}, templates={templates!r}, "
                f"estimator={self.estimator!r}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}, diversity={self.diversity}, "
                f"normalize={self.normalize}")
