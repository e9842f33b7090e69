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

from train.data.synthetic import SyntheticFaces

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
    faces = SyntheticFaces(identities, per, size=size, seed=seed, jitter=jitter)
    image, _, landmarks, masks = faces._render(index)
    np.testing.assert_allclose(_blocks(image), blocks, atol=0.5)
    np.testing.assert_allclose(masks.reshape(len(masks), -1).sum(1), counts, atol=2)
    np.testing.assert_allclose(landmarks[[8, 30, 37]], points, atol=1e-3)
