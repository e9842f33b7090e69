"""Explainability metrics of the paper's section 5, made exact in docs/design.md section 7.

Every function takes PyTorch tensors or NumPy arrays and returns PyTorch tensors on the
input's device (NumPy input: CPU). ``maps`` are post-ReLU feature maps ``(B, C, h, w)`` of
the target layer; part masks are booleans ``(B, K, S, S)`` at the input resolution ``S``,
for the parts in :data:`PARTS` order (``landmarks_to_part_masks`` builds them).

- :func:`top_activation_mask`: the top-``fraction`` area of each upsampled map (Eq. 8-9).
- :func:`part_iou`, :func:`part_explainability`: IoU with each part and PEI (Eq. 10).
- :func:`part_assignment`, :func:`channel_consistency`, :func:`location_consistency`: the
  matrix ``A[c, k]``, ``S[c]`` and ``LS``.
- :func:`dominant_parts`, :func:`part_coverage`, :func:`part_entropy`: which part each
  channel settled on, and how many parts the channels cover (collapse or specialisation).
- :func:`peak_mask`, :func:`count_peaks`, :func:`activation_robustness`: peaks by
  topographic prominence; :func:`live_maps`, :func:`dead_fraction`: maps that the ReLU zeroed.
- :func:`verification_accuracy`: InsightFace's 10-fold verification protocol.
- :func:`mismatched_masks`, :func:`best_fixed_cone` (:func:`fixed_cones`): the two nulls
  that PEI and location consistency are reported beside.
- :func:`area_matched_iou`, :func:`tracking_gain`, :func:`normalized_tracking_gain`,
  :func:`channel_tracking`, :func:`run_tracking_summary`: size-fair tracking of parts,
  against another identity's faces (:func:`other_identity_partners`) and an
  image-shuffled null; :func:`erasure_sensitivity`: its causal check.
- :func:`subset_gradient_cosine`: the full template set's gradient against a subset's.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ecloss_fast.parts import PARTS, landmarks_to_part_masks

__all__ = [
    "PARTS",
    "landmarks_to_part_masks",
    "top_activation_mask",
    "part_iou",
    "part_explainability",
    "part_assignment",
    "channel_consistency",
    "location_consistency",
    "dominant_parts",
    "dominant_parts_from_iou",
    "part_coverage",
    "part_entropy",
    "peak_mask",
    "count_peaks",
    "activation_robustness",
    "live_maps",
    "dead_fraction",
    "verification_accuracy",
    "mismatched_masks",
    "fixed_cones",
    "best_fixed_cone",
    "area_matched_iou",
    "other_identity_partners",
    "tracking_gain",
    "normalized_tracking_gain",
    "ChannelTracking",
    "channel_tracking",
    "TrackingSummary",
    "run_tracking_summary",
    "erasure_sensitivity",
    "subset_gradient_cosine",
]

# part_iou upsamples maps a block of channels at a time: the (B, C, S, S) masks of a
# VGG16 batch (100 x 512 x 224 x 224) would take 2.6 GB as booleans, 10 GB as floats.
_IOU_BLOCK_ELEMENTS = 1 << 25


def _as_tensor(value, name: str, ndim: int | None = None) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def _check_maps(maps) -> torch.Tensor:
    maps = _as_tensor(maps, "maps", 4)
    if not (maps.is_floating_point() or maps.dtype in (torch.uint8, torch.int32, torch.int64)):
        raise TypeError(f"maps must be real-valued, got dtype {maps.dtype}")
    return maps if maps.is_floating_point() else maps.float()


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")


def _top_mask(maps: torch.Tensor, size: int, fraction: float) -> torch.Tensor:
    up = F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)
    flat = up.flatten(2)
    # The (1 - fraction) quantile with linear interpolation between order statistics, as
    # numpy.quantile's default; torch.quantile refuses inputs above 2**24 elements.
    position = (1 - fraction) * (flat.shape[-1] - 1)
    below, weight = int(position), position - int(position)
    ordered = flat.sort(dim=-1).values
    upper = ordered[..., min(below + 1, flat.shape[-1] - 1)]
    threshold = ordered[..., below] + weight * (upper - ordered[..., below])
    keep = (flat >= threshold.unsqueeze(-1)) & (flat > 0)
    return keep.view_as(up)


def top_activation_mask(maps, size: int, fraction: float = 0.1) -> torch.Tensor:
    """The top-``fraction`` activation area of every map: booleans ``(B, C, size, size)``.

    Each map ``(h, w)`` is upsampled bilinearly (``align_corners=False``) to
    ``size x size``; pixel ``(i, j)`` is kept when ``up[i, j] >= quantile(up, 1 - fraction)``
    (the map's own quantile, linear interpolation as ``numpy.quantile``) and ``up[i, j] > 0``,
    so a dead (all-zero) map keeps nothing. This is the paper's Eq. 8-9 per map.
    """
    maps = _check_maps(maps)
    _check_fraction(fraction)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return _top_mask(maps, size, fraction)


def part_iou(maps, part_masks, fraction: float = 0.1) -> torch.Tensor:
    """``IoU[b, c, k] = |A[b, c] & M[b, k]| / |A[b, c] | M[b, k]|`` (0 where the union is empty).

    ``A[b, c] = top_activation_mask(maps, S, fraction)[b, c]`` and ``M = part_masks``
    ``(B, K, S, S)``. Returns float32 ``(B, C, K)``. Channels are processed in blocks, so
    memory stays bounded for VGG16 at 224 x 224.
    """
    maps = _check_maps(maps)
    part_masks = _as_tensor(part_masks, "part_masks", 4).to(maps.device)
    _check_fraction(fraction)
    batch, channels = maps.shape[:2]
    if part_masks.shape[0] != batch or part_masks.shape[2] != part_masks.shape[3]:
        raise ValueError(
            f"part_masks must be (B={batch}, K, S, S), got shape {tuple(part_masks.shape)}"
        )
    size = part_masks.shape[-1]
    parts = part_masks.flatten(2).float()  # (B, K, S*S)
    part_area = parts.sum(-1)  # (B, K)
    block = max(1, _IOU_BLOCK_ELEMENTS // max(1, batch * size * size))
    iou = []
    for start in range(0, channels, block):
        top = _top_mask(maps[:, start:start + block], size, fraction).flatten(2).float()
        intersection = torch.bmm(top, parts.transpose(1, 2))  # (B, c, K)
        union = top.sum(-1, keepdim=True) + part_area.unsqueeze(1) - intersection
        iou.append(torch.where(union > 0, intersection / union.clamp_min(1), 0.0))
    return torch.cat(iou, dim=1)


def part_explainability(maps, part_masks, fraction: float = 0.1) -> torch.Tensor:
    """The part explainability index per image, ``PEI[b] = mean_c max_k IoU[b, c, k]`` (Eq. 10).

    Returns ``(B,)``; the paper's Table 2 reports its mean over images.
    """
    return part_iou(maps, part_masks, fraction).amax(-1).mean(-1)


def part_assignment(iou) -> torch.Tensor:
    """``A[c, k]``: the fraction of images whose best part for channel ``c`` is ``k``.

    ``iou`` is ``part_iou``'s ``(B, C, K)``. The best part of an image is
    ``argmax_k IoU[b, c, k]`` (the first on ties); images whose IoUs with every part are 0
    are left out. A channel with no such image has a row of NaN. Returns float32 ``(C, K)``.
    """
    iou = _as_tensor(iou, "iou", 3)
    parts = iou.shape[-1]
    counted = iou.amax(-1) > 0  # (B, C)
    best = F.one_hot(iou.argmax(-1), parts).float() * counted.unsqueeze(-1)
    return best.sum(0) / counted.sum(0).unsqueeze(-1).float()


def channel_consistency(assignment) -> torch.Tensor:
    """``S[c] = (1/K) sum_k (A[c, k] - 1/K)^2`` for :func:`part_assignment`'s ``A`` ``(C, K)``.

    The variance of a channel's part distribution: 0 when it spreads evenly over the
    parts, ``(K - 1) / K^2`` when it always picks the same part. NaN rows stay NaN.
    """
    assignment = _as_tensor(assignment, "assignment", 2)
    return ((assignment - 1.0 / assignment.shape[-1]) ** 2).mean(-1)


def location_consistency(maps, part_masks, fraction: float = 0.1) -> torch.Tensor:
    """Location consistency ``LS = mean_c S[c]``, ``S[c] = (1/K) sum_k (A[c, k] - 1/K)^2``.

    ``A`` is :func:`part_assignment` of :func:`part_iou`, ``S`` is
    :func:`channel_consistency`. Channels whose top area never meets a part (a NaN row of
    ``A``) are left out of the mean; NaN when all are. The value lies in
    ``[0, (K - 1) / K^2]``: 0.1224 for seven parts when every channel always picks one part.
    Returns a 0-d float32 tensor.
    """
    return channel_consistency(part_assignment(part_iou(maps, part_masks, fraction))).nanmean()


def dominant_parts_from_iou(iou) -> torch.Tensor:
    """Per channel, ``argmax_k mean_b IoU[b, c, k]`` (the first on ties), ``-1`` when that mean
    is 0 for every part; ``iou`` is :func:`part_iou`'s ``(B, C, K)``. Returns int64 ``(C,)``."""
    iou = _as_tensor(iou, "iou", 3)
    mean = iou.double().mean(0)
    return torch.where(mean.amax(-1) > 0, mean.argmax(-1), -1)  # argmax: the first maximum


def dominant_parts(maps, part_masks, fraction: float = 0.1) -> torch.Tensor:
    """The part each channel settled on: ``argmax_k mean_b IoU[b, c, k]``, or ``-1``.

    ``IoU`` is :func:`part_iou`'s; ties go to the first part in ``PARTS`` order; a channel
    whose top area never meets any part gets ``-1``. Returns int64 ``(C,)``.
    """
    return dominant_parts_from_iou(part_iou(maps, part_masks, fraction))


def _with_parts(dominant) -> torch.Tensor:
    """The entries of :func:`dominant_parts`' ``(C,)`` that name a part (checked), no ``-1``."""
    dominant = _as_tensor(dominant, "dominant", 1)
    if dominant.dtype.is_floating_point or dominant.dtype == torch.bool or dominant.dtype.is_complex:
        raise TypeError(f"dominant must hold integer part indices, got dtype {dominant.dtype}")
    if (dominant < -1).any():
        raise ValueError("dominant holds part indices >= 0 and -1 for no part; got "
                         f"{int(dominant.min())}")
    return dominant[dominant >= 0]


def part_coverage(dominant) -> int:
    """How many distinct parts the channels settled on (:func:`dominant_parts`' ``(C,)``).

    Channels with no part (``-1``) are left out. 1 means every channel chose the same part
    (collapse); ``K`` that every part has a channel.
    """
    return int(_with_parts(dominant).unique().numel())


def part_entropy(dominant) -> float:
    """Entropy (nats) of the histogram over channels of their dominant parts.

    ``dominant`` is :func:`dominant_parts`' ``(C,)``; channels with no part (``-1``) are left
    out; NaN when no channel has a part. 0 when every channel chose the same part, ``log K``
    when the channels spread evenly over ``K`` parts.
    """
    counts = _with_parts(dominant).unique(return_counts=True)[1].double()
    if counts.numel() == 0:
        return float("nan")
    share = counts / counts.sum()
    return float(-(share * share.log()).sum())


def _neighbour_table(height: int, width: int, connectivity: int, device) -> torch.Tensor:
    """``(P, n)`` flat indices of each pixel's neighbours; ``P`` (a sentinel) off the map."""
    if connectivity == 4:
        offsets = [(-1, 0), (0, -1), (0, 1), (1, 0)]
    elif connectivity == 8:
        offsets = [(du, dv) for du in (-1, 0, 1) for dv in (-1, 0, 1) if (du, dv) != (0, 0)]
    else:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    u = torch.arange(height, device=device).repeat_interleave(width)
    v = torch.arange(width, device=device).repeat(height)
    columns = []
    for du, dv in offsets:
        nu, nv = u + du, v + dv
        inside = (nu >= 0) & (nu < height) & (nv >= 0) & (nv < width)
        columns.append(torch.where(inside, nu * width + nv, height * width))
    return torch.stack(columns, dim=1)


def _prominences(values: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Topographic prominence of every peak of each row of ``values`` ``(M, h, w)``.

    Returns float64 ``(M, h*w)``: the prominence at each peak's pixel, NaN elsewhere.

    Union-find over pixels in decreasing order of ``(value, -flat index)``, all ``M`` maps
    in lock-step (step ``t`` adds the ``t``-th highest pixel of every map). A pixel with no
    processed neighbour starts a component and is its peak. A pixel touching several
    components joins the one whose peak ranks highest; each other component's peak dies
    there with prominence ``peak - value(pixel)`` (that pixel is its highest saddle on a
    path to higher ground). The last survivor, the global maximum, gets ``max - min``.
    Roots are identified by their peak's rank, so comparing roots is comparing ranks.
    """
    rows, height, width = values.shape
    pixels = height * width
    device = values.device
    flat = values.reshape(rows, pixels).double()
    sentinel = pixels  # column P: every off-map neighbour; never processed, its own root
    order = flat.sort(dim=1, descending=True, stable=True).indices  # ties: lower index first
    rank = torch.empty(rows, pixels + 1, dtype=torch.long, device=device)
    rank.scatter_(1, order, torch.arange(pixels, device=device).expand(rows, pixels))
    rank[:, sentinel] = pixels
    parent = torch.arange(pixels + 1, device=device).repeat(rows, 1)
    prominence = torch.full((rows, pixels + 1), float("nan"), dtype=torch.float64, device=device)
    height_of = torch.cat([flat, flat.new_zeros(rows, 1)], dim=1)
    neighbours = _neighbour_table(height, width, connectivity, device)

    for step in range(pixels):
        pixel = order[:, step]  # (M,)
        near = neighbours[pixel]  # (M, n)
        roots = near
        while True:  # find, with the queried nodes compressed onto their roots below
            up = parent.gather(1, roots)
            if torch.equal(up, roots):
                break
            roots = up
        parent.scatter_(1, near, roots)
        root_rank = rank.gather(1, roots)
        joined = rank.gather(1, near) < step  # neighbours already processed
        root_rank = torch.where(joined, root_rank, pixels)
        best_rank, best = root_rank.min(dim=1)
        survivor = roots.gather(1, best.unsqueeze(1))  # (M, 1)
        dying = joined & (roots != survivor)
        saddle = height_of.gather(1, pixel.unsqueeze(1))
        target = torch.where(dying, roots, sentinel)
        prominence.scatter_(1, target, height_of.gather(1, target) - saddle)
        parent.scatter_(1, target, survivor.expand_as(target))
        parent[:, sentinel] = sentinel
        has_neighbour = best_rank < pixels
        parent.scatter_(1, pixel.unsqueeze(1),
                        torch.where(has_neighbour.unsqueeze(1), survivor, pixel.unsqueeze(1)))

    top = order[:, :1]
    prominence.scatter_(1, top, (flat.amax(1) - flat.amin(1)).unsqueeze(1))
    return prominence[:, :pixels]


def peak_mask(maps, min_prominence: float = 0.1, connectivity: int = 8) -> torch.Tensor:
    """Where the peaks that :func:`count_peaks` counts are: booleans of the shape of ``maps``.

    ``maps`` is ``(..., h, w)``. Each counted peak marks one pixel: for a plateau, its
    lowest flat index. See :func:`count_peaks` for the definition.
    """
    values = _as_tensor(maps, "maps")
    if values.dim() < 2:
        raise ValueError(f"maps must have at least 2 dimensions (h, w), got shape {tuple(values.shape)}")
    if not min_prominence >= 0:
        raise ValueError(f"min_prominence must be non-negative, got {min_prominence}")
    shape = values.shape
    if values.numel() == 0:
        return torch.zeros(shape, dtype=torch.bool, device=values.device)
    values = values.reshape(-1, *shape[-2:]).double()
    prominence = _prominences(values, connectivity)
    span = (values.amax((1, 2)) - values.amin((1, 2))).unsqueeze(1)
    return ((prominence >= min_prominence * span) & (prominence > 0)).reshape(shape)


def count_peaks(map2d, min_prominence: float = 0.1, connectivity: int = 8) -> torch.Tensor:
    """The number of peaks of a map whose topographic prominence is large enough.

    ``map2d`` is ``(h, w)`` or a batch ``(..., h, w)``; returns int64 of the batch shape
    (0-d for one map). A peak counts when its prominence is at least
    ``min_prominence * (max - min)`` of its own map and strictly positive. The prominence
    of a peak is its height minus the highest saddle on a path (``connectivity`` 4 or 8) to
    strictly higher ground; the global maximum's is ``max - min``. A plateau is one peak;
    between distinct peaks of equal height the one with the lower flat index counts as
    higher. A constant map has 0 peaks. Exact (union-find), see ``_prominences``.
    """
    map2d = _as_tensor(map2d, "map2d")
    if map2d.dim() < 2:
        raise ValueError(f"map2d must have at least 2 dimensions (h, w), got shape {tuple(map2d.shape)}")
    return peak_mask(map2d, min_prominence, connectivity).sum((-2, -1))


def activation_robustness(maps, live_only: bool = False, **count_peaks_kwargs) -> torch.Tensor:
    """The mean number of peaks per map over all ``(B, C)`` maps (paper's Table 5).

    A dead map (see :func:`dead_fraction`) has 0 peaks, so a network with many dead maps
    scores well here without any map being clean; ``live_only=True`` takes the mean over
    the live maps only (NaN when every map is dead). Other keyword arguments go to
    :func:`count_peaks`. Returns a 0-d float64 tensor.
    """
    maps = _check_maps(maps)
    counts = count_peaks(maps, **count_peaks_kwargs).double()
    if live_only:
        return counts[live_maps(maps)].mean()
    return counts.mean()


def live_maps(maps) -> torch.Tensor:
    """Booleans ``(B, C)``: whether each map's maximum is above 0 (not dead after the ReLU).

    A map holding NaN is not dead: it is not known to be at most 0.
    """
    return ~(_check_maps(maps).flatten(2) <= 0).all(-1)


def dead_fraction(maps) -> torch.Tensor:
    """The fraction of the ``(B, C)`` maps whose maximum is at most 0: dead after the ReLU.

    Returns a 0-d float64 tensor.
    """
    return (~live_maps(maps)).double().mean()


def _kfold_slices(n: int, folds: int) -> list[slice]:
    """Contiguous folds as ``sklearn.model_selection.KFold(folds, shuffle=False)``."""
    sizes = [n // folds + (1 if i < n % folds else 0) for i in range(folds)]
    bounds = np.cumsum([0] + sizes)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def verification_accuracy(emb1, emb2, issame, folds: int = 10) -> tuple[float, float]:
    """Face verification accuracy by InsightFace's protocol: ``(mean, std)`` over folds.

    Rows of ``emb1`` and ``emb2`` ``(n, d)`` are L2-normalised; the distance of pair ``i``
    is ``||e1_i - e2_i||^2``; a pair is predicted "same" when its distance is below the
    threshold. Thresholds are ``0, 0.01, ..., 3.99``. The pairs are cut into ``folds``
    contiguous folds (sizes as ``KFold(shuffle=False)``); each fold is scored with the
    threshold of best accuracy on the other folds (the first on ties). Returns the mean and
    the standard deviation (ddof 0) of the fold accuracies. Flip augmentation (the sum of
    the embeddings of an image and its mirror, before normalising) is the caller's.
    """
    emb1 = _as_tensor(emb1, "emb1", 2).double()
    emb2 = _as_tensor(emb2, "emb2", 2).double().to(emb1.device)
    issame = _as_tensor(issame, "issame", 1).bool().to(emb1.device)
    if emb1.shape != emb2.shape or emb1.shape[0] != issame.shape[0]:
        raise ValueError(
            f"emb1, emb2 must be (n, d) alike and issame (n,), got {tuple(emb1.shape)}, "
            f"{tuple(emb2.shape)}, {tuple(issame.shape)}"
        )
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= issame.shape[0]:
        raise ValueError(f"folds must be an int in [2, number of pairs], got {folds!r}")
    distance = (F.normalize(emb1, dim=1) - F.normalize(emb2, dim=1)).pow(2).sum(1)
    thresholds = torch.arange(400, dtype=torch.float64, device=emb1.device) * 0.01
    correct = ((distance.unsqueeze(0) < thresholds.unsqueeze(1)) == issame.unsqueeze(0)).double()
    accuracies = []
    for test in _kfold_slices(issame.shape[0], folds):
        train = torch.ones(issame.shape[0], dtype=torch.bool, device=emb1.device)
        train[test] = False
        best = correct[:, train].mean(1).argmax()  # argmax returns the first maximum
        accuracies.append(correct[best, test].mean().item())
    return float(np.mean(accuracies)), float(np.std(accuracies))


# ---------------------------------------------------------------- size-fair tracking
#
# PEI scores the top 10% of the image (1,255 px at 112 x 112) against parts of 70-130 px:
# a perfect eye channel gets IoU 0.11 and is assigned to the cheek. The metrics below
# match each map's kept area to the part's own area, and subtract what the same map
# scores against another identity's face, so that a spatial prior scores 0.

# The ranks of a channel block's upsampled maps: (images x channels x S*S) int32 at most.
_RANK_BLOCK_ELEMENTS = 1 << 24


def _check_masks(masks, batch: int, device) -> torch.Tensor:
    """``masks`` ``(B, K, S, S)`` bool on ``device``."""
    masks = _as_tensor(masks, "masks", 4).to(device)
    if masks.dtype != torch.bool:
        raise TypeError(f"masks must be booleans, got dtype {masks.dtype}")
    if masks.shape[0] != batch or masks.shape[2] != masks.shape[3]:
        raise ValueError(f"masks must be (B={batch}, K, S, S), got shape {tuple(masks.shape)}")
    return masks


def _ranked(maps: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each map upsampled as :func:`top_activation_mask` does, then each pixel's rank in
    decreasing order of value (ties: the lower flat index first), ``(S*S, m, C)`` (pixels
    first, so that a part's pixels are whole rows), int16 where the ranks fit, and the
    number of strictly positive pixels ``(m, C)`` in the same dtype. Positive pixels rank
    first."""
    up = F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False).flatten(2)
    # NaN and non-positive pixels rank after every positive one. The bits of non-negative
    # float32 values, read as int32, are in the same order, and sort faster.
    key = torch.where(up > 0, up, 0.0).view(torch.int32)
    order = key.sort(dim=-1, descending=True, stable=True).indices
    pixels = order.shape[-1]
    dtype = torch.int16 if pixels <= torch.iinfo(torch.int16).max else torch.int32
    rank = torch.empty(pixels, *order.shape[:2], dtype=dtype, device=order.device)
    rank.permute(1, 2, 0).scatter_(-1, order, torch.arange(pixels, dtype=dtype, device=order.device)
                                   .expand(order.shape))
    return rank, (up > 0).sum(-1).to(dtype)


def _part_pixels(masks: torch.Tensor) -> list[torch.Tensor]:
    """The flat indices of each part's pixels, for one image's masks ``(K, S*S)``."""
    return [part.nonzero().squeeze(1) for part in masks]


def _matched_iou(rank: torch.Tensor, positive: torch.Tensor, pixels: list[torch.Tensor]) -> torch.Tensor:
    """Area-matched IoU ``(m, C, K)`` of the ranked maps (:func:`_ranked`) against one
    image's parts, given by their pixels (:func:`_part_pixels`): the top ``|M[k]|``
    positive pixels of each map against ``M[k]``; NaN where ``M[k]`` is empty. Costs
    ``m * C * sum_k |M[k]|`` comparisons: only the parts' pixels are looked at."""
    area = torch.tensor([len(p) for p in pixels], device=rank.device)  # (K,)
    kept = torch.minimum(area.to(rank.dtype), positive.unsqueeze(-1))  # (m, C, K): the kept areas
    # Counts of at most S*S fit the ranks' dtype; summing bytes into it is the fast way.
    inter = torch.stack([(rank.index_select(0, p) < kept[..., k]).view(torch.uint8).sum(0, dtype=rank.dtype)
                         for k, p in enumerate(pixels)], dim=-1)
    union = (kept + area - inter).double()
    return torch.where(area > 0, inter / union.clamp_min(1), torch.nan).float()


def _channel_blocks(batch: int, channels: int, size: int) -> range:
    """Starts of the channel blocks whose ranks fit in :data:`_RANK_BLOCK_ELEMENTS`."""
    return range(0, channels, max(1, _RANK_BLOCK_ELEMENTS // max(1, batch * size * size)))


def _paired_iou(maps: torch.Tensor, masks: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """``(B, C, K)``: the area-matched IoU of ``maps[b]`` against ``masks[partner[b]]``."""
    batch, channels = maps.shape[:2]
    size = masks.shape[-1]
    pixels = [_part_pixels(image) for image in masks.flatten(2)]
    out = torch.empty(batch, channels, masks.shape[1], device=maps.device)
    blocks = _channel_blocks(1, channels, size)
    for b in range(batch):
        for start in blocks:
            rank, positive = _ranked(maps[b:b + 1, start:start + blocks.step], size)
            out[b, start:start + blocks.step] = _matched_iou(rank, positive, pixels[int(partner[b])])[0]
    return out


def _cross_iou(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(B, B, C, K)``: ``[b, b']`` is the area-matched IoU of ``maps[b]`` against
    ``masks[b']``: every pairing of maps with masks that the permutation null needs."""
    batch, channels = maps.shape[:2]
    size = masks.shape[-1]
    pixels = [_part_pixels(image) for image in masks.flatten(2)]
    out = torch.empty(batch, batch, channels, masks.shape[1], device=maps.device)
    blocks = _channel_blocks(batch, channels, size)
    for start in blocks:
        rank, positive = _ranked(maps[:, start:start + blocks.step], size)
        for other in range(batch):
            out[:, other, start:start + blocks.step] = _matched_iou(rank, positive, pixels[other])
    return out


def area_matched_iou(maps, masks) -> torch.Tensor:
    """Area-matched IoU of every map with every part of its own image: float32 ``(B, C, K)``.

    ``maps`` ``(B, C, h, w)``; ``masks`` ``(B, K, S, S)`` bool. Each map is upsampled
    bilinearly to ``S x S`` (``align_corners=False``, as :func:`top_activation_mask`); it
    keeps its ``|M[b,k]|`` highest pixels among those ``> 0`` (ties at the cut: the lower
    flat pixel index first; a dead map keeps nothing, a map with fewer positive pixels
    keeps those), and ``IoU[b,c,k] = |kept & M[b,k]| / |kept | M[b,k]|``. NaN where
    ``M[b,k]`` is empty: the part is not in the image, so there is nothing to match (the
    means below leave such images out).
    """
    maps = _check_maps(maps)
    masks = _check_masks(masks, maps.shape[0], maps.device)
    return _paired_iou(maps, masks, torch.arange(maps.shape[0]))


def other_identity_partners(labels=None, batch: int | None = None) -> torch.Tensor:
    """A fixed pairing of each image with an image of another identity: int64 ``(B,)``.

    Images are put in order of ``(label, index)``; image at position ``i`` is paired with
    the one at position ``i + m (mod B)``, ``m`` the size of the largest identity. That is
    a permutation (every image is some image's partner once), and no image is paired with
    its own identity, provided no identity holds more than half the images
    (``ValueError`` otherwise). ``labels`` ``(B,)`` integers; ``None``: every image is its
    own identity (then ``batch`` gives ``B``, and image ``i`` is paired with ``i + 1``).
    """
    if labels is None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
            raise ValueError(f"batch must be an int >= 2 when labels is None, got {batch!r}")
        labels = torch.arange(batch)
    labels = _as_tensor(labels, "labels", 1)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer identities, got dtype {labels.dtype}")
    if batch is not None and labels.shape[0] != batch:
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    count = labels.shape[0]
    largest = int(labels.unique(return_counts=True)[1].max()) if count else 0
    if count < 2 or 2 * largest > count:
        raise ValueError(f"labels: an identity holds {largest} of the {count} images; pairing "
                         "every image with another identity's needs at most half of them each")
    order = labels.cpu().sort(stable=True).indices
    partner = torch.empty_like(order)
    partner[order] = order.roll(-largest)
    return partner


def _image_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over images (dim 0) of the non-NaN values, float64, NaN where none.

    The values are sorted before they are summed, so that two equal multisets give equal
    means to the last bit: a map that is the same in every image has a gain of exactly 0.
    """
    ordered = values.double().sort(dim=0).values  # NaN last
    return ordered.nan_to_num(0.0).sum(0) / (~ordered.isnan()).sum(0)


def tracking_gain(maps, masks, labels=None) -> torch.Tensor:
    """How much better each map matches its own image's parts than another identity's:
    float64 ``(C, K)``.

    ``gain[c, k] = mean_b IoU(maps[b, c], masks[b, k]) - mean_b IoU(maps[b, c],
    masks[partner[b], k])``, the IoU :func:`area_matched_iou`'s, ``partner``
    :func:`other_identity_partners` of ``labels`` ``(B,)`` (``None``: every image its
    own identity), each mean over the images where the part is present. The partners are
    a permutation of the images, so a map that is the same in every image (a fixed
    spatial prior, however well placed) has a gain of exactly 0.
    """
    maps = _check_maps(maps)
    masks = _check_masks(masks, maps.shape[0], maps.device)
    partner = other_identity_partners(labels, maps.shape[0])
    own = _paired_iou(maps, masks, torch.arange(maps.shape[0]))
    return _image_mean(own) - _image_mean(_paired_iou(maps, masks, partner))


def _localized_gain(masks: torch.Tensor, labels, map_size: tuple[int, int]) -> torch.Tensor:
    """``(K,)``: the tracking gain of a perfectly localised channel per part, the part's
    masks area-pooled to the maps' ``h x w``, on the same images."""
    pooled = F.adaptive_avg_pool2d(masks.float(), map_size)
    return tracking_gain(pooled, masks, labels).diagonal()


def normalized_tracking_gain(maps, masks, labels=None) -> torch.Tensor:
    """:func:`tracking_gain` divided, per part, by that of a perfectly localised channel.

    The perfectly localised channel of part ``k`` is ``masks[:, k]`` area-pooled to the
    maps' ``h x w``; its gain on the same images and ``labels`` is the divisor (NaN where
    it is not positive). 1: the channel tracks part ``k`` as well as the part's own mask
    seen at the maps' resolution; 0: no better than a fixed spatial prior. Float64
    ``(C, K)``.
    """
    maps = _check_maps(maps)
    masks = _check_masks(masks, maps.shape[0], maps.device)
    localized = _localized_gain(masks, labels, tuple(maps.shape[-2:]))
    return tracking_gain(maps, masks, labels) / torch.where(localized > 0, localized, torch.nan)


class ChannelTracking(NamedTuple):
    """:func:`channel_tracking`'s result, per channel ``c`` and part ``k``."""

    gain: torch.Tensor  # float64 (C, K): normalized_tracking_gain
    preferred: torch.Tensor  # int64 (C,): argmax_k gain[c, k], -1 where every gain is NaN
    purity: torch.Tensor  # float64 (C,): gain at the preferred part / sum of the positive gains
    null_threshold: torch.Tensor  # float64 (C,): the level-quantile of the permutation null
    confident: torch.Tensor  # bool (C,): gain at the preferred part > null_threshold
    localized_gain: torch.Tensor  # float64 (K,): the divisor, a perfectly localised channel's gain


def _gain_of_pairing(cross: torch.Tensor, partner: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Tracking gain ``(C, K)`` from :func:`_cross_iou`, each map ``b`` scored against the
    masks of image ``own[b]`` minus those of image ``partner[b]``."""
    rows = torch.arange(cross.shape[0])
    return _image_mean(cross[rows, own]) - _image_mean(cross[rows, partner])


def _nan_max(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``values.max(dim)`` over the non-NaN entries; NaN where all are NaN."""
    best = values.nan_to_num(-torch.inf, posinf=torch.inf, neginf=-torch.inf).amax(dim)
    return torch.where(values.isnan().all(dim), torch.nan, best)


def channel_tracking(maps, masks, labels=None, *, permutations: int = 200, seed: int = 0,
                     level: float = 0.95) -> ChannelTracking:
    """Which part each channel tracks, how purely, and whether beyond chance.

    ``gain`` is :func:`normalized_tracking_gain`; the ``preferred`` part of a channel is
    the ``argmax_k gain[c, k]`` (NaN left out; the first on ties; -1 if all are NaN); its
    ``purity`` is ``gain[c, pref] / sum_k max(gain[c, k], 0)``, 1 when only the preferred
    part has a positive gain (NaN when none has). The null is image-shuffled: for each of
    ``permutations`` random permutations ``s`` of the images (``torch.Generator`` seeded
    with ``seed``), the gain is recomputed with the masks and labels of image ``s[b]``
    given to the maps of image ``b`` (the same divisor), and the channel's statistic is
    its largest gain over the parts, as the preferred part is the largest. A channel is
    ``confident`` when its gain at the preferred part exceeds the ``level`` quantile of
    its own null (linear interpolation), so a fixed spatial prior (gain exactly 0, null
    exactly 0) never is. All pairings are read from one table of every map against every
    image's masks, ``B^2 * C * sum_k |M[k]|`` comparisons.
    """
    maps = _check_maps(maps)
    batch = maps.shape[0]
    masks = _check_masks(masks, batch, maps.device)
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations must be a positive int, got {permutations!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    labels = torch.arange(batch) if labels is None else _as_tensor(labels, "labels", 1).cpu()
    localized = _localized_gain(masks, labels, tuple(maps.shape[-2:]))
    divisor = torch.where(localized > 0, localized, torch.nan)
    cross = _cross_iou(maps, masks)
    rows = torch.arange(batch)
    gain = _gain_of_pairing(cross, other_identity_partners(labels, batch), rows) / divisor
    generator = torch.Generator().manual_seed(seed)
    null = []
    for _ in range(permutations):
        shuffle = torch.randperm(batch, generator=generator)
        partner = shuffle[other_identity_partners(labels[shuffle], batch)]
        null.append(_nan_max(_gain_of_pairing(cross, partner, shuffle) / divisor, -1))
    threshold = torch.nanquantile(torch.stack(null), level, dim=0)
    best = _nan_max(gain, -1)
    preferred = torch.where(best.isnan(), -1, gain.nan_to_num(-torch.inf).argmax(-1))
    positive = gain.nan_to_num(0.0).clamp_min(0).sum(-1)
    purity = torch.where(best > 0, best / positive, torch.nan)
    return ChannelTracking(gain=gain, preferred=preferred, purity=purity, null_threshold=threshold,
                           confident=best > threshold, localized_gain=localized)


class TrackingSummary(NamedTuple):
    """:func:`run_tracking_summary`'s result: one run's channels at a glance."""

    confident_fraction: float  # the fraction of channels that are confident
    confident_parts: int  # distinct preferred parts among the confident channels
    mean_gain: torch.Tensor  # float64 (K,): per part, the mean over channels of its gain
    mean_normalized_gain: float  # the mean of mean_gain over the parts


def run_tracking_summary(tracking: ChannelTracking) -> TrackingSummary:
    """Fraction of confident channels, the distinct parts they prefer, and the mean
    normalised gain per part (over all channels, NaN left out: no selection, so a network
    whose maps ignore the faces scores about 0) and over parts."""
    if not isinstance(tracking, ChannelTracking):
        raise TypeError(f"tracking must be a ChannelTracking, got {type(tracking).__name__}")
    confident = tracking.confident
    mean_gain = tracking.gain.nanmean(0)
    return TrackingSummary(confident_fraction=float(confident.double().mean()),
                           confident_parts=int(tracking.preferred[confident].unique().numel()),
                           mean_gain=mean_gain, mean_normalized_gain=float(mean_gain.nanmean()))


def erasure_sensitivity(maps, erased_maps) -> torch.Tensor:
    """The relative drop of each channel's activation when part ``k`` is erased: float64 ``(C, K)``.

    ``maps`` ``(B, C, h, w)`` are the maps of the images as drawn; ``erased_maps``
    ``(K, B, C, h, w)`` (or a sequence of ``K`` such ``(B, C, h, w)``) those of the same
    images drawn again with part ``k`` erased and nothing else changed (the renderer's
    random stream is the same). ``drop[c, k] = 1 - sum_{b,pixels} erased_maps[k, b, c] /
    sum_{b,pixels} maps[b, c]``: 1 when the channel's activation came from part ``k``
    only, 0 when erasing it changes nothing, negative when erasing raises it; NaN for a
    channel dead on every image. A causal check of what :func:`channel_tracking` finds.
    """
    maps = _check_maps(maps)
    if isinstance(erased_maps, (list, tuple)):
        erased_maps = torch.stack([_check_maps(m) for m in erased_maps])
    erased = _as_tensor(erased_maps, "erased_maps", 5).to(maps.device)
    if erased.shape[1:] != maps.shape:
        raise ValueError(f"erased_maps must be (K, {', '.join(map(str, maps.shape))}), got "
                         f"shape {tuple(erased.shape)}")
    total = maps.double().sum((0, 2, 3))  # (C,)
    remaining = erased.double().sum((1, 3, 4))  # (K, C)
    return (1 - remaining / torch.where(total != 0, total, torch.nan)).T


# ---------------------------------------------------------------- nulls of PEI and LS


def mismatched_masks(masks, labels=None) -> torch.Tensor:
    """Each image's part masks replaced by those of its :func:`other_identity_partners`
    image: ``masks[partner]``. PEI and location consistency of the maps against these
    are their first null: what the maps score without seeing the face they are scored on."""
    masks = _as_tensor(masks, "masks", 4)
    return masks[other_identity_partners(labels, masks.shape[0]).to(masks.device)]


def fixed_cones(height: int, width: int, radius: float = 4.0) -> torch.Tensor:
    """One cone per pixel of an ``height x width`` map: ``(h*w, h, w)`` float32, cone ``a``
    is ``max(1 - ||(u, v) - (i, j)||_2 / radius, 0)`` with peak ``a = (i, j)``, the positive
    part of the one-peak template (docs/design.md section 1)."""
    from ecloss_fast._templates import make_templates

    return make_templates(height, width, radius=radius)[:height * width].clamp_min(0)


def best_fixed_cone(part_masks, map_size: int | tuple[int, int], fraction: float = 0.1,
                    radius: float = 4.0) -> dict:
    """The second null of PEI and location consistency: one image-independent channel.

    Each cone of :func:`fixed_cones` is a channel whose map is the same in every image;
    its PEI (:func:`part_explainability`'s mean over images) and its channel consistency
    ``S`` (as in :func:`location_consistency`) are computed on ``part_masks``
    ``(B, K, S, S)``. Returns ``{"pei", "pei_peak", "location_consistency",
    "location_consistency_peak"}``: the best value over the cones and the flat index of
    the peak of the cone that reaches it (the first on ties). Chosen on the images scored,
    so an upper bound of what a spatial prior scores there.
    """
    part_masks = _as_tensor(part_masks, "part_masks", 4)
    _check_fraction(fraction)
    height, width = (map_size, map_size) if isinstance(map_size, int) else map_size
    cones = fixed_cones(height, width, radius).to(part_masks.device)
    size = part_masks.shape[-1]
    # A cone's top area is the same in every image: found once, scored against every mask.
    top = _top_mask(cones.unsqueeze(0), size, fraction).flatten(2).float()[0]  # (P, S*S)
    parts = part_masks.flatten(2).float()  # (B, K, S*S)
    intersection = torch.einsum("cp,bkp->bck", top, parts)
    union = top.sum(-1)[None, :, None] + parts.sum(-1)[:, None, :] - intersection
    iou = torch.where(union > 0, intersection / union.clamp_min(1), 0.0)
    pei = iou.amax(-1).mean(0)
    consistency = channel_consistency(part_assignment(iou)).nan_to_num(-torch.inf)
    return {"pei": float(pei.max()), "pei_peak": int(pei.argmax()),
            "location_consistency": float(consistency.max()),
            "location_consistency_peak": int(consistency.argmax())}


# ---------------------------------------------------------------- full set vs subset


def subset_gradient_cosine(maps, *, tau: float, subset=400, estimator: str = "uniform",
                           radius: float = 4.0, normalize: bool = False, diversity: float = 0.0,
                           backend: str = "auto", precision: str | None = None,
                           process_group=None) -> torch.Tensor:
    """The cosine between the gradients at ``maps`` of ECLoss over the full template set
    and over ``subset`` (an int ``k``, the paper's evenly spaced subset, or a tensor of
    templates ``(N, h, w)``): a 0-d float64 tensor, NaN when either gradient is 0.

    Both losses are :func:`ecloss_fast.ecloss` with the other arguments as given, on
    ``maps`` detached (nothing flows back to whatever made them). With ``process_group``
    the losses are those of the group's global batch and the cosine is that of the
    global gradient (the dot product and the norms are summed over the group). 1 means
    the subset moves the maps exactly as the full set does.
    """
    from ecloss_fast.functional import ecloss

    maps = _as_tensor(maps, "maps", 4)
    if not maps.is_floating_point():
        raise TypeError(f"maps must be a floating tensor, got dtype {maps.dtype}")
    x = maps.detach().float() if maps.dtype in (torch.float16, torch.bfloat16) else maps.detach()
    x.requires_grad_(True)
    options = dict(tau=tau, radius=radius, estimator=estimator, normalize=normalize,
                   diversity=diversity, backend=backend, precision=precision,
                   process_group=process_group)
    with torch.enable_grad():
        full, = torch.autograd.grad(ecloss(x, templates="full", **options), x)
        part, = torch.autograd.grad(ecloss(x, templates=subset, **options), x)
    full, part = full.double(), part.double()
    sums = torch.stack([(full * part).sum(), full.square().sum(), part.square().sum()])
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(sums, group=process_group)
    return sums[0] / (sums[1] * sums[2]).sqrt()
