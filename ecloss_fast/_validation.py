"""The argument checks of the public API (docs/design.md section 5.4), shared by ``ecloss``,
``ECLoss`` and ``calibrate_tau``: each raises ``ValueError`` or ``TypeError`` naming the
argument, the expected and the received value."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ecloss_fast._templates import num_templates

__all__ = ["check_choice", "check_input", "check_positive", "check_diversity", "check_flag",
           "check_process_group", "check_templates", "selected_templates"]


def check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_input(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W); got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W); got {x.dim()} dimensions "
                         f"{tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64; got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty; got shape (B, C, H, W) = {tuple(x.shape)}")


def check_positive(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument
    # is a SymFloat, which math.* cannot take; a NaN fails both comparisons.
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be positive and finite; got {value}")
    return value if isinstance(value, float) else float(value)


def check_diversity(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"diversity must be a float; got {type(value).__name__}")
    if not 0 <= value < math.inf:  # comparisons: see check_positive
        raise ValueError(f"diversity must be finite and at least 0; got {value}")
    return value if isinstance(value, float) else float(value)


def check_flag(name, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__}")
    return value


def check_process_group(group):
    if group is None:
        return None
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError("process_group must be a torch.distributed ProcessGroup (for example "
                        f"torch.distributed.group.WORLD) or None; got {type(group).__name__}")
    return group


def check_templates(templates) -> None:
    """What can be checked of ``templates`` without the maps: ``"full"``, an int ``k >= 1`` or
    a floating tensor ``(N, H, W)`` with ``N >= 1``."""
    if isinstance(templates, torch.Tensor):
        if templates.dim() != 3:
            raise ValueError(f"templates must have shape (N, H, W); got {tuple(templates.shape)}")
        if templates.shape[0] == 0:
            raise ValueError("templates must hold at least one template; got N = 0")
        if not templates.dtype.is_floating_point:
            raise TypeError(f"templates must be a floating tensor; got {templates.dtype}")
    elif isinstance(templates, str):
        check_choice("templates", templates, ("full",))
    elif isinstance(templates, int) and not isinstance(templates, bool):
        if templates < 1:
            raise ValueError(f"templates (the subset size k) must be at least 1; got {templates}")
    else:
        raise TypeError("templates must be 'full', an int k or a tensor (N, H, W); "
                        f"got {type(templates).__name__}")


def selected_templates(templates, x: torch.Tensor,
                       dtype: torch.dtype) -> tuple[torch.Tensor | None, int]:
    """``templates`` checked against the maps ``x``: ``(rows, 0)`` for a tensor, its rows
    ``(N, H*W)`` detached in ``dtype`` on ``x``'s device; ``(None, k)`` for a subset size
    ``k``; ``(None, 0)`` for ``"full"``, the built-in set."""
    check_templates(templates)
    height, width = x.shape[-2:]
    if isinstance(templates, torch.Tensor):
        if templates.shape[1:] != x.shape[2:]:
            raise ValueError(f"templates must have the maps' H x W = {tuple(x.shape[2:])}; "
                             f"got templates of shape {tuple(templates.shape)}")
        if templates.is_meta and not x.is_meta:
            raise ValueError("templates must hold values; got a tensor on the meta device "
                             f"(shape {tuple(templates.shape)} only), for x on {x.device}")
        rows = templates.detach().to(x.device, dtype).reshape(templates.shape[0], -1)
        return rows.contiguous(), 0
    if isinstance(templates, str):
        return None, 0
    total = num_templates(height, width)
    if templates > total:
        raise ValueError(f"templates (the subset size k) must be between 1 and "
                         f"num_templates({height}, {width}) = {total}; got {templates}")
    return None, templates
