"""The accumulation dtype of docs/design.md section 4.1, which every layer shares."""
from __future__ import annotations

import torch

__all__ = ["accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and reductions: float64 for float64 input, else float32 (docs/design.md 4.1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
