"""Classification heads on the face embedding: plain softmax, CosFace and ArcFace.

Each head maps ``(embedding (B, E), labels (B,))`` to logits ``(B, num_classes)`` for a
cross-entropy loss. The margins follow InsightFace's ``CombinedMarginLoss``
(arcface_torch/losses.py), written without in-place ops under ``no_grad`` so that the
margin's derivative reaches the backward pass.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SoftmaxHead", "CosFaceHead", "ArcFaceHead", "build_head", "DEFAULT_MARGINS",
           "cosine", "margin_logits", "TARGET_LOGITS"]

DEFAULT_MARGINS = {"cosface": 0.4, "arcface": 0.5}


def check_head_size(embedding_dim: int, num_classes: int) -> None:
    for name, value in (("embedding_dim", embedding_dim), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class SoftmaxHead(nn.Module):
    """The paper's head: a linear layer ``W e + b``; ``labels`` are not used."""

    def __init__(self, embedding_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(embedding_dim, num_classes)

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(embedding)


class _CosineHead(nn.Module):
    """Shared part of the margin heads: ``cos[b, j]`` between ``e_b`` and the class weight ``w_j``."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float, m: float):
        super().__init__()
        if not s > 0:
            raise ValueError(f"s must be positive, got {s}")
        self.s, self.m = float(s), float(m)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, 0, 0.01)

    kind: str  # a key of TARGET_LOGITS

    def cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        return cosine(embedding, self.weight)

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels is None:
            raise ValueError("labels are required by margin heads")
        cos = self.cosine(embedding)
        target = F.one_hot(labels, cos.shape[1]).bool()
        return margin_logits(self.kind, cos, target, self.s, self.m)


class CosFaceHead(_CosineHead):
    """``s * (cos(theta_y) - m)`` for the true class, ``s * cos(theta_j)`` for the others."""

    kind = "cosface"


class ArcFaceHead(_CosineHead):
    """``s * cos(theta_y + m)`` for the true class while ``theta_y + m <= pi``.

    Beyond that, where ``cos(theta + m)`` would stop decreasing in ``theta``, InsightFace's
    fallback ``cos(theta) - m sin(m)`` keeps the logit monotonic.
    """

    kind = "arcface"


def cosine(embedding: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cos[b, j]`` between ``embedding[b]`` and ``weight[j]``."""
    # At least float32, even under autocast: the margins act on cosines near 1.
    dtype = torch.promote_types(embedding.dtype, torch.float32)
    with torch.autocast(embedding.device.type, enabled=False):
        return F.linear(F.normalize(embedding.to(dtype)), F.normalize(weight.to(dtype)))


def cosface_target(cos: torch.Tensor, m: float) -> torch.Tensor:
    return cos - m


def arcface_target(cos: torch.Tensor, m: float) -> torch.Tensor:
    # sin(theta) >= 0 for theta in [0, pi]; the clamp keeps d/dcos finite at |cos| = 1.
    sin = torch.sqrt((1.0 - cos * cos).clamp_min(1e-12))
    cos_theta_m = cos * math.cos(m) - sin * math.sin(m)
    threshold = math.cos(math.pi - m)
    return torch.where(cos > threshold, cos_theta_m, cos - math.sin(math.pi - m) * m)


TARGET_LOGITS = {"cosface": cosface_target, "arcface": arcface_target}


def margin_logits(kind: str, cos: torch.Tensor, target: torch.Tensor, s: float,
                  m: float) -> torch.Tensor:
    """``s * cos`` with the margin of ``kind`` where ``target`` (bool, as ``cos``) is set."""
    return s * torch.where(target, TARGET_LOGITS[kind](cos, m), cos)


def build_head(kind: str, embedding_dim: int, num_classes: int, s: float = 64.0,
               m: float | None = None) -> nn.Module:
    """``"softmax"`` (``s``, ``m`` unused), ``"cosface"`` (m=0.4) or ``"arcface"`` (m=0.5)."""
    check_head_size(embedding_dim, num_classes)
    if kind == "softmax":
        return SoftmaxHead(embedding_dim, num_classes)
    if kind not in DEFAULT_MARGINS:
        raise ValueError(f"kind must be 'softmax', 'cosface' or 'arcface', got {kind!r}")
    margin = DEFAULT_MARGINS[kind] if m is None else m
    cls = CosFaceHead if kind == "cosface" else ArcFaceHead
    return cls(embedding_dim, num_classes, s, margin)
