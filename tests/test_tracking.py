"""Size-fair tracking metrics, the nulls of PEI and location consistency, and the gradient
cosine of the full set against a subset (docs/design.md section 7), on planted channels and
hand-built cases; every expected value is computed here, independently of the metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ecloss_fast import metrics

from _numpy_ecloss import _templates, loss_and_grad

# ---------------------------------------------------------------- a planted world
#
# 40 images of 20 identities at 32 x 32, maps 8 x 8. Four disjoint parts drawn around a
# face centre jittered by up to 2 pixels: eyes (two discs), nose (a disc), mouth (a bar)
# and the face around them (a disc, less the others). Image 3 has no mouth.

SIZE, MAP, BATCH = 32, 8, 40
EYES, NOSE, MOUTH, FACE = range(4)


def _world():
    rng = np.random.default_rng(7)
    v, u = np.meshgrid(np.arange(SIZE), np.arange(SIZE))  # u: row, v: column
    masks = np.zeros((BATCH, 4, SIZE, SIZE), dtype=bool)
    centres = 16 + rng.integers(-2, 3, size=(BATCH, 2))
    for b, (cu, cv) in enumerate(centres):
        def disc(du, dv, r):
            return (u - cu - du) ** 2 + (v - cv - dv) ** 2 <= r * r
        masks[b, EYES] = disc(-5, -5, 2.5) | disc(-5, 5, 2.5)
        masks[b, NOSE] = disc(0, 0, 2.5)
        if b != 3:
            masks[b, MOUTH] = (abs(u - cu - 6) <= 1) & (abs(v - cv) <= 5)
        masks[b, FACE] = disc(0, 0, 11) & ~masks[b, :3].any(0)
    labels = torch.arange(BATCH) // 2
    return torch.from_numpy(masks), labels, centres


MASKS, LABELS, CENTRES = _world()


def _pooled(masks):
    """Each part's mask averaged over 4 x 4 blocks: the part seen at the maps' resolution."""
    return torch.from_numpy(masks.numpy().reshape(BATCH, -1, MAP, 4, MAP, 4).mean((3, 5)))


def _noise(scale, seed, channels=4):
    return scale * torch.from_numpy(np.random.default_rng(seed).random((BATCH, channels, MAP, MAP)))


def _cones_at_mean_places(radius=2.5):
    """One map per part, the same in every image: a cone at the part's mean place (one per
    eye), in the maps' frame."""
    maps = np.zeros((4, MAP, MAP))
    v, u = np.meshgrid(np.arange(MAP), np.arange(MAP))
    blobs = [(k, side) for k in range(4) for side in ((-1, 1) if k == EYES else (0,))]
    for k, side in blobs:
        places = []
        for b in range(BATCH):
            pixels = np.argwhere(MASKS[b, k].numpy())
            if side:  # the eye on this side of the face's centre
                pixels = pixels[np.sign(pixels[:, 1] - CENTRES[b, 1]) == side]
            if len(pixels):
                places.append(pixels.mean(0))
        cu, cv = (np.mean(places, 0) + 0.5) / 4 - 0.5  # pixel centres: image frame to maps'
        maps[k] = np.maximum(maps[k], 1 - np.hypot(u - cu, v - cv) / radius)
    return torch.from_numpy(np.broadcast_to(maps, (BATCH, 4, MAP, MAP)).copy())


# ---------------------------------------------------------------- area_matched_iou by hand


def _iou(kept: set, part: set) -> float:
    return len(kept & part) / len(kept | part)


def test_area_matched_iou_by_hand_at_the_maps_size():
    """S = h: the upsampling is the identity, so the kept pixels are the map's own."""
    maps = torch.tensor([[[[3., 1.], [2., 0.]],      # ranks 0, 2, 1; pixel 3 is not > 0
                          [[1., 1.], [1., 1.]],      # all tied: the lower flat index first
                          [[0., 0.], [0., 0.]],      # dead: keeps nothing
                          [[-1., 5.], [-2., 0.]]]])  # one positive pixel only
    masks = torch.tensor([[[[1, 0], [0, 1]],         # {0, 3}
                           [[0, 1], [0, 1]],         # {1, 3}
                           [[1, 1], [1, 0]],         # {0, 1, 2}
                           [[0, 0], [0, 0]]]], dtype=torch.bool)  # empty
    parts = [{0, 3}, {1, 3}, {0, 1, 2}]
    kept = [[{0, 2}, {0, 2}, {0, 1, 2}],
            [{0, 1}, {0, 1}, {0, 1, 2}],
            [set(), set(), set()],
            [{1}, {1}, {1}]]
    got = metrics.area_matched_iou(maps, masks)
    assert got.shape == (1, 4, 4) and got.dtype == torch.float32
    for c in range(4):
        for k in range(3):
            assert got[0, c, k].item() == pytest.approx(_iou(kept[c][k], parts[k]), abs=1e-7), (c, k)
        assert got[0, c, 3].isnan()  # an empty part: nothing to match


def test_area_matched_iou_breaks_ties_after_upsampling_by_flat_index():
    """A constant map stays constant at any size: its top-n pixels are the first n."""
    maps = torch.full((1, 1, 2, 2), 0.5)
    masks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    masks[0, 0, 3, :] = True                 # 4 pixels, the last row: kept {0..3}, IoU 0
    masks[0, 1].view(-1)[[0, 1, 2, 5, 6]] = True  # kept {0..4}: 3 shared of 7
    got = metrics.area_matched_iou(maps, masks)[0, 0]
    assert got[0].item() == 0 and got[1].item() == pytest.approx(3 / 7)


def _bilinear(x, size):
    """torch's bilinear upsampling with align_corners=False, in float64 NumPy."""
    h = x.shape[0]
    src = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, None)
    low = np.minimum(np.floor(src).astype(int), h - 1)
    high = np.minimum(low + 1, h - 1)
    frac = src - low
    rows = x[low] * (1 - frac)[:, None] + x[high] * frac[:, None]
    return rows[:, low] * (1 - frac)[None] + rows[:, high] * frac[None]


def test_area_matched_iou_against_a_brute_force_on_random_maps():
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(3, 5, 3, 3)) - 0.3  # some pixels not positive; no two alike
    masks = rng.random((3, 4, 7, 7)) < [[[[0.05]], [[0.2]], [[0.5]], [[0.9]]]]
    got = metrics.area_matched_iou(torch.from_numpy(maps), torch.from_numpy(masks))
    for b in range(3):
        for c in range(5):
            up = _bilinear(maps[b, c], 7).ravel()
            order = sorted(range(49), key=lambda p: (-up[p], p))
            positive = [p for p in order if up[p] > 0]
            for k in range(4):
                part = set(np.flatnonzero(masks[b, k]))
                expected = _iou(set(positive[:len(part)]), part)
                assert got[b, c, k].item() == pytest.approx(expected, abs=1e-7), (b, c, k)


def test_area_matched_iou_rejects_bad_masks():
    maps = torch.rand(2, 3, 4, 4)
    with pytest.raises(TypeError, match="masks must be booleans"):
        metrics.area_matched_iou(maps, torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"masks must be \(B=2, K, S, S\)"):
        metrics.area_matched_iou(maps, torch.ones(3, 1, 8, 8, dtype=torch.bool))


# ---------------------------------------------------------------- pairing


def test_other_identity_partners():
    assert metrics.other_identity_partners(torch.tensor([0, 0, 1, 1])).tolist() == [2, 3, 0, 1]
    assert metrics.other_identity_partners(None, 3).tolist() == [1, 2, 0]
    labels = torch.tensor([5, 1, 5, 2, 1, 5])  # sorted: 1 1 2 5 5 5 (images 1 4 3 0 2 5)
    assert metrics.other_identity_partners(labels).tolist() == [1, 0, 4, 5, 2, 3]
    partner = metrics.other_identity_partners(LABELS)
    assert sorted(partner.tolist()) == list(range(BATCH))
    assert (LABELS[partner] != LABELS).all()
    with pytest.raises(ValueError, match="an identity holds 3 of the 5 images"):
        metrics.other_identity_partners(torch.tensor([0, 0, 0, 1, 2]))
    with pytest.raises(TypeError, match="labels must hold integer"):
        metrics.other_identity_partners(torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------- planted channels


def test_pooled_masks_with_noise_track_their_own_part_only():
    maps = _pooled(MASKS) + _noise(0.05, seed=1)
    gain = metrics.normalized_tracking_gain(maps, MASKS, LABELS)
    assert gain.shape == (4, 4) and gain.dtype == torch.float64
    for k in range(4):
        assert gain[k, k].item() == pytest.approx(1, abs=0.1), k
        for j in range(3):
            if j != k:
                assert abs(gain[k, j].item()) < 0.1, (k, j)
    # The face surrounds the eyes and the mouth: their maps, blurred at the maps' resolution,
    # spill onto the face around them in their own image only, a small gain there.
    assert (gain[:3, FACE].abs() < 0.25).all()


def test_a_fixed_prior_at_the_parts_mean_places_scores_zero_and_is_not_confident():
    cones = _cones_at_mean_places()
    # It is a good spatial prior: the cone of each part overlaps that part on every image.
    overlap = metrics.area_matched_iou(cones, MASKS).diagonal(dim1=1, dim2=2)
    assert (overlap[~overlap.isnan()] > 0).all()
    assert metrics.tracking_gain(cones, MASKS, LABELS).abs().max().item() < 1e-12
    tracking = metrics.channel_tracking(cones, MASKS, LABELS, permutations=50)
    assert tracking.gain.abs().max().item() < 1e-12
    assert not tracking.confident.any()
    # With noise of its own in every image, still about 0.
    noisy = metrics.normalized_tracking_gain(cones + _noise(0.1, seed=2), MASKS, LABELS)
    assert noisy.abs().max().item() < 0.1


def test_a_channel_planted_on_the_eyes_is_assigned_to_the_eyes():
    pooled = _pooled(MASKS)
    eyes = pooled[:, EYES:EYES + 1] + _noise(0.2, seed=3, channels=1)
    shuffled = eyes[torch.randperm(BATCH, generator=torch.Generator().manual_seed(0))]
    maps = torch.cat([eyes, shuffled, _cones_at_mean_places()[:, :1]], dim=1)
    tracking = metrics.channel_tracking(maps, MASKS, LABELS, permutations=100, seed=1)
    assert tracking.preferred[0].item() == EYES
    assert tracking.confident[0] and not tracking.confident[2]
    assert tracking.gain[1].abs().max() < 0.15  # another image's eyes: no tracking
    assert tracking.purity[0].item() > 0.75  # some gain on the face around the eyes
    assert tracking.gain[0, EYES] > tracking.null_threshold[0] > 0
    assert tracking.localized_gain.shape == (4,) and (tracking.localized_gain > 0).all()


def test_channels_that_track_nothing_are_rarely_confident():
    """60 channels, each the eyes of the images in another order, plus noise: their
    confident count is the null's false positives, 3 expected (10 or more: about 0.1%)."""
    rng = np.random.default_rng(4)
    pooled = _pooled(MASKS)[:, EYES]
    maps = torch.stack([pooled[torch.from_numpy(rng.permutation(BATCH))] for _ in range(60)], 1)
    tracking = metrics.channel_tracking(maps + _noise(0.2, seed=5, channels=60), MASKS, LABELS,
                                        permutations=100, seed=2)
    assert tracking.confident.sum().item() <= 9
    # The mean normalised gain has no selection in it: about 0 here.
    assert abs(metrics.run_tracking_summary(tracking).mean_normalized_gain) < 0.03


def test_channel_tracking_by_hand_on_a_constructed_result():
    gain = torch.tensor([[0.6, 0.2, -0.4], [0.1, 0.1, 0.0], [float("nan")] * 3, [-0.1, -0.2, -0.3]],
                        dtype=torch.float64)
    tracking = metrics.ChannelTracking(
        gain=gain, preferred=torch.tensor([0, 0, -1, 0]),
        purity=torch.tensor([0.75, 0.5, float("nan"), float("nan")], dtype=torch.float64),
        null_threshold=torch.tensor([0.3, 0.05, 0.1, 0.0], dtype=torch.float64),
        confident=torch.tensor([True, True, False, False]), localized_gain=torch.ones(3))
    summary = metrics.run_tracking_summary(tracking)
    assert summary.confident_fraction == 0.5
    assert summary.confident_parts == 1
    assert summary.mean_gain.tolist() == pytest.approx([0.2, 0.1 / 3, -0.7 / 3])
    assert summary.mean_normalized_gain == pytest.approx((0.6 - 0.6) / 9)


def test_channel_tracking_preferred_part_and_purity_by_hand():
    """Two images whose masks are two halves; a channel bright on the left half of its own
    image: a gain on that part, a loss on the other."""
    masks = torch.zeros(4, 2, 4, 4, dtype=torch.bool)
    masks[:2, 0, :, :2] = masks[:2, 1, :, 2:] = True  # images 0, 1: part 0 left
    masks[2:, 0, :, 2:] = masks[2:, 1, :, :2] = True  # images 2, 3: part 0 right
    # Channel 0 follows part 0; channel 1 is the same in every image.
    maps = torch.cat([masks[:, :1].double(), torch.ones(4, 1, 4, 4, dtype=torch.float64)], dim=1)
    tracking = metrics.channel_tracking(maps, masks, permutations=20)
    # Channel 0 keeps part 0's pixels: IoU 1 with part 0 and 0 with part 1 on its own image;
    # its partner (the next image) has the other layout every other time: 1/2 and 1/2.
    # Part 1's mask seen at the maps' size does the same on part 1: gains 1/2 and 1/2.
    assert tracking.gain[0].tolist() == pytest.approx([1.0, -1.0])
    assert tracking.gain[1].tolist() == [0.0, 0.0]
    assert tracking.localized_gain.tolist() == pytest.approx([0.5, 0.5])
    assert tracking.preferred.tolist() == [0, 0]  # ties: the first part
    assert tracking.purity[0].item() == 1.0 and tracking.purity[1].isnan()


def test_channel_tracking_rejects_bad_arguments():
    maps, masks = torch.rand(4, 2, 2, 2), torch.ones(4, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="permutations"):
        metrics.channel_tracking(maps, masks, permutations=0)
    with pytest.raises(ValueError, match="level"):
        metrics.channel_tracking(maps, masks, level=1.0)
    with pytest.raises(TypeError, match="ChannelTracking"):
        metrics.run_tracking_summary({"gain": None})


# ---------------------------------------------------------------- erasure


def test_erasure_sensitivity_by_hand():
    maps = torch.zeros(2, 3, 2, 2)
    maps[:, 0] = 1.0            # sum 8
    maps[0, 1, 0, 0] = 4.0      # sum 4
    erased = maps.expand(2, 2, 3, 2, 2).clone()  # part 0 erased, part 1 erased
    erased[0, :, 0] = 0.5       # channel 0 halves without part 0
    erased[1, 0, 1, 0, 0] = 5.0  # channel 1 rises without part 1
    drop = metrics.erasure_sensitivity(maps, erased)
    assert drop.shape == (3, 2) and drop.dtype == torch.float64
    assert drop[0].tolist() == [0.5, 0.0]
    assert drop[1].tolist() == [0.0, -0.25]
    assert drop[2].isnan().all()  # dead on every image
    torch.testing.assert_close(metrics.erasure_sensitivity(maps, list(erased)), drop, equal_nan=True)
    with pytest.raises(ValueError, match="erased_maps must be"):
        metrics.erasure_sensitivity(maps, erased[:, :1])


# ---------------------------------------------------------------- nulls of PEI and LS


def test_mismatched_masks_are_another_identitys():
    got = metrics.mismatched_masks(MASKS, LABELS)
    # Two images per identity, sorted already: the partner is two positions on.
    partner = [(b + 2) % BATCH for b in range(BATCH)]
    assert torch.equal(got, MASKS[partner])


def test_fixed_cones_are_the_positive_one_peak_templates():
    cones = metrics.fixed_cones(3, 4, radius=2.0)
    expected = np.maximum(_templates(3, 4, radius=2.0)[:12], 0).reshape(12, 3, 4)
    assert cones.shape == (12, 3, 4)
    np.testing.assert_allclose(cones.numpy(), expected, atol=1e-7)


def _numpy_top(up, fraction):
    threshold = np.quantile(up, 1 - fraction)
    return (up >= threshold) & (up > 0)


def test_best_fixed_cone_by_brute_force():
    rng = np.random.default_rng(5)
    masks = rng.random((3, 2, 5, 5)) < 0.3
    got = metrics.best_fixed_cone(torch.from_numpy(masks), 5, fraction=0.2, radius=2.0)
    v, u = np.meshgrid(np.arange(5), np.arange(5))
    pei, consistency = [], []
    for peak in range(25):
        i, j = divmod(peak, 5)
        top = _numpy_top(np.maximum(1 - np.hypot(u - i, v - j) / 2.0, 0), 0.2)
        iou = np.array([[(top & m).sum() / max((top | m).sum(), 1) for m in image] for image in masks])
        pei.append(iou.max(1).mean())
        counted = iou.max(1) > 0
        share = np.bincount(iou.argmax(1)[counted], minlength=2) / max(counted.sum(), 1)
        consistency.append(((share - 0.5) ** 2).mean() if counted.any() else -np.inf)
    assert got["pei"] == pytest.approx(max(pei), abs=1e-6)
    assert got["pei_peak"] == int(np.argmax(pei))
    assert got["location_consistency"] == pytest.approx(max(consistency), abs=1e-6)
    assert got["location_consistency_peak"] == int(np.argmax(consistency))


# ---------------------------------------------------------------- full set vs subset


def test_subset_gradient_cosine_of_the_same_set_is_one():
    maps = torch.rand(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    total = 9 + 36 + 1
    assert metrics.subset_gradient_cosine(maps, tau=2.0, subset=total).item() == pytest.approx(1, abs=1e-12)
    every = torch.from_numpy(_templates(3, 3)).reshape(total, 3, 3)
    assert metrics.subset_gradient_cosine(maps, tau=2.0, subset=every).item() == pytest.approx(1, abs=1e-12)


@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
def test_subset_gradient_cosine_against_float64_numpy(estimator):
    rng = np.random.default_rng(11)
    maps = rng.random((4, 3, 3, 3))
    full = _templates(3, 3)
    subset = full[np.round(np.linspace(0, len(full) - 1, 10)).astype(int)]
    _, grad_full = loss_and_grad(maps, tau=3.0, estimator=estimator)
    _, grad_subset = loss_and_grad(maps, tau=3.0, estimator=estimator, templates=subset)
    expected = (grad_full * grad_subset).sum() / np.linalg.norm(grad_full) / np.linalg.norm(grad_subset)
    assert expected < 0.99  # a case where the two sets differ
    x = torch.from_numpy(maps).requires_grad_(True)
    got = metrics.subset_gradient_cosine(x, tau=3.0, subset=10, estimator=estimator)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(expected, abs=1e-10)
    assert x.grad is None  # a diagnostic: nothing flows back


def test_subset_gradient_cosine_rejects_integer_maps():
    with pytest.raises(TypeError, match="maps must be a floating tensor"):
        metrics.subset_gradient_cosine(torch.ones(1, 1, 3, 3, dtype=torch.long), tau=1.0)
