"""Inputs for testing and benchmarking ECLoss: random maps, and maps with a peaked softmax.

Random post-ReLU maps give a nearly uniform softmax over templates (small ``tau``), which
hides indexing and rescaling errors; trained maps look like templates, so test with both.
"""
from __future__ import annotations

import torch

from ecloss_fast._templates import make_templates

__all__ = ["random_maps", "peaked_maps"]


def random_maps(b, c, h, w, *, dtype=torch.float32, seed=0, scale=1.0):
    """Post-ReLU-like maps: |N(0, 1)| * scale. Their softmax over templates is nearly uniform."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, h, w, generator=g, dtype=torch.float64).abs() * scale).to(dtype)


def peaked_maps(b, c, h, w, *, dtype=torch.float32, seed=0, scale=None, noise=0.05, radius=4.0):
    """Maps built from a random template (clamped at 0) times a large scale, plus noise.

    With the default ``tau = 1e-3`` a scale of ``20 / tau / h / w`` or so makes the softmax
    over templates peaked (a few templates hold most of the mass), as on trained maps.
    """
    g = torch.Generator().manual_seed(seed)
    templates = make_templates(h, w, radius=radius, dtype=torch.float64)
    n = templates.shape[0]
    if scale is None:
        scale = 4e4 / (h * w)
    pick = torch.randint(0, n - 1, (b, c), generator=g)  # never the all-negative template
    maps = templates[pick].clamp_min(0) * scale
    maps = maps * (1 + noise * torch.randn(maps.shape, generator=g, dtype=torch.float64))
    return maps.clamp_min(0).to(dtype)
