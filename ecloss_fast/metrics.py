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
"""
from __future__ import annotations

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
