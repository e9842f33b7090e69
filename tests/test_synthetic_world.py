"""The synthetic world: the old world's images stay as they were drawn before the identity
option existed, and the worlds' properties (where identity lives) hold without training.

``OUTER_REFERENCE`` was recorded from the code before ``identity=`` was added (commit
787197d): per image, the mean of each of its 4 x 4 blocks per channel (0.1 rounding), its
part-mask pixel counts (the seven parts of then: hair, forehead, cheek, eyes with brows,
nose, mouth, jaw) and landmarks 8, 30 and 37. Block means rather than a hash: a one-ulp
difference in NumPy's float64 sin or power (which differ between instruction sets) may flip
an edge pixel; any change to what is drawn or to the random stream moves a block far more.
"""
import numpy as np
import pytest

from train.data.synthetic import PARTS, SyntheticFaces

# ((num_identities, images_per_identity, size, seed, jitter), index, block means,
#  part pixel counts, landmarks 8, 30, 37 (x, y)).
OUTER_REFERENCE = (
    ((3, 4, 112, 0, False), 0,
     (74.6, 29.7, 84.7, 82.5, 51.3, 60.4, 83.0, 43.2, 73.8, 83.2, 31.6, 97.9, 94.8, 60.3, 93.9,
      118.2, 97.1, 76.8, 112.9, 91.3, 72.7, 103.2, 57.2, 126.9, 112.3, 86.0, 137.2, 142.0,
      114.4, 91.5, 136.5, 110.3, 99.6, 120.1, 89.3, 161.4, 123.8, 114.6, 174.3, 125.0, 104.5,
      111.4, 124.2, 103.5, 124.5, 124.2, 107.2, 162.6),
     (1256, 635, 1417, 110, 84, 40, 1139), ((53.635, 94.308), (53.438, 62.307), (37.474, 50.295))),
    ((3, 4, 112, 0, False), 11,
     (143.5, 168.2, 99.3, 143.2, 161.4, 95.4, 153.8, 174.3, 102.9, 170.4, 200.1, 118.6, 119.1,
      144.9, 93.7, 160.4, 132.2, 108.3, 170.6, 146.6, 118.9, 143.6, 175.1, 113.8, 100.2, 125.2,
      92.2, 210.7, 184.3, 166.2, 210.3, 183.9, 165.3, 117.6, 151.3, 109.3, 76.6, 106.1, 86.5,
      126.0, 131.3, 114.5, 140.5, 139.2, 122.2, 99.2, 126.2, 103.8),
     (943, 535, 1106, 141, 79, 71, 640), ((57.43, 97.733), (59.071, 69.746), (44.234, 57.606))),
    ((3, 4, 112, 0, True), 5,
     (36.9, 83.5, 89.4, 66.2, 61.2, 52.2, 101.4, 47.5, 23.8, 59.9, 74.2, 70.0, 35.4, 90.9,
      101.6, 83.8, 56.4, 39.4, 99.9, 68.0, 48.1, 77.5, 67.0, 56.2, 33.7, 98.9, 114.5, 78.9,
      67.9, 55.9, 98.0, 67.3, 47.0, 62.4, 86.1, 86.4, 31.0, 107.3, 128.6, 54.9, 85.7, 89.9,
      82.0, 68.4, 55.2, 37.5, 115.1, 136.0),
     (2313, 552, 1706, 156, 103, 68, 1478), ((61.105, 105.467), (61.508, 64.491), (49.767, 48.284))),
    ((3, 4, 112, 0, True), 11,
     (147.6, 173.1, 102.2, 156.1, 183.8, 108.9, 165.6, 194.5, 115.0, 174.5, 205.0, 121.5, 123.5,
      148.1, 96.5, 139.2, 122.2, 88.8, 131.6, 142.5, 92.2, 147.2, 179.5, 116.6, 125.5, 138.7,
      109.2, 228.7, 195.8, 177.8, 160.7, 162.1, 133.0, 120.0, 155.2, 111.8, 97.5, 109.9, 92.0,
      174.7, 154.6, 140.0, 97.6, 127.4, 105.6, 94.3, 130.9, 107.0),
     (757, 420, 864, 121, 68, 58, 516), ((38.034, 101.152), (46.048, 77.495), (36.166, 63.563))),
    ((2, 3, 64, 7, False), 0,
     (147.8, 72.0, 46.1, 149.4, 96.0, 73.7, 141.6, 89.2, 69.2, 128.3, 62.0, 39.6, 158.6, 80.9,
      46.0, 176.6, 151.3, 128.4, 161.5, 135.8, 113.6, 136.9, 68.2, 37.1, 164.7, 80.8, 35.8,
      160.9, 124.7, 97.2, 150.7, 114.6, 89.5, 144.9, 71.3, 30.8, 181.8, 83.2, 20.7, 156.4, 94.6,
      52.8, 141.1, 94.9, 61.2, 158.9, 72.9, 19.2),
     (381, 135, 517, 59, 42, 20, 310), ((33.824, 56.947), (33.533, 38.654), (25.273, 30.726))),
    ((2, 3, 64, 7, False), 5,
     (63.8, 30.4, 117.6, 53.7, 26.3, 79.6, 49.4, 25.2, 68.3, 52.7, 24.9, 94.8, 66.8, 44.8,
      144.8, 95.2, 77.1, 62.0, 86.0, 68.5, 51.5, 52.7, 35.3, 121.5, 65.4, 61.3, 190.1, 117.2,
      94.1, 71.1, 102.7, 85.4, 79.1, 54.0, 49.8, 168.3, 89.5, 56.1, 165.9, 100.9, 75.8, 72.1,
      64.5, 72.5, 181.2, 50.1, 65.1, 206.9),
     (301, 157, 475, 67, 34, 25, 331), ((26.153, 54.634), (31.311, 36.577), (25.147, 26.669))),
)


def _blocks(image: np.ndarray) -> np.ndarray:
    side = image.shape[0] // 4
    return image.astype(np.float64).reshape(4, side, 4, side, 3).mean((1, 3)).reshape(-1)


@pytest.mark.parametrize("case", range(len(OUTER_REFERENCE)))
def test_outer_world_draws_what_it_drew_before(case):
    (identities, per, size, seed, jitter), index, blocks, counts, points = OUTER_REFERENCE[case]
    faces = SyntheticFaces(identities, per, size=size, seed=seed, jitter=jitter, identity="outer")
    image, _, landmarks, masks = faces._render(index)
    np.testing.assert_allclose(_blocks(image), blocks, atol=0.5)
    part = dict(zip(PARTS, masks))
    part["eyes"] = part.pop("brows") | part["eyes"]  # the brows were part of the eyes
    pixels = [part[name].sum() for name in ("hair", "forehead", "cheek", "eyes", "nose", "mouth", "jaw")]
    np.testing.assert_allclose(pixels, counts, atol=2)
    np.testing.assert_allclose(landmarks[[8, 30, 37]], points, atol=1e-3)


# ---------------------------------------------------------------- the parts world


def _shots(world: str, identities: int = 20, shots: int = 6):
    """Hand-made features of ``shots`` images of each of ``identities`` identities."""
    from train.gate import inner_features, outer_features

    faces = SyntheticFaces(identities, shots, size=112, seed=11, identity=world)
    rendered = [faces._render(index) for index in range(len(faces))]
    outer = np.array([outer_features(image, masks) for image, _, _, masks in rendered])
    inner = np.array([inner_features(image, masks) for image, _, _, masks in rendered])
    return outer, inner, np.array([label for _, label, _, _ in rendered])


def test_identity_lives_in_the_inner_parts_of_the_parts_world_and_everywhere_in_the_outer():
    from train.gate import nearest_neighbour_accuracy

    chance = 1 / 20
    outer, inner, labels = _shots("parts")
    # Hair and skin colour, hair and face area, aspect: drawn per image, so no better than
    # chance (4.4 standard deviations of a chance count above it: 18 of 120); the inner
    # parts' colours and shade identify the shots (0.9 measured).
    assert nearest_neighbour_accuracy(outer, labels) <= 3 * chance
    assert nearest_neighbour_accuracy(inner, labels) >= 0.6
    # The old world: the outside alone identifies (0.85 measured).
    outer, _, labels = _shots("outer")
    assert nearest_neighbour_accuracy(outer, labels) >= 0.6


def test_parts_world_shots_share_inner_parts_and_nothing_outside():
    from train.data.synthetic import _draw_inner_parts

    faces = SyntheticFaces(3, 4, size=64, seed=2)
    inner = set(_draw_inner_parts(np.random.default_rng(0)))
    outside = {"face_half_width", "face_half_height", "chin_power", "hairline", "hair_volume",
               "hair_length", "skin", "hair", "ears"}
    a, b, other = faces.face(0), faces.face(1), faces.face(4)  # identity 0 twice, identity 1
    for field in inner:
        assert getattr(a, field) == getattr(b, field), field
    # Colours come from palettes of 7-8 and may coincide; shapes and places do not.
    for field in inner - {"iris", "brows", "lips"}:
        assert getattr(a, field) != getattr(other, field), field
    for field in outside - {"hair"}:
        assert getattr(a, field) != getattr(b, field), field
    assert len({faces.face(index).hair for index in range(4)}) > 1
    assert faces.identity(0) == {field: getattr(a, field) for field in inner}


def test_nearest_neighbour_accuracy_by_hand():
    from train.gate import nearest_neighbour_accuracy

    # Standardised, the first feature (0 or 1) weighs as much as the second (spread 158):
    # points 0-1 and 2-3 pair up along the first; unscaled, 0 would pair with 2.
    features = np.array([[0.0, 0.0], [0.0, 300.0], [1.0, 100.0], [1.0, 400.0]])
    assert nearest_neighbour_accuracy(features, np.array([0, 0, 1, 1])) == 1.0
    assert nearest_neighbour_accuracy(features, np.array([0, 1, 0, 1])) == 0.0
    # The middle one of three points is as far from both others: ties go to the lower index.
    line = np.array([[0.0], [1.0], [2.0]])
    assert nearest_neighbour_accuracy(line, np.array([5, 7, 7])) == pytest.approx(1 / 3)


def test_wilson_interval_is_scipys():
    from scipy import stats

    from train.gate import wilson_interval

    for successes, trials in ((0, 10), (3, 480), (336, 480), (480, 480)):
        expected = stats.binomtest(successes, trials).proportion_ci(0.95, method="wilson")
        assert wilson_interval(successes, trials) == pytest.approx((expected.low, expected.high), abs=1e-12)


# ---------------------------------------------------------------- erasing parts


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=radius)


@pytest.mark.parametrize("world, jitter", [("parts", False), ("parts", True), ("outer", False)])
def test_erasing_a_part_changes_only_its_pixels(world, jitter):
    from train.data.synthetic import INNER_PARTS

    drawn = dict(num_identities=2, images_per_identity=2, size=96, seed=4, jitter=jitter, identity=world)
    faces = SyntheticFaces(**drawn)
    for erase in [(name,) for name in PARTS] + [INNER_PARTS]:
        erased = SyntheticFaces(**drawn, erase=erase)
        for index in range(len(faces)):
            canvas, label, landmarks, _ = faces._draw(index)
            image, _, _, masks = faces._render(index)
            image_e, label_e, landmarks_e, masks_e = erased._render(index)
            assert label_e == label and np.array_equal(landmarks_e, landmarks)
            changed = (image != image_e).any(-1)
            assert changed.any(), (erase, index)
            # Same random stream: nothing changes but where the part shows in any of a
            # pixel's supersampled pixels (a sliver of forehead between fringe and hair
            # shows in a few that the mask gives to the hair), widened by the blur (up to
            # 0.6 px of standard deviation here).
            codes = [code for code, k in enumerate(canvas._code_parts) if k and PARTS[k - 1] in erase]
            shows = np.isin(np.asarray(canvas.labels), codes)
            region = shows.reshape(faces.size, canvas.hi, faces.size, canvas.hi).any((1, 3))
            assert not (changed & ~_dilate(region, 3)).any(), (erase, index)
            for k, name in enumerate(PARTS):
                if name in erase:
                    assert not masks_e[k].any(), (erase, name)
                else:  # what the erased part covered now belongs to the parts beneath
                    assert not (masks[k] & ~masks_e[k]).any(), (erase, name)


def test_erased_inner_parts_show_the_skin_beneath():
    from train.data.synthetic import INNER_PARTS, _rgb

    for index in range(6):
        faces = SyntheticFaces(3, 2, size=96, seed=6, erase=INNER_PARTS)
        canvas, _, _, _ = faces._draw(index)
        _, _, _, masks = SyntheticFaces(3, 2, size=96, seed=6)._render(index)
        part, erased = dict(zip(PARTS, masks)), dict(zip(PARTS, canvas.masks()))
        inner = np.any([part[name] for name in INNER_PARTS], 0)
        skin = erased["forehead"] | erased["cheek"] | erased["jaw"]
        # The brows may lie under a fringe of hair; everything else there is skin.
        assert not (inner & ~(skin | erased["hair"])).any(), index
        assert (inner & skin).sum() > 0.9 * inner.sum(), index
        size, hi = canvas.size, canvas.hi
        blocks = np.asarray(canvas.picture).reshape(size, hi, size, hi, 3).transpose(0, 2, 1, 3, 4)
        blocks = blocks.reshape(size, size, hi * hi, 3)
        flat = (blocks == blocks[:, :, :1]).all((2, 3))
        painted_skin = flat & (blocks[:, :, 0] == _rgb(faces.face(index).skin)).all(-1)
        # Inside the erased parts, away from their edges, all of it is skin.
        interior = inner & skin & ~_dilate(~(inner & skin), 1)
        assert interior.sum() > 0 and (painted_skin | ~interior).all(), index


def test_bad_identity_and_erase_arguments_are_refused():
    with pytest.raises(ValueError, match="identity must be one of"):
        SyntheticFaces(2, 2, identity="inner")
    with pytest.raises(ValueError, match=r"erase: \['ears'\] not among the parts"):
        SyntheticFaces(2, 2, erase=("eyes", "ears"))
    with pytest.raises(TypeError, match="erase must be a collection of part names"):
        SyntheticFaces(2, 2, erase="eyes")


def test_data_identity_reaches_the_synthetic_faces():
    from train.config import config_from_dict
    from train.data import build_dataset

    for world in ("parts", "outer"):
        config = config_from_dict({"data": {"num_identities": 2, "images_per_identity": 2,
                                            "identity": world}})
        assert build_dataset(config.data, 64).identity_in == world
    assert config_from_dict({}).data.identity == "parts"
    with pytest.raises(ValueError, match="data.identity must be one of"):
        config_from_dict({"data": {"identity": "inner"}})
