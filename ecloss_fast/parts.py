"""Face-part masks from landmarks, for part explainability (the paper's Figure 7).

The paper re-annotates its face-parsing sets into seven parts from their landmarks but
does not give the polygons; these are ours, drawn in ``docs/parts.png``. Each part is the
convex hull of a group of landmarks (some of them extrapolated), painted in the order

    hair, cheek, jaw, forehead, nose, eyes, mouth

where a later part overwrites an earlier one, so the masks never overlap:

- cheek: the whole face, hull of the jaw contour and the eyebrows (what the later parts
  leave of it: the cheeks and the skin between nose and mouth);
- jaw: hull of the middle half of the jaw contour and the mouth corners (the chin);
- forehead: hull of the eyebrows and the eyebrows moved up by ``0.45 L``, where ``L`` is
  the distance from the chin to the eyebrows' centre and "up" points from chin to brows;
- hair: hull of the two ends of the jaw contour (the temples) and the eyebrows moved up
  by ``0.85 L`` and spread sideways by 20%, less everything painted after it;
- nose: hull of the nose landmarks and the innermost point of each eyebrow;
- eyes: per side, hull of the eyebrow and the eye;
- mouth: the outer lip contour, scaled by 1.2 about its centre.

Landmarks are pixel coordinates ``(x, y)``, 0-based, pixel centres on integers, in the
frame of the ``size x size`` mask (crop and resize first, see ``train.landmarks``).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["PARTS", "LANDMARK_GROUPS", "landmarks_to_part_masks", "part_polygons"]

PARTS = ("hair", "forehead", "cheek", "eyes", "nose", "mouth", "jaw")

# Landmark groups per scheme (0-based indices). iBUG 68 (300-W, Helen, AFW, LFPW): jaw
# 0-16, brows 17-21 / 22-26, nose 27-35, eyes 36-41 / 42-47, outer lip 48-59. LaPa's
# 106-point scheme (JD-landmark): contour 0-32, brows 33-37 + 64-67 / 38-42 + 68-71,
# nose 43-51 + 78-83, eyes 52-57 + 72-74 + 104 / 58-63 + 75-77 + 105, outer lip 84-95.
LANDMARK_GROUPS = {
    68: dict(
        contour=list(range(0, 17)),
        brow_left=list(range(17, 22)),
        brow_right=list(range(22, 27)),
        nose=list(range(27, 36)),
        eye_left=list(range(36, 42)),
        eye_right=list(range(42, 48)),
        outer_lip=list(range(48, 60)),
    ),
    106: dict(
        contour=list(range(0, 33)),
        brow_left=list(range(33, 38)) + list(range(64, 68)),
        brow_right=list(range(38, 43)) + list(range(68, 72)),
        nose=list(range(43, 52)) + list(range(78, 84)),
        eye_left=list(range(52, 58)) + [72, 73, 74, 104],
        eye_right=list(range(58, 64)) + [75, 76, 77, 105],
        outer_lip=list(range(84, 96)),
    ),
}

_PAINT_ORDER = ("hair", "cheek", "jaw", "forehead", "nose", "eyes", "mouth")
_FOREHEAD_HEIGHT = 0.45  # of the chin-to-brows distance
_HAIR_HEIGHT = 0.85
_HAIR_SPREAD = 1.2
_MOUTH_SCALE = 1.2


def part_polygons(landmarks: np.ndarray) -> dict[str, list[np.ndarray]]:
    """The point sets whose convex hulls make each part, for one face ``(68 or 106, 2)``."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] not in LANDMARK_GROUPS:
        raise ValueError(f"landmarks must be (68, 2) or (106, 2), got shape {points.shape}")
    group = {name: points[index] for name, index in LANDMARK_GROUPS[points.shape[0]].items()}
    contour = group["contour"]
    brows = np.concatenate([group["brow_left"], group["brow_right"]])
    chin = contour[len(contour) // 2]
    up = brows.mean(0) - chin
    length = np.linalg.norm(up)
    up = up / max(length, 1e-9)
    quarter = len(contour) // 4
    lip = group["outer_lip"]
    mouth_corners = lip[[np.argmin(lip[:, 0]), np.argmax(lip[:, 0])]]
    nose_top = group["nose"][0]
    inner_brows = [b[np.argmin(np.linalg.norm(b - nose_top, axis=1))]
                   for b in (group["brow_left"], group["brow_right"])]
    centre = brows.mean(0)
    hair_line = centre + (brows + _HAIR_HEIGHT * length * up - centre) * [_HAIR_SPREAD, 1.0]
    return {
        "hair": [np.concatenate([contour[[0, -1]], hair_line])],
        "cheek": [np.concatenate([contour, brows])],
        "jaw": [np.concatenate([contour[quarter:len(contour) - quarter], mouth_corners])],
        "forehead": [np.concatenate([brows, brows + _FOREHEAD_HEIGHT * length * up])],
        "nose": [np.concatenate([group["nose"], np.stack(inner_brows)])],
        "eyes": [np.concatenate([group["brow_left"], group["eye_left"]]),
                 np.concatenate([group["brow_right"], group["eye_right"]])],
        "mouth": [lip.mean(0) + _MOUTH_SCALE * (lip - lip.mean(0))],
    }


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise hull vertices (in x-right, y-down image axes: clockwise on screen)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return np.array(pts, dtype=np.float64)

    def half(sequence):
        chain = []
        for p in sequence:
            while len(chain) >= 2 and (
                (chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])
            ) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    return np.array(half(pts) + half(pts[::-1]), dtype=np.float64)


def _inside_hull(points: np.ndarray, size: int, device) -> torch.Tensor:
    """Booleans ``(size, size)``: pixel centres on or inside the convex hull of ``points``."""
    hull = torch.as_tensor(_convex_hull(points), dtype=torch.float64, device=device)
    if hull.shape[0] < 3:
        return torch.zeros(size, size, dtype=torch.bool, device=device)
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64, device=device),
                          torch.arange(size, dtype=torch.float64, device=device), indexing="ij")
    start, edge = hull, hull.roll(-1, 0) - hull  # (V, 2)
    cross = (edge[:, 0, None, None] * (y - start[:, 1, None, None])
             - edge[:, 1, None, None] * (x - start[:, 0, None, None]))
    return (cross >= -1e-9).all(0)


def landmarks_to_part_masks(landmarks, size: int) -> torch.Tensor:
    """Seven disjoint part masks from landmarks: booleans ``(..., 7, size, size)``.

    ``landmarks`` is ``(68, 2)`` (iBUG) or ``(106, 2)`` (LaPa), or a batch ``(B, n, 2)``,
    as ``(x, y)`` pixel coordinates of the ``size x size`` image (torch or NumPy). Parts
    are in :data:`PARTS` order; the polygons are described in this module's docstring.
    """
    device = landmarks.device if isinstance(landmarks, torch.Tensor) else None
    points = landmarks.detach().cpu().numpy() if isinstance(landmarks, torch.Tensor) else np.asarray(landmarks)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    single = points.ndim == 2
    if single:
        points = points[None]
    if points.ndim != 3:
        raise ValueError(f"landmarks must be (n, 2) or (B, n, 2), got shape {points.shape}")
    masks = torch.zeros(points.shape[0], len(PARTS), size, size, dtype=torch.bool, device=device)
    for b, face in enumerate(points):
        label = torch.full((size, size), -1, dtype=torch.long, device=device)
        polygons = part_polygons(face)
        for name in _PAINT_ORDER:
            for hull_points in polygons[name]:
                label[_inside_hull(hull_points, size, device)] = PARTS.index(name)
        for k in range(len(PARTS)):
            masks[b, k] = label == k
    return masks[0] if single else masks
