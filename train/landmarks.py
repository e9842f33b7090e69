"""Part-annotated face sets of the paper's Table 2, read from their landmarks.

- iBUG ``.pts`` files (300-W, Helen, AFW, LFPW in their 68-point versions): each image
  ``NAME.jpg`` / ``.png`` sits next to ``NAME.pts``.
- LaPa (106 points): ``ROOT/images/NAME.jpg`` with ``ROOT/landmarks/NAME.txt``.

These are whole photographs. As the paper did (detector boxes, no alignment), each face is
cropped from its landmarks' bounding box widened by a margin, resized to the model's input
without alignment, and its landmarks are mapped along; the part masks then come from
:func:`ecloss_fast.metrics.landmarks_to_part_masks`. No face detector is needed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ecloss_fast.metrics import landmarks_to_part_masks
from train.data.image import BadDataError, normalize

__all__ = ["read_pts", "read_lapa_landmarks", "crop_face", "LandmarkFaces"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")


def read_pts(path) -> np.ndarray:
    """An iBUG ``.pts`` file as ``float64 (n, 2)`` ``(x, y)``, 0-based.

    The format: ``version: 1``, ``n_points: N``, ``{``, N lines ``x y``, ``}``. Its
    coordinates are 1-based (Matlab's convention, as menpo reads them), so 1 is subtracted.
    """
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    try:
        count = int(next(line for line in lines if line.startswith("n_points")).split(":")[1])
        start = lines.index("{") + 1
        points = np.array([[float(v) for v in line.split()[:2]] for line in lines[start:start + count]])
    except (StopIteration, ValueError, IndexError) as error:
        raise BadDataError(f"{path}: not an iBUG .pts file ({error})") from error
    if points.shape != (count, 2):
        raise BadDataError(f"{path}: expected {count} points, read {points.shape[0]}")
    return points - 1.0


def read_lapa_landmarks(path) -> np.ndarray:
    """A LaPa landmark file as ``float64 (106, 2)`` ``(x, y)``, 0-based pixel coordinates.

    The format: the number of points (106) on the first line, then one ``x y`` per line.
    """
    lines = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    try:
        count = int(lines[0][0])
        points = np.array([[float(v) for v in line[:2]] for line in lines[1:1 + count]])
    except (ValueError, IndexError) as error:
        raise BadDataError(f"{path}: not a LaPa landmark file ({error})") from error
    if points.shape != (count, 2):
        raise BadDataError(f"{path}: expected {count} points, read {points.shape[0]}")
    return points


def crop_face(image: np.ndarray, landmarks: np.ndarray, size: int, margin: float = 0.3):
    """Crop a face from its landmarks' box and resize it to ``size x size``, no alignment.

    The box is the landmarks' bounding box made square (its longer side) and widened by
    ``margin`` of that side on every edge, so hair and forehead above the brows are in; parts
    of the box outside the photo are black. Returns ``(uint8 (size, size, 3), landmarks
    (n, 2))`` with the landmarks in the crop's pixel coordinates (pixel centres on integers).
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    points = np.asarray(landmarks, dtype=np.float64)
    low, high = points.min(0), points.max(0)
    centre = (low + high) / 2
    side = (high - low).max() * (1 + 2 * margin)
    # a slightly upward box: landmarks stop at the brows, the head goes on above them
    centre = centre - [0, 0.1 * side]
    left, top = centre - side / 2
    # PIL's EXTENT box is in pixel-edge coordinates (pixel i spans [i, i + 1)); landmarks
    # have pixel centres on integers, hence the half-pixel shifts in the mapping.
    crop = Image.fromarray(image).transform(
        (size, size), Image.EXTENT, (left, top, left + side, top + side), Image.BILINEAR)
    mapped = (points + 0.5 - [left, top]) * (size / side) - 0.5
    return np.asarray(crop.convert("RGB")), mapped


class LandmarkFaces(torch.utils.data.Dataset):
    """Faces with part masks from an iBUG-style or LaPa-style folder.

    Items are dicts ``image`` ``float32 (3, S, S)`` (normalised as the trainer's),
    ``landmarks`` ``(n, 2)`` in the crop, ``part_masks`` ``bool (7, S, S)`` in ``PARTS``
    order, and ``path``. ``layout`` is ``"pts"``, ``"lapa"`` or ``"auto"`` (``lapa`` when
    ``ROOT/landmarks`` exists).
    """

    def __init__(self, root, size: int, layout: str = "auto", margin: float = 0.3):
        self.root, self.size, self.margin = Path(root), size, margin
        if layout == "auto":
            layout = "lapa" if (self.root / "landmarks").is_dir() else "pts"
        if layout == "pts":
            pairs = []
            for pts in sorted(self.root.rglob("*.pts")):
                image = next((pts.with_suffix(s) for s in _IMAGE_SUFFIXES if pts.with_suffix(s).exists()), None)
                if image is not None:
                    pairs.append((image, pts))
            self.reader = read_pts
        elif layout == "lapa":
            pairs = []
            for txt in sorted((self.root / "landmarks").glob("*.txt")):
                image = next((self.root / "images" / (txt.stem + s) for s in _IMAGE_SUFFIXES
                              if (self.root / "images" / (txt.stem + s)).exists()), None)
                if image is not None:
                    pairs.append((image, txt))
            self.reader = read_lapa_landmarks
        else:
            raise ValueError(f"layout must be 'auto', 'pts' or 'lapa', got {layout!r}")
        if not pairs:
            raise ValueError(f"no annotated images ({layout} layout) under {self.root}")
        self.layout, self.pairs = layout, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def raw_item(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The cropped ``uint8 (S, S, 3)`` face and its landmarks in the crop."""
        image_path, landmark_path = self.pairs[index]
        with Image.open(image_path) as photo:
            photo = np.asarray(photo.convert("RGB"))
        return crop_face(photo, self.reader(landmark_path), self.size, self.margin)

    def __getitem__(self, index: int) -> dict:
        image, landmarks = self.raw_item(index)
        return dict(
            image=normalize(image),
            landmarks=torch.from_numpy(landmarks).float(),
            part_masks=landmarks_to_part_masks(landmarks, self.size),
            path=str(self.pairs[index][0]),
        )
