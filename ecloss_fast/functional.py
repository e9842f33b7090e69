"""``ecloss``: the public entry point of docs/design.md section 5, with its input validation."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ecloss_fast import _ops
from ecloss_fast._dispatch import BACKENDS
from ecloss_fast._dtypes import accumulation_dtype
from ecloss_fast._precision import PRECISIONS
from ecloss_fast._templates import template_matrix
from ecloss_fast._validation import (check_choice, check_diversity, check_flag, check_input,
                                     check_positive, check_process_group, check_templates,
                                     selected_templates)
from ecloss_fast.backends import reference

__all__ = ["ecloss", "ESTIMATORS", "REDUCTIONS", "PRECISIONS"]

ESTIMATORS = ("uniform", "marginal")
REDUCTIONS = ("mean", "sum", "none")


class LossOptions(NamedTuple):
    """The options of ``ecloss`` and ``ECLoss`` (docs/design.md section 5.1)."""
    tau: float
    radius: float
    templates: object
    estimator: str
    reduction: str
    backend: str
    precision: str | None
    process_group: object
    diversity: float
    normalize: bool


def checked_options(options: LossOptions) -> LossOptions:
    """``options`` checked (docs/design.md section 5.4), numbers as floats; ``templates`` as
    far as it can be without the maps (``selected_templates`` checks it against them)."""
    check_choice("estimator", options.estimator, ESTIMATORS)
    check_choice("reduction", options.reduction, REDUCTIONS)
    check_choice("backend", options.backend, BACKENDS + ("auto",))
    check_choice("precision", options.precision, PRECISIONS + (None,))
    check_templates(options.templates)
    return options._replace(tau=check_positive("tau", options.tau),
                            radius=check_positive("radius", options.radius),
                            process_group=check_process_group(options.process_group),
                            diversity=check_diversity(options.diversity),
                            normalize=check_flag("normalize", options.normalize))


def ecloss(x: torch.Tensor, *, tau: float = 1e-3, radius: float = 4.0, templates="full",
           estimator: str = "uniform", reduction: str = "mean", backend: str = "auto",
           precision: str | None = None, process_group=None, diversity: float = 0.0,
           normalize: bool = False) -> torch.Tensor:
    """ECLoss, ``-MI(T; X)`` per channel of the post-ReLU maps ``x`` of shape ``(B, C, H, W)``.

    ``s[b,c,t] = tau * <x[b,c], T[t]>``, ``p = softmax_t(s)``, and per channel
    ``loss[c] = -(1/B) sum_b KL(p[b,c] || q[c])`` with ``q`` uniform (``estimator="uniform"``,
    the paper) or the batch marginal ``pbar[c] = mean_b p[b,c]`` (``"marginal"``; with
    ``process_group``, the mean over that group's global batch). ``templates`` is
    ``"full"`` (all ``num_templates(H, W)``), an int ``k`` (the paper's evenly spaced
    subset) or a tensor ``(N, H, W)``; templates are constants: a tensor that requires grad
    is used detached and gets no gradient. ``reduction`` is ``"mean"`` or ``"sum"`` over
    channels, or ``"none"`` for the ``(C,)`` vector. The result is float32 (float64 for
    float64 input); the gradient has ``x``'s dtype.

    Beyond the paper (off by default): ``diversity = lambda >= 0`` subtracts
    ``lambda * KL(pbar[c] || pbb)`` from each channel's loss, ``pbb = mean_c pbar[c]``, which
    rewards channels for matching different templates (with the uniform estimator it adds
    the marginal's column-sums sweep to the forward and one sweep to the backward);
    ``normalize=True`` scores each map divided by ``max(||x[b,c]||_2, eps)`` (``eps`` the
    smallest normal float of the accumulation type), so that ``tau`` is an inverse
    temperature (about 1-100) and amplitude is not rewarded; a dead map (norm below
    ``eps``) then has a uniform softmax and no gradient.

    With ``process_group`` (a ``torch.distributed`` group) the loss is that of the group's
    global batch, for equal and unequal per-process batches alike: each process returns
    its own maps' terms weighted by ``world_size / B_global`` (and the diversity term, a
    function of the global ``pbar``, whole), so that the mean over the processes of the
    losses, and of the gradients (as DDP averages them), equals the loss and gradient of
    one process holding the whole batch. See docs/design.md for every definition.
    """
    options = LossOptions(tau=tau, radius=radius, templates=templates, estimator=estimator,
                          reduction=reduction, backend=backend, precision=precision,
                          process_group=process_group, diversity=diversity, normalize=normalize)
    return loss_and_diagnostics(x, options, diagnostics=False)[0]


def normalized_maps(x: torch.Tensor) -> torch.Tensor:
    """``x[b,c] / max(||x[b,c]||_2, eps)`` in the accumulation dtype, returned in ``x``'s dtype.

    The gradient is autograd's of this formula, except on maps whose norm is below ``eps``
    (dead maps, ``x = 0`` after the ReLU): those are held constant. The formula's own
    derivative there, ``1 / eps`` (about 1e38 in float32), is an artefact of the floor that
    would turn any upstream gradient into an infinite one.
    """
    dtype = accumulation_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        maps = x.to(dtype)
        norm = torch.linalg.vector_norm(maps, dim=(-2, -1), keepdim=True)
        floor = torch.finfo(dtype).tiny
        scaled = maps / norm.clamp_min(floor)
        scaled = torch.where(norm >= floor, scaled, scaled.detach())
    return scaled.to(x.dtype)


def loss_and_diagnostics(x: torch.Tensor, options: LossOptions,
                         diagnostics: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``ecloss``'s value with ``options`` and, with ``diagnostics``, the
    ``_ops.DIAGNOSTICS`` vector, else None."""
    check_input(x)
    options = checked_options(options)
    tau, radius, diversity = options.tau, options.radius, options.diversity
    marginal = options.estimator == "marginal"
    dtype = accumulation_dtype(x.dtype)
    template_rows, subset = selected_templates(options.templates, x, dtype)

    if options.normalize:
        x = normalized_maps(x)
    if options.backend == "reference":
        if template_rows is None:
            template_rows = template_matrix(*x.shape[-2:], radius, subset or None, x.device,
                                            dtype)
        per_channel, summary = reference.channel_loss(x, template_rows, tau, marginal, diversity,
                                                      options.process_group, diagnostics)
    else:
        # The op resolves "auto" and precision=None itself, at run time (see ecloss_fast._ops).
        group = ("" if options.process_group is None
                 else _ops.register_process_group(options.process_group))
        outputs = _ops.channel_loss_outputs(_ops.LossInputs(
            x=x, templates=template_rows, radius=radius, subset=subset, tau=tau,
            marginal=marginal, diversity=diversity, diagnostics=diagnostics,
            precision=options.precision or "", backend=options.backend, group=group,
            with_grad=torch.is_grad_enabled() and x.requires_grad))
        per_channel, summary = outputs.loss, (outputs.summary if diagnostics else None)

    if options.reduction == "mean":
        loss = per_channel.mean()
    elif options.reduction == "sum":
        loss = per_channel.sum()
    else:
        loss = per_channel
    return loss, None if summary is None else summary.detach()
