"""``ecloss``: the public entry point of docs/design.md section 5, with its input validation."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ecloss_fast import _ops
from ecloss_fast._dispatch import BACKENDS, PRECISIONS
from ecloss_fast._templates import num_templates, template_matrix
from ecloss_fast.backends import reference

__all__ = ["ecloss", "ESTIMATORS", "REDUCTIONS", "PRECISIONS"]

ESTIMATORS = ("uniform", "marginal")
REDUCTIONS = ("mean", "sum", "none")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_input(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W); got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W); got {x.dim()} dimensions "
                         f"{tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64; got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty; got shape (B, C, H, W) = {tuple(x.shape)}")


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument
    # is a SymFloat, which math.* cannot take; a NaN fails both comparisons.
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be positive and finite; got {value}")
    return value if isinstance(value, float) else float(value)


def _check_diversity(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"diversity must be a float; got {type(value).__name__}")
    if not 0 <= value < math.inf:  # comparisons: see _check_positive
        raise ValueError(f"diversity must be finite and at least 0; got {value}")
    return value if isinstance(value, float) else float(value)


def _check_normalize(value):
    if not isinstance(value, bool):
        raise TypeError(f"normalize must be True or False; got {type(value).__name__}")
    return value


def _check_process_group(group):
    if group is None:
        return None
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError("process_group must be a torch.distributed ProcessGroup (for example "
                        f"torch.distributed.group.WORLD) or None; got {type(group).__name__}")
    return group


def _template_tensor(templates, x, dtype):
    if templates.dim() != 3:
        raise ValueError(f"templates must have shape (N, H, W); got {tuple(templates.shape)}")
    if templates.shape[1:] != x.shape[2:]:
        raise ValueError(f"templates must have the maps' H x W = {tuple(x.shape[2:])}; "
                         f"got templates of shape {tuple(templates.shape)}")
    if templates.shape[0] == 0:
        raise ValueError("templates must hold at least one template; got N = 0")
    if not templates.dtype.is_floating_point:
        raise TypeError(f"templates must be a floating tensor; got {templates.dtype}")
    if templates.is_meta and not x.is_meta:
        raise ValueError("templates must hold values; got a tensor on the meta device (shape "
                         f"{tuple(templates.shape)} only), for x on {x.device}")
    return templates.detach().to(x.device, dtype).reshape(templates.shape[0], -1).contiguous()


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
    return loss_and_diagnostics(x, tau=tau, radius=radius, templates=templates,
                                estimator=estimator, reduction=reduction, backend=backend,
                                precision=precision, process_group=process_group,
                                diversity=diversity, normalize=normalize, diagnostics=False)[0]


def normalized_maps(x: torch.Tensor) -> torch.Tensor:
    """``x[b,c] / max(||x[b,c]||_2, eps)`` in the accumulation dtype, returned in ``x``'s dtype.

    The gradient is autograd's of this formula, except on maps whose norm is below ``eps``
    (dead maps, ``x = 0`` after the ReLU): those are held constant. The formula's own
    derivative there, ``1 / eps`` (about 1e38 in float32), is an artefact of the floor that
    would turn any upstream gradient into an infinite one.
    """
    dtype = _ops.accumulation_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        maps = x.to(dtype)
        norm = torch.linalg.vector_norm(maps, dim=(-2, -1), keepdim=True)
        floor = torch.finfo(dtype).tiny
        scaled = maps / norm.clamp_min(floor)
        scaled = torch.where(norm >= floor, scaled, scaled.detach())
    return scaled.to(x.dtype)


def loss_and_diagnostics(x, *, tau, radius, templates, estimator, reduction, backend, precision,
                         process_group, diversity, normalize, diagnostics):
    """``ecloss``'s value and, with ``diagnostics``, the ``_ops.DIAGNOSTICS`` vector, else None."""
    _check_input(x)
    tau = _check_positive("tau", tau)
    radius = _check_positive("radius", radius)
    _choice("estimator", estimator, ESTIMATORS)
    _choice("reduction", reduction, REDUCTIONS)
    _choice("backend", backend, BACKENDS + ("auto",))
    _choice("precision", precision, PRECISIONS + (None,))
    process_group = _check_process_group(process_group)
    diversity = _check_diversity(diversity)
    normalize = _check_normalize(normalize)
    marginal = estimator == "marginal"
    dtype = _ops.accumulation_dtype(x.dtype)
    height, width = x.shape[-2:]

    template_rows, subset = None, 0
    if isinstance(templates, torch.Tensor):
        template_rows = _template_tensor(templates, x, dtype)
    elif isinstance(templates, str):
        _choice("templates", templates, ("full",))
    elif isinstance(templates, int) and not isinstance(templates, bool):
        total = num_templates(height, width)
        if not 1 <= templates <= total:
            raise ValueError(f"templates (the subset size k) must be between 1 and "
                             f"num_templates({height}, {width}) = {total}; got {templates}")
        subset = templates
    else:
        raise TypeError("templates must be 'full', an int k or a tensor (N, H, W); "
                        f"got {type(templates).__name__}")

    if normalize:
        x = normalized_maps(x)
    if backend == "reference":
        if template_rows is None:
            template_rows = template_matrix(height, width, radius, subset or None, x.device, dtype)
        per_channel, summary = reference.channel_loss(x, template_rows, tau, marginal, diversity,
                                                      process_group, diagnostics)
    else:
        # The op resolves "auto" and precision=None itself, at run time (see ecloss_fast._ops).
        group = _ops.register_process_group(process_group) if process_group is not None else ""
        with_grad = torch.is_grad_enabled() and x.requires_grad
        outputs = torch.ops.ecloss_fast.channel_loss(
            x, template_rows, radius, subset, tau, marginal, diversity, diagnostics,
            precision or "", backend, group, with_grad)
        per_channel, summary = outputs[0], (outputs[6] if diagnostics else None)

    if reduction == "mean":
        loss = per_channel.mean()
    elif reduction == "sum":
        loss = per_channel.sum()
    else:
        loss = per_channel
    return loss, None if summary is None else summary.detach()
