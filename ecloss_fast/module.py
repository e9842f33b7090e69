"""``ECLoss``, the ``torch.nn.Module`` twin of ``ecloss_fast.ecloss``."""
from __future__ import annotations

import torch

from ecloss_fast._ops import DIAGNOSTICS
from ecloss_fast.functional import LossOptions, checked_options, loss_and_diagnostics

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

    The arguments are checked here, as ``ecloss`` checks them (``ValueError`` or
    ``TypeError`` naming the argument), except what depends on the maps (a subset ``k``
    beyond ``num_templates(H, W)``, templates of another ``H x W``), which each call checks.
    """

    def __init__(self, tau: float = 1e-3, radius: float = 4.0, templates="full",
                 estimator: str = "uniform", reduction: str = "mean", backend: str = "auto",
                 precision: str | None = None, process_group=None, diversity: float = 0.0,
                 normalize: bool = False):
        super().__init__()
        options = checked_options(LossOptions(
            tau=tau, radius=radius, templates=templates, estimator=estimator,
            reduction=reduction, backend=backend, precision=precision,
            process_group=process_group, diversity=diversity, normalize=normalize))
        for name, value in options._asdict().items():  # self.tau, self.radius, ...
            setattr(self, name, value)
        self.last_diagnostics: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        options = LossOptions(*(getattr(self, name) for name in LossOptions._fields))
        loss, summary = loss_and_diagnostics(x, options, diagnostics=True)
        self.last_diagnostics = dict(zip(DIAGNOSTICS, summary.unbind()))
        return loss

    def extra_repr(self) -> str:
        templates = "tensor" if isinstance(self.templates, torch.Tensor) else self.templates
        return (f"tau={self.tau}, radius={self.radius}, templates={templates!r}, "
                f"estimator={self.estimator!r}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}, diversity={self.diversity}, "
                f"normalize={self.normalize}")
