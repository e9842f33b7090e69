"""Procedurally drawn faces with identities, 68 landmarks and exact part masks.

No download: every image is drawn on the fly from ``(seed, identity, image index)``, so the
set is deterministic (about 13 ms per 112 x 112 image on a core of a busy AMD EPYC).

Where identity lives is a choice, ``identity=``:

- ``"parts"`` (the default; the study's and the demo's): an identity fixes the inner parts
  only, the shapes, places and colours of brows, eyes, nose and mouth: eye distance,
  height, size and tilt, iris size and colour; brow gap, thickness, arch, length and
  colour; nose length, width and shade; mouth width, lip thicknesses and colour. Iris,
  brow and lip colours come from palettes of their own, independent of hair and skin, and
  the parts are 1.3 times the outer world's sizes, so that a 14 x 14 map of a 112-pixel
  face can see them. Face outline (width, length, chin), hair style and colour, skin tone
  and the ears are drawn anew for every image (a random stream of its own), so nothing
  outside the inner parts tells who it is.
- ``"outer"``: the faces of before the option existed, pixel for pixel: an identity fixes
  everything above, outline, hair and skin included (brows a darker hair, lips a redder
  skin), and a network can identify it without looking at the inner parts.

Each image adds what a detector crop without alignment leaves: in-plane rotation, yaw
(features shift towards the turned side), scale, translation, expression (eye and mouth
opening), lighting direction and strength, blur and sensor noise, and a random background.

With ``jitter=True`` each image also gets the pose spread of a face that a detector crops
without aligning it, as the paper trains and tests: a similarity about the image centre,
roll uniform up to 30 degrees either way, scale log-uniform from 0.8 to 1.25 and a shift
uniform up to 10% of the side on each axis (from a random stream of its own, so everything
else about the image is the same as without jitter), then a shift back inside the crop if
the face's landmarks left it.

``erase=`` names parts that are not drawn, with every random number still drawn, so the
image is otherwise the same: erased brows, eyes, nose or mouth show the skin beneath (the
gate's "inner parts erased", ``train.gate``), erased hair the forehead or background, an
erased forehead, cheek or jaw what lies behind the face. An erased part's mask is empty.

Geometry is defined in a face frame (origin at the face centre, y down, unit about half a
face width) and projected to pixels; the image, the landmarks and the masks all come from
the same projected polygons, so they move together under any pose. Landmarks follow the
iBUG 68-point layout (0-16 jaw from the image-left ear to the image-right ear, 17-26 brows,
27-35 nose, 36-47 eyes, 48-67 lips).
Part masks are the regions actually painted, disjoint, in the order of ``PARTS`` (eight;
the landmark masks of ``ecloss_fast.parts`` have seven, the brows in the eyes):

- hair: the hair behind the head and the fringe over the forehead;
- forehead: skin above the top of the brows;
- cheek: skin from the top of the brows down to the mouth's centre line;
- brows: the two eyebrows (two thin blobs);
- eyes: the eye whites with iris and pupil (two blobs);
- nose: the nose polygon, bridge to nostrils (one blob);
- mouth: both lips (one elongated blob);
- jaw: skin below the mouth's centre line down to the chin.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from train.data.image import normalize

__all__ = ["PARTS", "INNER_PARTS", "IDENTITY", "PART_COLOURS", "SyntheticFaces", "contact_sheet"]

PARTS = ("hair", "forehead", "cheek", "brows", "eyes", "nose", "mouth", "jaw")
INNER_PARTS = ("brows", "eyes", "nose", "mouth")  # the parts that carry identity in "parts"
IDENTITY = ("parts", "outer")  # where identity lives: SyntheticFaces(identity=...)
_LABEL = {name: index + 1 for index, name in enumerate(PARTS)}  # 0 is "no part"
_SUPERSAMPLE = 2  # the picture is drawn at twice the size and box-filtered down
PART_COLOURS = np.array([[200, 60, 40], [90, 200, 90], [60, 110, 230], [150, 100, 50],
                         [250, 220, 50], [220, 80, 220], [240, 150, 40], [60, 210, 220]], np.uint8)

_SKIN_LIGHT = np.array([250, 222, 196], float)
_SKIN_DARK = np.array([96, 62, 42], float)
_HAIR_COLOURS = np.array([[25, 20, 18], [60, 40, 28], [110, 75, 45], [190, 150, 90],
                          [150, 70, 35], [150, 150, 150], [220, 210, 190]], float)
_IRIS_COLOURS = np.array([[60, 40, 25], [90, 60, 30], [70, 110, 150], [80, 120, 80]], float)
# The parts world's palettes: far apart from each other within a part, and drawn
# independently of hair and skin, so that a part's colour tells who it is and nothing else.
_IRIS_PALETTE = np.array([[40, 90, 210], [30, 150, 60], [110, 60, 20], [210, 150, 20],
                          [150, 160, 170], [140, 50, 190], [15, 15, 15], [20, 160, 160]], float)
_BROW_PALETTE = np.array([[20, 15, 10], [85, 45, 20], [165, 65, 20], [215, 185, 105],
                          [235, 235, 225], [175, 30, 40], [40, 50, 125], [110, 110, 110]], float)
_LIP_PALETTE = np.array([[240, 155, 170], [200, 30, 45], [105, 20, 35], [240, 115, 70],
                         [130, 40, 125], [130, 75, 50], [225, 135, 30], [55, 135, 175]], float)

# jitter=True: the detector-crop pose spread (see the module docstring).
_JITTER_ROLL = math.radians(30)
_JITTER_LOG_SCALE = math.log(1.25)  # scale log-uniform in [1 / 1.25, 1.25]
_JITTER_SHIFT = 0.10  # of the image side, each axis
_JITTER_STREAM = 1  # appended to an image's seed words: its own random stream
_OUTSIDE_STREAM = 2  # the same, for the parts world's per-image outline, hair and skin


@dataclass(frozen=True)
class _Identity:
    """Face-frame geometry and colours of one face: an identity's in the outer world, one
    image's in the parts world (see the module docstring)."""

    face_half_width: float
    face_half_height: float
    chin_power: float       # superellipse exponent of the lower outline: < 2 pointed, > 2 square
    eye_half_distance: float
    eye_y: float
    eye_half_width: float
    eye_half_height: float
    brow_gap: float          # from the eye centre up to the brow's centre line
    brow_thickness: float
    brow_arch: float
    nose_length: float
    nose_half_width: float
    mouth_gap: float         # from the nose tip down to the mouth's centre line
    mouth_half_width: float
    upper_lip: float
    lower_lip: float
    hairline: float          # fraction of the half height above the centre where hair starts
    hair_volume: float
    hair_length: float       # how far down the sides the hair reaches (face frame y)
    skin: tuple
    hair: tuple
    iris: tuple
    lips: tuple
    brows: tuple             # colour
    # Fixed in the outer world, drawn per identity in the parts world:
    eye_tilt: float = 0.25   # almond tilt of the eye outline (negative: the other way)
    iris_size: float = 1.1   # iris radius / eye half height
    brow_length: float = 1.2  # half length of a brow, in eye half widths
    nose_shade: float = 0.93  # nose colour / skin colour
    nose_shadow: float = 0.8  # colour of the nose's far half / skin colour
    # Face-frame heights of the top and bottom of the ears; None: the eyes' height and the
    # nose tip (the outer world, where they follow the identity's geometry).
    ears: tuple | None = None


def _draw_identity(rng: np.random.Generator) -> _Identity:
    """The outer world's identity: everything but pose, expression and lighting."""
    skin = _draw_skin(rng)
    lips = skin * np.array([0.85, 0.55, 0.55]) + rng.normal(0, 8, 3)
    ident = _Identity(
        face_half_width=rng.uniform(0.84, 1.0), face_half_height=rng.uniform(1.15, 1.38),
        chin_power=rng.uniform(1.5, 2.8),
        eye_half_distance=rng.uniform(0.31, 0.43), eye_y=rng.uniform(-0.16, 0.0),
        eye_half_width=rng.uniform(0.12, 0.17), eye_half_height=rng.uniform(0.045, 0.075),
        brow_gap=rng.uniform(0.15, 0.24), brow_thickness=rng.uniform(0.035, 0.075),
        brow_arch=rng.uniform(0.0, 0.06),
        nose_length=rng.uniform(0.33, 0.48), nose_half_width=rng.uniform(0.1, 0.17),
        mouth_gap=rng.uniform(0.18, 0.28), mouth_half_width=rng.uniform(0.2, 0.32),
        upper_lip=rng.uniform(0.035, 0.065), lower_lip=rng.uniform(0.045, 0.085),
        hairline=rng.uniform(0.55, 0.85), hair_volume=rng.uniform(0.05, 0.28),
        hair_length=rng.uniform(-0.3, 0.9),
        skin=tuple(np.clip(skin, 0, 255)), hair=tuple(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))]),
        iris=tuple(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))]),
        lips=tuple(np.clip(lips, 0, 255)), brows=())
    # The brows are a darker hair, set once the hair is drawn: the draws keep their order.
    return replace(ident, brows=tuple(np.array(ident.hair) * 0.8))


def _draw_skin(rng: np.random.Generator) -> np.ndarray:
    return _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * rng.uniform(0, 1) + rng.normal(0, 6, 3)


def _draw_inner_parts(rng: np.random.Generator) -> dict:
    """The parts world's identity: shapes, places and colours of brows, eyes, nose and mouth,
    1.3 times the outer world's sizes (a 14 x 14 map of a 112-pixel face sees an eye as
    about one cell wide), the brows far enough above the widest-open eye not to touch it."""
    eye_half_height = rng.uniform(0.055, 0.1)
    brow_thickness = rng.uniform(0.055, 0.12)
    nose_shade = rng.uniform(0.62, 1.0)
    return dict(
        eye_half_distance=rng.uniform(0.34, 0.46), eye_y=rng.uniform(-0.2, -0.02),
        eye_half_width=rng.uniform(0.15, 0.21), eye_half_height=eye_half_height,
        eye_tilt=rng.uniform(-0.35, 0.45), iris_size=rng.uniform(0.9, 1.35),
        brow_gap=1.2 * eye_half_height + brow_thickness / 2 + rng.uniform(0.03, 0.12),
        brow_thickness=brow_thickness, brow_arch=rng.uniform(0.0, 0.1),
        brow_length=rng.uniform(0.9, 1.3),
        nose_length=rng.uniform(0.34, 0.48), nose_half_width=rng.uniform(0.12, 0.22),
        nose_shade=nose_shade, nose_shadow=nose_shade * 0.86,
        mouth_gap=rng.uniform(0.2, 0.28), mouth_half_width=rng.uniform(0.25, 0.42),
        upper_lip=rng.uniform(0.045, 0.085), lower_lip=rng.uniform(0.06, 0.11),
        iris=tuple(_IRIS_PALETTE[rng.integers(len(_IRIS_PALETTE))]),
        brows=tuple(_BROW_PALETTE[rng.integers(len(_BROW_PALETTE))]),
        lips=tuple(_LIP_PALETTE[rng.integers(len(_LIP_PALETTE))]))


def _draw_outside(rng: np.random.Generator) -> dict:
    """The parts world's per-image outside: face outline, hair style and colour, skin, ears;
    the same distributions as the outer world's identities."""
    skin = _draw_skin(rng)
    ear_top = rng.uniform(-0.2, 0.0)
    return dict(
        face_half_width=rng.uniform(0.84, 1.0), face_half_height=rng.uniform(1.15, 1.38),
        chin_power=rng.uniform(1.5, 2.8),
        hairline=rng.uniform(0.55, 0.85), hair_volume=rng.uniform(0.05, 0.28),
        hair_length=rng.uniform(-0.3, 0.9),
        skin=tuple(np.clip(skin, 0, 255)), hair=tuple(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))]),
        ears=(ear_top, ear_top + rng.uniform(0.3, 0.5)))


def _superellipse_half_width(y, half_width, half_height, power):
    ratio = np.clip(np.abs(y) / half_height, 0, 1)
    return half_width * (1 - ratio ** power) ** (1 / power)


class _Face:
    """The face-frame shapes of one identity in one expression; all arrays are ``(n, 2)``."""

    def __init__(self, ident: _Identity, eye_open: float, mouth_open: float):
        self.ident = ident
        self.eye_open, self.mouth_open = eye_open, mouth_open
        self.nose_tip_y = ident.eye_y + ident.nose_length
        self.mouth_y = self.nose_tip_y + ident.mouth_gap + mouth_open / 2
        self.brow_y = ident.eye_y - ident.brow_gap
        self.brow_top = self.brow_y - ident.brow_thickness / 2 - ident.brow_arch
        self.ear_top, self.ear_bottom = ident.ears or (ident.eye_y, self.nose_tip_y)

    def half_width(self, y):
        """Half width of the face outline at height ``y``: rounder on top, the chin below."""
        i = self.ident
        top = _superellipse_half_width(y, i.face_half_width, i.face_half_height, 2.2)
        bottom = _superellipse_half_width(y, i.face_half_width, i.face_half_height, i.chin_power)
        return np.where(y < 0, top, bottom)

    def band(self, y0, y1, n=64):
        """Polygon of the face between heights ``y0 < y1``: down the left side, up the right."""
        # Cosine spacing: denser at the ends, where the outline turns fastest (the chin).
        ys = y0 + (y1 - y0) * 0.5 * (1 - np.cos(np.linspace(0, math.pi, n)))
        w = self.half_width(ys)
        return np.concatenate([np.stack([-w, ys], 1), np.stack([w[::-1], ys[::-1]], 1)])

    def jaw_landmarks(self):
        # 17 points from the image-left ear (just above the eyes) round the chin to the right.
        i = self.ident
        angles = np.linspace(math.pi + 0.12, -0.12, 17)
        ys = np.clip(np.sin(angles) * i.face_half_height, self.ident.eye_y, None)
        ys[8] = i.face_half_height
        xs = np.sign(np.cos(angles)) * self.half_width(ys) * 0.995
        xs[8] = 0.0
        return np.stack([xs, ys], 1)

    def eye(self, side, n=6):
        """Eye outline clockwise from its image-left corner over the upper lid.

        With ``n=6`` these are the iBUG points: 36-41 for ``side=-1`` (outer corner first),
        42-47 for ``side=1`` (inner corner first), both starting at the image-left corner.
        """
        i = self.ident
        cx, h = side * i.eye_half_distance, i.eye_half_height * self.eye_open
        t = np.concatenate([np.linspace(math.pi, 0, n // 2 + 1)[:-1],
                            np.linspace(0, -math.pi, n // 2 + 1)[:-1]])
        xs = cx + i.eye_half_width * np.cos(t)
        ys = i.eye_y - h * np.sin(t) * (1 + i.eye_tilt * np.cos(t) * side)  # almond tilt
        return np.stack([xs, ys], 1)

    def brow(self, side, n=5):
        """Brow centre line, from the image-left end to the image-right end."""
        i = self.ident
        xs = side * i.eye_half_distance + np.linspace(-i.brow_length, i.brow_length, n) * i.eye_half_width
        arch = i.brow_arch * np.cos(np.linspace(-1.2, 1.2, n) * 1.2)
        return np.stack([xs, self.brow_y - arch], 1)

    def brow_polygon(self, side):
        line = self.brow(side, 9)
        taper = np.linspace(0.6, 1.0, 9) if side < 0 else np.linspace(1.0, 0.6, 9)
        half = self.ident.brow_thickness / 2 * taper
        return np.concatenate([line - np.stack([0 * half, half], 1),
                               (line + np.stack([0 * half, half], 1))[::-1]])

    def nose_landmarks(self):
        i = self.ident
        bridge = np.stack([np.zeros(4), np.linspace(i.eye_y + 0.05, self.nose_tip_y - 0.03, 4)], 1)
        xs = np.linspace(-0.7, 0.7, 5) * i.nose_half_width
        ys = self.nose_tip_y + 0.03 - 0.025 * np.abs(np.linspace(-1, 1, 5))
        return np.concatenate([bridge, np.stack([xs, ys], 1)])

    def nose_polygon(self):
        i = self.ident
        top, tip = i.eye_y + 0.02, self.nose_tip_y
        w = i.nose_half_width
        return np.array([[-0.045, top], [0.045, top], [0.07, tip - 0.18], [w, tip - 0.02],
                         [w * 0.85, tip + 0.045], [0.0, tip + 0.06], [-w * 0.85, tip + 0.045],
                         [-w, tip - 0.02], [-0.07, tip - 0.18]])

    def mouth_landmarks(self):
        """Outer lip 48-59 (clockwise from the image-left corner), inner lip 60-67."""
        i, y, w = self.ident, self.mouth_y, self.ident.mouth_half_width
        gap = self.mouth_open / 2
        top = y - gap - i.upper_lip
        bow = 0.25 * i.upper_lip
        outer_upper = [[-w, y], [-0.6 * w, top + 0.2 * i.upper_lip], [-0.22 * w, top],
                       [0.0, top + bow], [0.22 * w, top], [0.6 * w, top + 0.2 * i.upper_lip], [w, y]]
        bottom = y + gap + i.lower_lip
        outer_lower = [[0.6 * w, bottom - 0.3 * i.lower_lip], [0.25 * w, bottom], [0.0, bottom],
                       [-0.25 * w, bottom], [-0.6 * w, bottom - 0.3 * i.lower_lip]]
        inner = [[-0.85 * w, y], [-0.3 * w, y - gap], [0.0, y - gap], [0.3 * w, y - gap],
                 [0.85 * w, y], [0.3 * w, y + gap], [0.0, y + gap], [-0.3 * w, y + gap]]
        return np.array(outer_upper + outer_lower + inner)

    def landmarks(self):
        """The 68 iBUG points in the face frame."""
        return np.concatenate([self.jaw_landmarks(), self.brow(-1), self.brow(1),
                               self.nose_landmarks(), self.eye(-1), self.eye(1),
                               self.mouth_landmarks()])

    def hair_back(self):
        """The hair behind the head: an enlarged head outline down to ``hair_length``."""
        i = self.ident
        grow = 1 + i.hair_volume
        ys = np.linspace(-i.face_half_height * grow, min(i.hair_length, i.face_half_height * 0.8), 30)
        w = _superellipse_half_width(np.minimum(ys, 0), i.face_half_width * grow,
                                     i.face_half_height * grow, 2.2)  # straight below the middle
        return np.concatenate([np.stack([-w, ys], 1), np.stack([w[::-1], ys[::-1]], 1)])

    def hair_front(self):
        """Hair over the forehead: the top of the face outline above a curved hairline."""
        i = self.ident
        line_y = -i.hairline * i.face_half_height
        edge_y = line_y + 0.25
        ys = np.linspace(edge_y, -i.face_half_height, 15)
        w = self.half_width(ys) * 1.01
        xs = np.linspace(1, -1, 21)
        hairline = np.stack([xs * w[0], line_y + 0.25 * xs ** 2], 1)
        return np.concatenate([np.stack([-w, ys], 1), np.stack([w[::-1], ys[::-1]], 1), hairline])


# Depth (towards the camera, face-frame units) of the landmark groups: jaw, brows, nose,
# eyes, lips. Yaw moves a point sideways by its depth; polygons use the same depths.
_LANDMARK_DEPTH = np.concatenate([np.zeros(17), np.full(10, 0.1), np.full(9, 0.25),
                                  np.full(12, 0.1), np.full(20, 0.12)])


class _Pose:
    """Where the face frame lands in the picture: roll and yaw (radians), ``scale`` (pixels
    per face-frame unit) and ``centre`` (pixels)."""

    def __init__(self, ident: _Identity, roll: float, yaw: float, scale: float, centre):
        self.ident, self.roll, self.yaw, self.scale = ident, roll, yaw, scale
        self.centre = np.asarray(centre, float)
        self.rotation = np.array([[math.cos(roll), -math.sin(roll)],
                                  [math.sin(roll), math.cos(roll)]])

    @classmethod
    def draw(cls, ident: _Identity, size: int, rng: np.random.Generator) -> "_Pose":
        return cls(ident, roll=math.radians(rng.normal(0, 7)), yaw=rng.normal(0, 0.22),
                   scale=size * rng.uniform(0.26, 0.32),
                   centre=size * (np.array([0.5, 0.54]) + rng.normal(0, 0.035, 2)))

    def jittered(self, size: int, rng: np.random.Generator) -> "_Pose":
        """This pose moved by a random similarity of the picture about its centre.

        Roll and scale compose with the pose's own, so every projected point ``p`` moves
        to ``centre + scale * rotation @ (p - centre) + shift``: one similarity for the
        landmarks, the picture and the masks.
        """
        roll = rng.uniform(-_JITTER_ROLL, _JITTER_ROLL)
        scale = math.exp(rng.uniform(-_JITTER_LOG_SCALE, _JITTER_LOG_SCALE))
        shift = rng.uniform(-_JITTER_SHIFT, _JITTER_SHIFT, 2) * size
        rotation = np.array([[math.cos(roll), -math.sin(roll)], [math.sin(roll), math.cos(roll)]])
        middle = np.full(2, (size - 1) / 2)
        centre = middle + scale * rotation @ (self.centre - middle) + shift
        return _Pose(self.ident, self.roll + roll, self.yaw, self.scale * scale, centre)

    def project(self, points, depth=0.0) -> np.ndarray:
        """Face-frame points ``(n, 2)`` (and their depths) to pixel coordinates ``(n, 2)``."""
        points = np.asarray(points, float)
        i = self.ident
        # Yaw: x moves by the point's depth on the head ellipsoid (plus its own) * sin(yaw).
        ellipsoid = np.sqrt(np.clip(1 - (points[:, 0] / (i.face_half_width * 1.1)) ** 2
                                    - (points[:, 1] / (i.face_half_height * 1.2)) ** 2, 0, 1))
        x = points[:, 0] * math.cos(self.yaw) + (0.55 * ellipsoid + depth) * math.sin(self.yaw)
        return np.stack([x, points[:, 1]], 1) @ self.rotation.T * self.scale + self.centre

    def fit_inside(self, points, depth, size: int, margin: int) -> np.ndarray:
        """Shift the centre so that the projected ``points`` keep ``margin`` pixels from the
        border (a detector's crop holds the whole face); returns them projected."""
        projected = self.project(points, depth)
        low, high = projected.min(0), projected.max(0)
        self.centre = (self.centre + np.maximum(margin - low, 0)
                       - np.maximum(high - (size - 1 - margin), 0))
        return self.project(points, depth)


def _rgb(colour) -> tuple:
    return tuple(int(c) for c in np.clip(colour, 0, 255))


class _Canvas:
    """The picture and the part-label map, both drawn at ``_SUPERSAMPLE`` times the size
    from the same projected polygons, so that they share every rasterised pixel.

    What belongs to a part in ``erase`` is not drawn (see :class:`SyntheticFaces`).
    """

    def __init__(self, size: int, pose: _Pose, erase=frozenset()):
        self.size, self.pose, self.hi, self.erase = size, pose, _SUPERSAMPLE, frozenset(erase)
        self.picture = Image.new("RGB", (size * self.hi, size * self.hi))
        # Each labelled polygon paints its own code, in painting order (0: none), so that
        # masks() can tell which polygon lies on top; _code_parts maps a code to its part.
        self.labels = Image.new("L", self.picture.size, 0)
        self._code_parts = [0]

    def to_picture(self, pixels: np.ndarray) -> np.ndarray:
        # Final pixel centres are integers; supersampled pixel k covers [k / hi - 0.5,
        # (k + 1) / hi - 0.5] of them, so x maps to hi * x + (hi - 1) / 2.
        return pixels * self.hi + (self.hi - 1) / 2

    def polygon(self, points, colour, part: str | None = None, depth=0.0,
                owner: str | None = None) -> None:
        """Fill a face-frame polygon; with ``part`` it also becomes that part in the masks.
        ``owner``: the part it is a detail of, without being in its mask (a nostril)."""
        if (part or owner) in self.erase:
            return
        outline = [tuple(p) for p in self.to_picture(self.pose.project(points, depth))]
        ImageDraw.Draw(self.picture).polygon(outline, fill=_rgb(colour))
        if part is not None:
            self._code_parts.append(_LABEL[part])
            ImageDraw.Draw(self.labels).polygon(outline, fill=len(self._code_parts) - 1)

    def ellipse(self, centre, radii, colour, depth=0.0, inside=None, owner: str | None = None) -> None:
        """An ellipse at a face-frame ``centre`` with radii in face-frame units, painted only
        inside the face-frame polygon ``inside`` if given. Not in any mask; a detail of
        ``owner``."""
        if owner in self.erase:
            return
        c = self.to_picture(self.pose.project([centre], depth)[0])
        rx, ry = np.asarray(radii) * self.pose.scale * self.hi
        layer = self.picture.copy()
        ImageDraw.Draw(layer).ellipse([c[0] - rx, c[1] - ry, c[0] + rx, c[1] + ry], fill=_rgb(colour))
        clip = Image.new("L", self.picture.size, 0 if inside is not None else 255)
        if inside is not None:
            outline = self.to_picture(self.pose.project(inside, depth))
            ImageDraw.Draw(clip).polygon([tuple(p) for p in outline], fill=255)
        self.picture.paste(layer, mask=clip)

    def line(self, points, colour, width: float, depth=0.0, owner: str | None = None) -> None:
        if owner in self.erase:
            return
        pixels = self.to_picture(self.pose.project(points, depth))
        ImageDraw.Draw(self.picture).line([tuple(p) for p in pixels], fill=_rgb(colour),
                                          width=max(1, int(width * self.pose.scale * self.hi)))

    def background(self, rng: np.random.Generator) -> None:
        """A random colour with a vertical gradient."""
        side = self.size * self.hi
        colour = rng.uniform(30, 225, 3) + np.zeros((side, side, 3))
        colour += np.linspace(-1, 1, side)[:, None, None] * rng.normal(0, 25, 3)
        self.picture.paste(Image.fromarray(np.clip(colour, 0, 255).astype(np.uint8)))

    def photograph(self, rng: np.random.Generator) -> np.ndarray:
        """The final ``uint8 (S, S, 3)`` image: box-filtered down, lit by a directional ramp
        and darkened towards the face outline (the head's curvature), blurred, noisy."""
        size, pose, ident = self.size, self.pose, self.pose.ident
        image = np.asarray(self.picture.resize((size, size), Image.BOX)).astype(np.float64)
        ys, xs = np.mgrid[0:size, 0:size].astype(float)
        offset = np.stack([xs - pose.centre[0], ys - pose.centre[1]], -1)
        direction = rng.normal(0, 1, 2)
        ramp = offset @ (direction / (np.linalg.norm(direction) + 1e-9)) / size
        image *= (rng.uniform(0.7, 1.25) + rng.uniform(0.2, 0.8) * ramp)[..., None]
        local = offset @ pose.rotation / pose.scale
        radial = ((local[..., 0] / ident.face_half_width) ** 2
                  + (local[..., 1] / ident.face_half_height) ** 2)
        image *= (1 - 0.25 * np.clip(radial, 0, 1) ** 2)[..., None]
        blurred = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(rng.uniform(0.0, 0.7) * size / 112))
        image = np.asarray(blurred).astype(np.float64)
        image += rng.normal(0, rng.uniform(1, 8), image.shape)
        return np.clip(image, 0, 255).round().astype(np.uint8)

    def masks(self) -> np.ndarray:
        """``bool (8, S, S)``: the pixels last painted as each part, in ``PARTS`` order.

        A pixel belongs to the part of the topmost labelled polygon among its supersampled
        pixels, so a pixel painted all over in a part's colour is in that part's mask.
        Labels drawn at the final size were not: a polygon fill also takes the pixels its
        edge crosses, half a final pixel wide there, and 0.5-2% of the pixels painted all
        over in one part's colour went to the part painted next to it (32 faces at 112).
        """
        size, hi = self.size, self.hi
        codes = np.asarray(self.labels).reshape(size, hi, size, hi).max((1, 3))
        labels = np.asarray(self._code_parts)[codes]
        return labels[None] == np.arange(1, len(PARTS) + 1)[:, None, None]


def _paint(canvas: _Canvas, face: _Face, rng: np.random.Generator) -> None:
    """Paint back to front; a later part replaces an earlier one in the masks. The random
    numbers are drawn whether or not their part is erased, so erasing changes nothing else."""
    ident = face.ident
    fh, fw = ident.face_half_height, ident.face_half_width
    skin, hair, lips = np.array(ident.skin), np.array(ident.hair), np.array(ident.lips)
    canvas.background(rng)
    canvas.polygon([[-0.45 * fw, fh * 0.6], [0.45 * fw, fh * 0.6], [0.5 * fw, fh * 1.6],
                    [-0.5 * fw, fh * 1.6]], skin * 0.85)  # neck
    canvas.polygon([[-2.2, fh * 1.35], [2.2, fh * 1.35], [2.6, 4.0], [-2.6, 4.0]],
                   rng.uniform(20, 230, 3))  # shoulders
    canvas.polygon(face.hair_back(), hair * 0.85, "hair")
    for side in (-1, 1):  # ears, behind the face outline; they belong to no part
        canvas.polygon([[side * fw * 0.9, face.ear_top], [side * fw * 1.12, face.ear_top - 0.05],
                        [side * fw * 1.15, face.ear_bottom - 0.1],
                        [side * fw * 0.95, face.ear_bottom]], skin * 0.88)
    canvas.polygon(face.band(-fh, face.brow_top), skin, "forehead")
    canvas.polygon(face.band(face.brow_top, face.mouth_y), skin, "cheek")
    canvas.polygon(face.band(face.mouth_y, fh), skin, "jaw")
    if ident.hairline < 0.8:  # the others are bald or have their hair swept back
        canvas.polygon(face.hair_front(), hair, "hair")
    for side in (-1, 1):
        canvas.polygon(face.brow_polygon(side), ident.brows, "brows", depth=0.1)
        eye = face.eye(side, 24)
        canvas.polygon(eye, (235, 232, 225), "eyes", depth=0.1)
        iris = [side * ident.eye_half_distance + rng.normal(0, 0.02), ident.eye_y]
        radius = ident.eye_half_height * ident.iris_size
        canvas.ellipse(iris, (radius, radius), ident.iris, depth=0.1, inside=eye, owner="eyes")
        canvas.ellipse(iris, (radius / 2, radius / 2), (10, 10, 10), depth=0.1, inside=eye,
                       owner="eyes")
    nose = face.nose_polygon()
    canvas.polygon(nose, skin * ident.nose_shade, "nose", depth=0.25)
    # The half of the nose turned away from the camera is in shadow (the polygon is
    # symmetric: its points 1-5 are the right half, from the bridge to the tip).
    far_half = np.concatenate([[[0.0, nose[0, 1]]], nose[1:6]]) * [math.copysign(1, canvas.pose.yaw), 1]
    canvas.polygon(far_half, skin * ident.nose_shadow, depth=0.25, owner="nose")
    for side in (-1, 1):
        canvas.ellipse([side * ident.nose_half_width * 0.5, face.nose_tip_y + 0.025],
                       (ident.nose_half_width * 0.28, 0.02), skin * 0.45, depth=0.25, owner="nose")
    mouth = face.mouth_landmarks()
    canvas.polygon(mouth[:12], lips, "mouth", depth=0.12)
    if face.mouth_open > 0:
        canvas.polygon(mouth[12:], (60, 20, 25), depth=0.12, owner="mouth")
    canvas.line(mouth[12:17], lips * 0.5, width=0.012, depth=0.12, owner="mouth")


class SyntheticFaces(torch.utils.data.Dataset):
    """``num_identities * images_per_identity`` drawn faces; see the module docstring.

    Item ``i`` is image ``i % images_per_identity`` of identity ``i // images_per_identity``
    and returns ``dict(image=float32 (3, S, S) normalised, label=int,
    landmarks=float32 (68, 2) (x, y) in pixels, part_masks=bool (8, S, S) in PARTS order)``.
    Pixel ``(x, y)`` has its centre at integer coordinates.

    ``identity``: where identity lives, ``"parts"`` (brows, eyes, nose and mouth) or
    ``"outer"`` (everything; the faces drawn before the option existed, unchanged).
    ``jitter=True`` adds the pose spread of unaligned detector crops; image ``i`` is then
    the same face as without jitter, moved by a similarity. ``erase``: part names (of
    ``PARTS``) not drawn, image ``i`` otherwise the same: an erased inner part shows the
    skin beneath it, erased hair the forehead or background, an erased skin part what lies
    behind the face; its mask is empty.
    """

    parts = PARTS

    def __init__(self, num_identities: int, images_per_identity: int, size: int = 112,
                 seed: int = 0, jitter: bool = False, identity: str = "parts", erase=()):
        for name, value in (("num_identities", num_identities),
                            ("images_per_identity", images_per_identity), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if size < 32:
            raise ValueError(f"size must be at least 32 to draw a face, got {size}")
        if not isinstance(jitter, bool):
            raise TypeError(f"jitter must be True or False, got {jitter!r}")
        if identity not in IDENTITY:
            raise ValueError(f"identity must be one of {IDENTITY}, got {identity!r}")
        if isinstance(erase, str) or not all(isinstance(name, str) for name in erase):
            raise TypeError(f"erase must be a collection of part names such as ('eyes',), got {erase!r}")
        unknown = sorted(set(erase) - set(PARTS))
        if unknown:
            raise ValueError(f"erase: {unknown} not among the parts {PARTS}")
        self.num_identities, self.images_per_identity = num_identities, images_per_identity
        self.size, self.seed, self.jitter = size, seed, jitter
        self.identity_in = identity
        self.erase = tuple(name for name in PARTS if name in erase)
        self.num_classes = num_identities

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def sample_digest(self) -> str:
        """SHA-256 of what draws the samples: the counts, the seed and the pose spread."""
        return hashlib.sha256(repr((self.num_identities, self.images_per_identity, self.seed,
                                    self.jitter)).encode()).hexdigest()

    def label(self, index: int) -> int:
        return self._check(index) // self.images_per_identity

    def _check(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return index % len(self)

    def identity(self, label: int):
        """What identity ``label`` fixes: its whole face (an ``_Identity``) in the outer
        world; in the parts world the shapes, places and colours of its inner parts (a
        dict of ``_Identity`` fields)."""
        rng = np.random.default_rng([self.seed, label, 0])
        return _draw_identity(rng) if self.identity_in == "outer" else _draw_inner_parts(rng)

    def face(self, index: int) -> _Identity:
        """The face item ``index`` draws, before pose, expression and lighting: its
        identity's in the outer world; in the parts world its identity's inner parts with
        this image's own outline, hair, skin and ears (a random stream of its own)."""
        label, shot = divmod(self._check(index), self.images_per_identity)
        if self.identity_in == "outer":
            return self.identity(label)
        outside = _draw_outside(np.random.default_rng([self.seed, label, shot + 1, _OUTSIDE_STREAM]))
        return _Identity(**self.identity(label), **outside)

    def _draw(self, index: int):
        """``(canvas, label, float32 (68, 2) landmarks, rng)``: item ``index`` painted, not
        yet photographed; ``rng`` goes on to the photograph's lighting and noise."""
        index = self._check(index)
        label, shot = divmod(index, self.images_per_identity)
        ident = self.face(index)
        rng = np.random.default_rng([self.seed, label, shot + 1])
        face = _Face(ident, eye_open=rng.uniform(0.65, 1.15),
                     mouth_open=rng.uniform(0, 0.06) * (rng.uniform() < 0.4))
        pose = _Pose.draw(ident, self.size, rng)
        landmarks = pose.fit_inside(face.landmarks(), _LANDMARK_DEPTH, self.size, margin=2)
        if self.jitter:
            jitter_rng = np.random.default_rng([self.seed, label, shot + 1, _JITTER_STREAM])
            pose = pose.jittered(self.size, jitter_rng)
            landmarks = pose.fit_inside(face.landmarks(), _LANDMARK_DEPTH, self.size, margin=2)
        canvas = _Canvas(self.size, pose, self.erase)
        _paint(canvas, face, rng)
        return canvas, label, landmarks.astype(np.float32), rng

    def _render(self, index: int):
        """``(uint8 (S, S, 3) image, label, float32 (68, 2) landmarks, bool (8, S, S) masks)``."""
        canvas, label, landmarks, rng = self._draw(index)
        return canvas.photograph(rng), label, landmarks, canvas.masks()

    def raw_image(self, index: int) -> np.ndarray:
        """The picture of item ``index`` as ``uint8 (S, S, 3)``."""
        return self._render(index)[0]

    def __getitem__(self, index: int) -> dict:
        image, label, landmarks, masks = self._render(index)
        return dict(image=normalize(image), label=label, landmarks=torch.from_numpy(landmarks),
                    part_masks=torch.from_numpy(masks))


def contact_sheet(dataset: SyntheticFaces, identities: int = 6, shots: int = 4,
                  erase=()) -> Image.Image:
    """A picture of the set: one column per identity, ``shots`` images of it down the
    column, then a row with the first shot's part masks (colours of ``PART_COLOURS`` in
    ``PARTS`` order) and its 68 landmarks in white, and with ``erase`` (part names) a last
    row with the first shot drawn without those parts."""
    size = dataset.size
    rows = shots + 1 + bool(erase)
    sheet = Image.new("RGB", (identities * size, rows * size))
    erased = None
    if erase:
        erased = SyntheticFaces(dataset.num_identities, dataset.images_per_identity, dataset.size,
                                dataset.seed, dataset.jitter, dataset.identity_in, erase)
    for column in range(identities):
        for row in range(shots):
            index = column * dataset.images_per_identity + row
            sheet.paste(Image.fromarray(dataset.raw_image(index)), (column * size, row * size))
        first = column * dataset.images_per_identity
        image, _, landmarks, masks = dataset._render(first)
        overlay = (masks[..., None] * PART_COLOURS[:, None, None]).sum(0).astype(np.uint8)
        overlay = Image.fromarray(np.where(masks.any(0)[..., None], overlay, image // 3))
        draw = ImageDraw.Draw(overlay)
        for x, y in landmarks:
            draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(255, 255, 255))
        sheet.paste(overlay, (column * size, shots * size))
        if erased is not None:
            sheet.paste(Image.fromarray(erased.raw_image(first)), (column * size, (shots + 1) * size))
    return sheet
