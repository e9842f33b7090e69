"""ecloss_fast.metrics against hand-computed values on constructed inputs (docs/design.md section 7)."""
from __future__ import annotations

import heapq

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ecloss_fast import metrics


# ---------------------------------------------------------------- count_peaks


def brute_force_peaks(values: np.ndarray, min_prominence: float, connectivity: int) -> int:
    """Prominence by its definition: for each pixel, the best bottleneck to higher ground.

    "Higher" is ``(value, -flat index)`` larger; the bottleneck of a path is its lowest
    value, found by a widest-path search (Dijkstra on max-min). Independent of union-find.
    """
    h, w = values.shape
    flat = values.ravel()
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    span = flat.max() - flat.min()
    if span == 0:
        return 0
    count = 0
    for p in range(flat.size):
        higher = [q for q in range(flat.size) if (flat[q], -q) > (flat[p], -p)]
        if not higher:
            prominence = span
        else:
            best = {p: flat[p]}
            heap = [(-flat[p], p)]
            col = -np.inf
            while heap:
                neg, q = heapq.heappop(heap)
                if -neg < best.get(q, -np.inf):
                    continue
                if (flat[q], -q) > (flat[p], -p):
                    col = -neg
                    break
                u, v = divmod(q, w)
                for du, dv in steps:
                    if 0 <= u + du < h and 0 <= v + dv < w:
                        r = (u + du) * w + v + dv
                        bottleneck = min(-neg, flat[r])
                        if bottleneck > best.get(r, -np.inf):
                            best[r] = bottleneck
                            heapq.heappush(heap, (-bottleneck, r))
            prominence = flat[p] - col
        if prominence > 0 and prominence >= min_prominence * span:
            count += 1
    return count


def test_two_peaks_with_a_known_saddle():
    m = torch.zeros(5, 7)
    m[2, 1] = 9.0  # main peak
    m[2, 5] = 6.0  # second peak
    m[2, 2:5] = torch.tensor([4.0, 3.0, 4.0])  # ridge: highest saddle 3 -> prominence 3
    # span 9: prominence 3 is 1/3 of it
    assert metrics.count_peaks(m, min_prominence=0.33).item() == 2
    assert metrics.count_peaks(m, min_prominence=0.34).item() == 1
    assert metrics.count_peaks(m, min_prominence=0.0).item() == 2
    expected = torch.zeros(5, 7, dtype=torch.bool)
    expected[2, 1] = expected[2, 5] = True
    assert torch.equal(metrics.peak_mask(m, min_prominence=0.33), expected)


def test_plateau_counts_once_and_u_shaped_plateau():
    m = torch.zeros(6, 6)
    m[1:3, 1:4] = 5.0  # a flat-topped peak
    assert metrics.count_peaks(m, min_prominence=0.0).item() == 1
    u = torch.zeros(5, 5)
    u[0:4, 0] = 2.0
    u[0:4, 4] = 2.0
    u[3, :] = 2.0  # a U of equal height: its arms start apart and meet at height 2
    assert metrics.count_peaks(u, min_prominence=0.0).item() == 1


def test_equal_peaks_lower_index_is_higher():
    m = torch.zeros(3, 5)
    m[1, 0] = 4.0
    m[1, 4] = 4.0
    m[1, 1:4] = 1.0  # a ridge at height 1 joins them; every other path crosses a 0
    # The first (lower flat index) is the global maximum, prominence 4; the second has
    # prominence 4 - 1 = 3: its highest saddle is on the ridge.
    assert metrics.count_peaks(m, min_prominence=0.75).item() == 2
    assert metrics.count_peaks(m, min_prominence=0.76).item() == 1


def test_constant_map_has_no_peaks_and_dead_map_too():
    assert metrics.count_peaks(torch.full((4, 4), 2.5)).item() == 0
    assert metrics.count_peaks(torch.zeros(7, 7)).item() == 0


def test_border_and_corner_peaks():
    m = torch.zeros(4, 4)
    m[0, 0] = 1.0
    m[3, 3] = 1.0
    m[0, 3] = 0.5
    assert metrics.count_peaks(m, min_prominence=0.0).item() == 3
    assert metrics.count_peaks(m, min_prominence=0.6).item() == 2


def test_connectivity_joins_diagonal_neighbours_only_with_8():
    m = torch.zeros(3, 3)
    m[0, 0] = 1.0
    m[1, 1] = 1.0
    assert metrics.count_peaks(m, min_prominence=0.0, connectivity=8).item() == 1
    assert metrics.count_peaks(m, min_prominence=0.0, connectivity=4).item() == 2
    with pytest.raises(ValueError, match="connectivity"):
        metrics.count_peaks(m, connectivity=6)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.int64, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=st.integers(0, 4)),
    st.sampled_from([0.0, 0.1, 0.3, 0.6]),
    st.sampled_from([4, 8]),
)
def test_count_peaks_matches_the_definition(values, min_prominence, connectivity):
    # small integer values make plateaus and ties frequent
    expected = brute_force_peaks(values.astype(np.float64), min_prominence, connectivity)
    got = metrics.count_peaks(values.astype(np.float32), min_prominence, connectivity)
    assert got.item() == expected


def test_count_peaks_batch_shape_and_numpy_input():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 3, 5, 6))
    counts = metrics.count_peaks(maps, 0.1)
    assert counts.shape == (2, 3) and counts.dtype == torch.int64
    for b in range(2):
        for c in range(3):
            assert counts[b, c].item() == brute_force_peaks(maps[b, c], 0.1, 8)
    assert metrics.activation_robustness(maps).item() == pytest.approx(counts.double().mean().item())


# ---------------------------------------------------------------- top activation, IoU, PEI


def test_top_activation_mask_keeps_the_top_tenth():
    maps = torch.arange(100.0).reshape(1, 1, 10, 10)
    top = metrics.top_activation_mask(maps, 10)  # same size: bilinear upsampling is identity
    # numpy's linear 0.9 quantile of 0..99 is 89.1, so 90..99 are kept
    assert top.sum().item() == 10
    assert top.flatten()[90:].all()


def test_top_activation_mask_matches_numpy_quantile_and_drops_zeros():
    rng = np.random.default_rng(1)
    maps = np.maximum(rng.normal(size=(2, 3, 7, 7)), 0).astype(np.float32)
    maps[0, 1] = 0  # a dead map keeps nothing
    top = metrics.top_activation_mask(maps, 7, fraction=0.2).numpy()
    for b in range(2):
        for c in range(3):
            threshold = np.quantile(maps[b, c], 0.8)
            np.testing.assert_array_equal(top[b, c], (maps[b, c] >= threshold) & (maps[b, c] > 0))
    assert not top[0, 1].any()


def test_top_activation_mask_upsamples_bilinearly():
    maps = torch.zeros(1, 1, 2, 2)
    maps[0, 0, 0, 0] = 1.0
    top = metrics.top_activation_mask(maps, 8, fraction=0.1)
    # align_corners=False: the 2x2 top-left block of the 8x8 upsample holds the value 1
    # exactly, then it falls off; the top 10% (6.4 pixels) are the pixels >= quantile.
    up = torch.nn.functional.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
    threshold = np.quantile(up.numpy().ravel(), 0.9)
    assert torch.equal(top[0, 0], up[0, 0] >= threshold)
    assert top[0, 0, :2, :2].all() and not top[0, 0, 4:, :].any()


def _block_map(rows: slice, cols: slice, size: int = 4) -> torch.Tensor:
    m = torch.zeros(size, size)
    m[rows, cols] = 10.0
    return m


def test_part_iou_and_pei_on_hand_drawn_masks():
    # Map: the top-left 2x2 block; fraction 0.25 of 16 pixels keeps exactly that block.
    maps = torch.stack([_block_map(slice(0, 2), slice(0, 2)), torch.zeros(4, 4)])[None]
    masks = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    masks[0, 0, 0, :] = True  # top row: intersection 2, union 4 + 4 - 2 = 6
    masks[0, 1, :2, :2] = True  # the same block: IoU 1
    # part 2 empty: union 4 for the live map (IoU 0) and empty for the dead map (IoU 0)
    iou = metrics.part_iou(maps, masks, fraction=0.25)
    expected = torch.tensor([[[2 / 6, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(iou, expected)
    pei = metrics.part_explainability(maps, masks, fraction=0.25)
    torch.testing.assert_close(pei, torch.tensor([(1.0 + 0.0) / 2]))


def test_part_iou_blocks_over_channels_agree(monkeypatch):
    rng = np.random.default_rng(2)
    maps = torch.from_numpy(np.maximum(rng.normal(size=(3, 5, 4, 4)), 0).astype(np.float32))
    masks = torch.from_numpy(rng.random((3, 7, 16, 16)) > 0.6)
    whole = metrics.part_iou(maps, masks)
    monkeypatch.setattr(metrics, "_IOU_BLOCK_ELEMENTS", 1)  # one channel per block
    torch.testing.assert_close(metrics.part_iou(maps, masks), whole)


def test_part_iou_rejects_mismatched_masks():
    with pytest.raises(ValueError, match="part_masks"):
        metrics.part_iou(torch.zeros(2, 3, 4, 4), torch.zeros(3, 7, 8, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="maps"):
        metrics.part_iou([[1.0]], torch.zeros(1, 7, 8, 8, dtype=torch.bool))


# ---------------------------------------------------------------- location consistency


def test_location_consistency_on_a_known_assignment():
    # Seven parts = rows 0..6 of an 8x8 image; a map lighting row k has IoU 1 with part k.
    parts, size, images = 7, 8, 4
    masks = torch.zeros(images, parts, size, size, dtype=torch.bool)
    for k in range(parts):
        masks[:, k, k, :] = True
    chosen = [
        [2, 2, 2, 2],  # channel 0: always the cheek row -> A = e_2
        [0, 1, 0, 1],  # channel 1: half and half
        [3, None, None, 5],  # channel 2: dead on two images (left out), then 3 and 5
        [None, None, None, None],  # channel 3: always dead (left out of the mean)
    ]
    maps = torch.zeros(images, len(chosen), size, size)
    for c, row in enumerate(chosen):
        for b, k in enumerate(row):
            if k is not None:
                maps[b, c, k, :] = 1.0
    iou = metrics.part_iou(maps, masks)
    assignment = metrics.part_assignment(iou)
    expected = torch.zeros(len(chosen), parts)
    expected[0, 2] = 1.0
    expected[1, 0] = expected[1, 1] = 0.5
    expected[2, 3] = expected[2, 5] = 0.5
    torch.testing.assert_close(assignment[:3], expected[:3])
    assert torch.isnan(assignment[3]).all()

    def spread(a):
        return sum((x - 1 / parts) ** 2 for x in a) / parts

    s0 = spread([0, 0, 1, 0, 0, 0, 0])
    s1 = spread([0.5, 0.5, 0, 0, 0, 0, 0])
    assert s0 == pytest.approx(6 / 49)  # the maximum (K - 1) / K^2
    value = metrics.location_consistency(maps, masks)
    assert value.item() == pytest.approx((s0 + s1 + s1) / 3, rel=1e-6)


# ---------------------------------------------------------------- dominant parts, coverage, entropy


def _row_parts(images: int, parts: int = 7, size: int = 8) -> torch.Tensor:
    """Part ``k`` is row ``k`` of an ``size x size`` image; the last row(s) belong to no part."""
    masks = torch.zeros(images, parts, size, size, dtype=torch.bool)
    for k in range(parts):
        masks[:, k, k, :] = True
    return masks


def _lit_rows(rows_per_image: list[list[list[int]]], size: int = 8) -> torch.Tensor:
    """Maps ``(B, C, size, size)``: map ``[b][c]`` is 1 on the listed rows, 0 elsewhere."""
    images, channels = len(rows_per_image), len(rows_per_image[0])
    maps = torch.zeros(images, channels, size, size)
    for b, row in enumerate(rows_per_image):
        for c, lit in enumerate(row):
            for r in lit:
                maps[b, c, r, :] = 1.0
    return maps


def test_dominant_parts_on_hand_built_channels():
    # fraction 0.25 keeps 16 of 64 pixels: a map lit on one row keeps that row (8 pixels,
    # the others are 0), a map lit on two rows keeps both.
    per_image = [
        # c0: part 4   c1: tie 3/4  c2: dead  c3: mean, not vote  c4: tie across images
        [[4], [3, 4], [], [1, 7], [5]],
        [[4], [3, 4], [], [1, 7], [1]],
        [[4], [3, 4], [], [1, 7], [5]],
        [[4], [3, 4], [], [2], [1]],
        [[4], [3, 4], [], [2], []],
    ]
    maps, masks = _lit_rows(per_image), _row_parts(len(per_image))
    # c1: IoU 8/16 with parts 3 and 4 on every image: the first. c3: part 1 on three images
    # with IoU 8/16 (mean 0.3), part 2 on two with IoU 1 (mean 0.4): the mean decides.
    # c4: parts 5 and 1 twice each with IoU 1, the fifth image dead: the first, 1.
    expected = torch.tensor([4, 3, -1, 2, 1])
    got = metrics.dominant_parts(maps, masks, fraction=0.25)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    iou = metrics.part_iou(maps, masks, fraction=0.25)
    assert torch.equal(metrics.dominant_parts_from_iou(iou), expected)
    assert torch.equal(metrics.dominant_parts(maps.numpy(), masks.numpy(), fraction=0.25), expected)


def test_coverage_and_entropy_tell_collapse_from_spread():
    parts = 7
    masks = _row_parts(3)
    collapse = _lit_rows([[[2]] * 5] * 3)  # five channels, all on the cheek row
    dominant = metrics.dominant_parts(collapse, masks)
    assert dominant.tolist() == [2] * 5
    assert metrics.part_coverage(dominant) == 1 and metrics.part_entropy(dominant) == 0.0

    spread = _lit_rows([[[k] for k in range(parts)] + [[]]] * 3)  # one channel per part, one dead
    dominant = metrics.dominant_parts(spread, masks)
    assert dominant.tolist() == list(range(parts)) + [-1]
    assert metrics.part_coverage(dominant) == parts
    assert metrics.part_entropy(dominant) == pytest.approx(np.log(parts), rel=1e-12)

    # Histogram 3, 1 over two parts (the -1 left out): entropy of (3/4, 1/4).
    dominant = torch.tensor([0, 0, -1, 6, 0])
    assert metrics.part_coverage(dominant) == 2
    assert metrics.part_entropy(dominant) == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert metrics.part_coverage(np.array([-1, -1])) == 0
    assert np.isnan(metrics.part_entropy(torch.tensor([-1, -1])))


def test_coverage_rejects_what_is_not_part_indices():
    with pytest.raises(TypeError, match="dominant"):
        metrics.part_coverage(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="dominant"):
        metrics.part_entropy(torch.tensor([0, -2]))
    with pytest.raises(ValueError, match="dominant"):
        metrics.part_coverage(torch.zeros(2, 3, dtype=torch.long))


# ---------------------------------------------------------------- dead maps


def test_dead_fraction_and_robustness_over_live_maps():
    maps = torch.zeros(2, 3, 5, 5)
    maps[0, 0, 2, 2] = 1.0  # one peak
    maps[0, 1, 0, 0] = maps[0, 1, 4, 4] = 1.0  # two peaks
    maps[1, 0] = -1.0  # maximum below 0: dead too (no ReLU in front, still no activation)
    maps[1, 1, 3, 1] = 1e-30  # alive: its maximum is above 0
    # maps[0, 2], maps[1, 2]: all zero
    assert metrics.dead_fraction(maps).item() == pytest.approx(3 / 6)
    assert metrics.dead_fraction(maps.numpy()).dtype == torch.float64
    counts = [1, 2, 0, 0, 1, 0]
    assert metrics.count_peaks(maps).flatten().tolist() == counts
    assert metrics.activation_robustness(maps).item() == pytest.approx(sum(counts) / 6)
    assert metrics.activation_robustness(maps, live_only=True).item() == pytest.approx((1 + 2 + 1) / 3)
    assert torch.isnan(metrics.activation_robustness(torch.zeros(1, 2, 3, 3), live_only=True))
    assert metrics.dead_fraction(torch.zeros(1, 2, 3, 3)).item() == 1.0


# ---------------------------------------------------------------- verification


def test_verification_accuracy_with_a_known_best_threshold():
    # 20 pairs, folds of 2. Same pairs at squared distance 0.2, different ones at 2.0,
    # except pair 0 (same, distance 3.0): it is wrong under every threshold that gets the
    # others right, so fold 0 scores 1/2 and the nine others 1.
    n = 20
    issame = np.array([True, False] * (n // 2))
    distance = np.where(issame, 0.2, 2.0)
    distance[0] = 3.0
    # unit vectors at angle theta have squared distance 2 - 2 cos(theta)
    theta = np.arccos(1 - distance / 2)
    emb1 = np.stack([np.ones(n), np.zeros(n)], 1) * 3.0  # scale: rows are normalised
    emb2 = np.stack([np.cos(theta), np.sin(theta)], 1)
    mean, std = metrics.verification_accuracy(emb1, emb2, issame, folds=10)
    fold_accuracies = [0.5] + [1.0] * 9
    assert mean == pytest.approx(np.mean(fold_accuracies))
    assert std == pytest.approx(np.std(fold_accuracies))


def insightface_accuracy(emb1, emb2, issame, folds):
    """InsightFace's calculate_roc accuracy loop, written out in NumPy (independent)."""
    emb1 = emb1 / np.linalg.norm(emb1, axis=1, keepdims=True)
    emb2 = emb2 / np.linalg.norm(emb2, axis=1, keepdims=True)
    dist = np.sum(np.square(emb1 - emb2), 1)
    thresholds = np.arange(0, 4, 0.01)
    n = len(issame)
    fold_sizes = np.full(folds, n // folds)
    fold_sizes[: n % folds] += 1
    edges = np.concatenate([[0], np.cumsum(fold_sizes)])
    accuracies = []
    for i in range(folds):
        test = np.arange(edges[i], edges[i + 1])
        train = np.setdiff1d(np.arange(n), test)
        train_acc = [np.mean(np.less(dist[train], t) == issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accuracies.append(np.mean(np.less(dist[test], best) == issame[test]))
    return np.mean(accuracies), np.std(accuracies)


def test_verification_accuracy_matches_insightface_loop():
    rng = np.random.default_rng(3)
    n = 103  # not a multiple of the folds
    issame = rng.random(n) < 0.5
    emb1 = rng.normal(size=(n, 8))
    emb2 = np.where(issame[:, None], emb1 + 0.8 * rng.normal(size=(n, 8)), rng.normal(size=(n, 8)))
    mean, std = metrics.verification_accuracy(torch.from_numpy(emb1), emb2, issame)
    expected_mean, expected_std = insightface_accuracy(emb1, emb2, issame, 10)
    assert mean == pytest.approx(expected_mean, abs=1e-12)
    assert std == pytest.approx(expected_std, abs=1e-12)


def test_verification_accuracy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="issame"):
        metrics.verification_accuracy(np.ones((4, 2)), np.ones((4, 2)), np.ones(5, bool))
