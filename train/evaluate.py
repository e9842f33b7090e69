"""Evaluate a checkpoint as the paper's section 5: ``python -m train.evaluate``.

    python -m train.evaluate --checkpoint RUN_DIR_OR_FILE --out DIR \\
        [--data synthetic] [--data helen=PATH] [--data lfw=lfw.bin] ...

``--data NAME=PATH`` (repeatable; default ``synthetic`` and ``synthetic_jitter``) is one of:

- ``synthetic``: faces drawn with identities the model never saw (the training seed + 1),
  with their exact part masks: PEI, location consistency, part coverage, robustness and
  verification; ``synthetic_jitter``: the same faces in the pose spread of unaligned
  detector crops (the paper evaluates without alignment);
- a folder of iBUG ``.pts`` files beside their images (300-W, Helen, AFW, LFPW) or LaPa's
  ``images/`` + ``landmarks/``: PEI, location consistency and robustness (Tables 2, 4, 5);
- an InsightFace ``.bin`` (``lfw.bin``, ``cfp_ff.bin``, ``calfw.bin``, ...) or an LFW
  ``pairs.txt@IMAGE_ROOT``: verification accuracy and robustness (Tables 3, 5);
- a RecordIO ``.rec`` or an image folder: robustness (Table 5's VGGFace column).

PEI, location consistency, part coverage and entropy (how many parts the channels' dominant
parts cover), activation robustness (over all maps and over live maps only) and the
fraction of dead maps are the mean and standard error over ``--repeats`` random draws of
``--images`` images (the paper: 100 images, 5 draws); verification is the mean and
standard deviation over 10 folds with flip augmentation. PEI and location consistency come
with their two nulls (docs/design.md 7.1), over the same draws: ``*_null_mismatched``, the
maps against the part masks of an image of another identity, and ``*_null_best_cone``,
the best image-independent cone channel. The size-fair tracking metrics (7.2) are computed
on the first draw with ``--permutations`` image shuffles for their null (0: none):
``confident_fraction``, ``confident_parts``, ``mean_normalized_gain``,
``normalized_gain_per_part``, and per channel (``tracking.channels``) the preferred part,
normalised gains, purity, null threshold and whether it is confident. Images of unknown
identity (landmark sets) count as identities of their own. On the synthetic faces, the
erasure check: the same images drawn again with each part erased in turn, each channel's
relative drop (``tracking.channels.erasure_drop``), and ``erasure_drop_confident``, the
mean over the confident channels of the drop when their preferred part is erased. Writes ``DIR/metrics.json`` and,
from the first ``--data`` set with images, the figures ``DIR/*.png``: Figure 6 (top
activation of the most consistent channels over faces of distinct identities), Figure 5
(one face's maps with their peaks), each channel's dominant part and where its peaks land,
the histogram of peaks per map and the part assignment matrix ``A[c, k]``.

The checkpoint, every ``--data`` path and the settings are checked before anything is
computed or written; a user error is one ``error: ...`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ecloss_fast import metrics  # noqa: E402
from train.cli import USER_ERRORS, read_checkpoint, report_user_error  # noqa: E402
from train.data.image import denormalize  # noqa: E402

__all__ = ["EvalSettings", "evaluate_checkpoint", "evaluate_model", "first_draw", "main"]


@dataclass
class EvalSettings:
    """How the metrics are drawn; the defaults are the paper's."""

    images: int = 100  # images per random draw
    repeats: int = 5  # random draws
    pairs: int = 1000  # synthetic verification pairs
    fraction: float = 0.1  # the top activation area (Eq. 9)
    min_prominence: float = 0.1  # of each map's max - min (count_peaks)
    folds: int = 10
    batch_size: int = 64
    seed: int = 0
    figure_channels: int = 8  # rows of Figure 6
    figure_faces: int = 6  # columns of Figure 6, one identity each where labels are known
    figure_grid_channels: int = 64  # panels of the per-channel figure (evenly spaced channels)
    # Image shuffles of the tracking metrics' null, on the first draw's images; 0: no
    # tracking metrics (they cost images^2 x channels x part pixels comparisons).
    permutations: int = 200
    # The held-out synthetic faces' seed; None: the training faces' seed + 1. A study gives
    # each training seed its own draw of held-out identities (docs/study/PLAN.md).
    faces_seed: int | None = None


# ---------------------------------------------------------------------------- data


SYNTHETIC = {"synthetic": False, "synthetic_jitter": True}  # --data path: jitter


def _synthetic(config, settings: EvalSettings, jitter: bool):
    from train.data.synthetic import SyntheticFaces
    from train.verification import synthetic_pairs

    per = 10
    pool = max(settings.images * 2, (settings.pairs // per) + 2 * per)
    # seed + 1 (or faces_seed): identities the model was not trained on; the same ones with
    # and without jitter
    seed = config.data.seed + 1 if settings.faces_seed is None else settings.faces_seed
    if seed == config.data.seed:
        raise ValueError(f"faces_seed {seed} is the training faces' seed: the held-out faces "
                         "would be the training identities")
    drawn = dict(num_identities=max(2, -(-pool // per)), images_per_identity=per,
                 size=config.model.input_size, seed=seed, jitter=jitter,
                 identity=config.data.identity)
    faces = SyntheticFaces(**drawn)
    # "erased": the same faces with one part not drawn and every random number still drawn,
    # for the erasure check of the tracking metrics.
    return dict(parts=faces, pairs=synthetic_pairs(faces, settings.pairs, seed=settings.seed),
                erased=lambda part: SyntheticFaces(**drawn, erase=(part,)))


def _open_data(name: str, path: str, config, settings: EvalSettings) -> dict:
    """``{"parts": dataset with part_masks, "pairs": VerificationPairs, "images": dataset}``;
    synthetic faces also ``"erased"``: part name -> the same faces with that part erased."""
    from train.landmarks import LandmarkFaces
    from train.verification import read_bin, read_pairs_list

    size = config.model.input_size
    if path in SYNTHETIC:
        return _synthetic(config, settings, SYNTHETIC[path])
    if "@" in path:
        pairs_file, root = path.split("@", 1)
        return dict(pairs=read_pairs_list(pairs_file, root, size))
    file = Path(path)
    if file.suffix == ".bin":
        return dict(pairs=read_bin(file, size))
    if file.suffix == ".rec" or (file / "train.rec").is_file():
        from train.data.recordio import RecordIODataset

        return dict(images=RecordIODataset(file if file.suffix == ".rec" else file / "train.rec", size=size))
    if file.is_dir() and ((file / "landmarks").is_dir() or next(file.rglob("*.pts"), None)):
        return dict(parts=LandmarkFaces(file, size))
    if file.is_dir():
        from train.data.folder import ImageFolderFaces

        return dict(images=ImageFolderFaces(file, size))
    raise ValueError(f"--data {name}={path}: not {DATA_KINDS}")


DATA_KINDS = ("'synthetic', 'synthetic_jitter', a .bin, pairs.txt@ROOT, a .rec, a landmark "
              "folder or an image folder")


def _check_data_path(name: str, path: str) -> None:
    """The files :func:`_open_data` will read exist: checked for every ``--data`` set before
    the first is evaluated, so that a typo stops the run before it writes anything."""
    where = f"--data {name}={path}"
    if path in SYNTHETIC:
        return
    if "@" in path:
        pairs_file, root = map(Path, path.split("@", 1))
        if not pairs_file.is_file():
            raise FileNotFoundError(f"{where}: the pair list {pairs_file} not found")
        if not root.is_dir():
            raise FileNotFoundError(f"{where}: the image root {root} is not a folder")
        return
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{where}: no such file or folder")
    rec = file if file.suffix == ".rec" else file / "train.rec"
    if rec.is_file() and not rec.with_suffix(".idx").is_file():
        raise FileNotFoundError(f"{where}: {rec.with_suffix('.idx')}, the index of {rec}, not found")
    if file.is_file() and file.suffix not in (".bin", ".rec"):
        raise ValueError(f"{where}: not {DATA_KINDS}")


# ---------------------------------------------------------------------------- metrics


@torch.no_grad()
def _maps(model, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="feature maps", leave=False):
        out.append(model(images[start:start + batch_size].to(device)).maps.float().cpu())
    return torch.cat(out)


def _mean_se(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "se": float(se), "repeats": len(values)}


def _draws(pool: int, settings: EvalSettings) -> list[np.ndarray]:
    rng = np.random.default_rng(settings.seed)
    count = min(settings.images, pool)
    return [np.sort(rng.choice(pool, count, replace=False)) for _ in range(settings.repeats)]


def _gather(dataset, indices) -> dict:
    items = [dataset[int(i)] for i in tqdm(indices, desc="load images", leave=False)]
    batch = {"image": torch.stack([item["image"] for item in items])}
    for key in ("part_masks", "label"):
        if key in items[0]:
            batch[key] = torch.stack([torch.as_tensor(item[key]) for item in items])
    return batch


def _robustness(maps: torch.Tensor, settings: EvalSettings, draws, position) -> dict:
    """Peaks per map over all maps and over live maps, and the dead fraction, per draw."""
    peaks = metrics.count_peaks(maps, settings.min_prominence).double()  # (B, C)
    live = metrics.live_maps(maps)
    all_maps, live_maps, dead = [], [], []
    for draw in draws:
        rows = [position[int(i)] for i in draw]
        all_maps.append(peaks[rows].mean().item())
        live_maps.append(peaks[rows][live[rows]].mean().item())
        dead.append(1 - live[rows].double().mean().item())
    return {"activation_robustness": _mean_se(all_maps),
            "activation_robustness_live": _mean_se(live_maps), "dead_fraction": _mean_se(dead)}


def _explainability(model, dataset, settings: EvalSettings, device, with_parts: bool, erased=None):
    """Metrics over the draws, plus what the figures need (maps, images, IoU); ``erased``
    (part name -> the dataset with that part erased) adds the erasure check."""
    draws = _draws(len(dataset), settings)
    used = np.unique(np.concatenate(draws))
    batch = _gather(dataset, used)
    maps = _maps(model, batch["image"], settings.batch_size, device)
    position = {int(i): k for k, i in enumerate(used)}
    result = _robustness(maps, settings, draws, position)
    extra = dict(images=batch["image"], maps=maps, labels=batch.get("label"))
    if with_parts:
        iou = metrics.part_iou(maps, batch["part_masks"], settings.fraction)
        labels = batch.get("label")
        unpaired = _unpairable(labels, len(used))
        # The first null: each map against the masks of an image of another identity.
        mismatched = None if unpaired else metrics.part_iou(
            maps, metrics.mismatched_masks(batch["part_masks"], labels), settings.fraction)
        scores = {key: [] for key in ("pei", "pei_null_mismatched", "pei_null_best_cone",
                                      "location_consistency", "location_consistency_null_mismatched",
                                      "location_consistency_null_best_cone", "part_coverage",
                                      "part_entropy")}
        for draw in draws:
            rows = [position[int(i)] for i in draw]
            for suffix, values in (("", iou), ("_null_mismatched", mismatched)):
                if values is not None:
                    scores["pei" + suffix].append(values[rows].amax(-1).mean().item())
                    scores["location_consistency" + suffix].append(metrics.channel_consistency(
                        metrics.part_assignment(values[rows])).nanmean().item())
            cone = metrics.best_fixed_cone(batch["part_masks"][rows], tuple(maps.shape[-2:]),
                                           settings.fraction)
            scores["pei_null_best_cone"].append(cone["pei"])
            scores["location_consistency_null_best_cone"].append(cone["location_consistency"])
            dominant = metrics.dominant_parts_from_iou(iou[rows])
            scores["part_coverage"].append(metrics.part_coverage(dominant))
            scores["part_entropy"].append(metrics.part_entropy(dominant))
        result.update({key: _mean_se(values) for key, values in scores.items() if values})
        if unpaired:
            result["nulls_skipped"] = unpaired
        if settings.permutations:
            rows = [position[int(i)] for i in draws[0]]
            parts = getattr(dataset, "parts", metrics.PARTS)
            erased_maps = None if erased is None else torch.stack([
                _maps(model, _gather(erased(part), draws[0])["image"], settings.batch_size, device)
                for part in parts])
            result.update(_tracking(maps[rows], batch["part_masks"][rows],
                                    None if labels is None else labels[rows], settings, parts,
                                    erased_maps))
        # The data's own parts: the synthetic faces have eight, landmark masks seven.
        extra.update(iou=iou, part_masks=batch["part_masks"], parts=getattr(dataset, "parts", metrics.PARTS))
    return result, extra


# A channel is confident when its gain exceeds this quantile of its image-shuffled null.
TRACKING_LEVEL = 0.95


def _unpairable(labels, count: int) -> str | None:
    """Why the images cannot each be paired with another identity's
    (:func:`ecloss_fast.metrics.other_identity_partners`), or ``None`` when they can."""
    largest = 1 if labels is None else int(torch.as_tensor(labels).unique(return_counts=True)[1].max())
    if count < 2 or 2 * largest > count:
        return f"an identity holds {largest} of the {count} images (at most half can be paired)"
    return None


def _tracking(maps, masks, labels, settings: EvalSettings, parts, erased_maps=None) -> dict:
    """The size-fair tracking metrics of one draw (docs/design.md 7.2): the run's summary at
    the top level, the channels' details under ``tracking``. With ``erased_maps``
    ``(K, B, C, h, w)``, the maps of the same images with each part erased: each channel's
    relative drop per erased part, and ``erasure_drop_confident``, the mean over the
    confident channels of the drop when their preferred part is erased."""
    skipped = _unpairable(labels, len(maps))
    if skipped:
        return {"tracking": {"skipped": skipped}}
    names = list(parts) if len(parts) == masks.shape[1] else [str(k) for k in range(masks.shape[1])]
    tracking = metrics.channel_tracking(maps, masks, labels, permutations=settings.permutations,
                                        seed=settings.seed, level=TRACKING_LEVEL)
    summary = metrics.run_tracking_summary(tracking)
    channels = {
        "preferred_part": [names[k] if k >= 0 else None for k in tracking.preferred.tolist()],
        "normalized_gain": tracking.gain.tolist(),
        "purity": tracking.purity.tolist(),
        "null_threshold": tracking.null_threshold.tolist(),
        "confident": tracking.confident.tolist(),
    }
    result = {
        "oracle": _oracle_tracking(maps, masks, labels, settings, names),
        "confident_fraction": summary.confident_fraction,
        "confident_parts": summary.confident_parts,
        "mean_normalized_gain": summary.mean_normalized_gain,
        "normalized_gain_per_part": dict(zip(names, summary.mean_gain.tolist())),
        "tracking": {"images": len(maps), "permutations": settings.permutations,
                     "level": TRACKING_LEVEL,
                     "localized_gain": dict(zip(names, tracking.localized_gain.tolist())),
                     "channels": channels},
    }
    if erased_maps is not None:
        drop = metrics.erasure_sensitivity(maps, erased_maps)
        confident = tracking.confident.nonzero().squeeze(1)
        channels["erasure_drop"] = drop.tolist()
        result["erasure_drop_confident"] = drop[confident, tracking.preferred[confident]].mean().item()
    return result


def _oracle_tracking(maps, masks, labels, settings: EvalSettings, names) -> dict:
    """The positive control of the tracking metrics: one oracle channel per part, the part's
    masks area-pooled to the maps' size (the perfectly localised channel), scored by the
    same procedure as the run's channels. The measurement can say "tracks" only where
    these come out confident on their own part."""
    oracle = F.adaptive_avg_pool2d(masks.float(), tuple(maps.shape[-2:]))
    tracking = metrics.channel_tracking(oracle, masks, labels, permutations=settings.permutations,
                                        seed=settings.seed, level=TRACKING_LEVEL)
    own = tracking.preferred == torch.arange(len(names))
    return {"confident_on_own_part": (tracking.confident & own).tolist(),
            "confident_fraction": tracking.confident.double().mean().item(),
            "parts": list(names)}


# ---------------------------------------------------------------------------- figures


def _save(fig, path: Path, dpi: int) -> None:
    """Save as a 256-colour PNG: the face pictures make full-colour files ten times larger."""
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    with Image.open(path) as picture:
        picture.convert("RGB").quantize(256).save(path, optimize=True)


def _faces(images: torch.Tensor) -> np.ndarray:
    return denormalize(images).numpy()


def _upsample(maps: torch.Tensor, size: int) -> np.ndarray:
    return F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False).numpy()


def _distinct_faces(extra: dict, count: int) -> list[int]:
    """``count`` images, the first of each identity in turn (the first images without labels)."""
    labels = extra.get("labels")
    if labels is None:
        return list(range(min(count, len(extra["images"]))))
    _, first = np.unique(labels.numpy(), return_index=True)
    return sorted(first.tolist())[:count]


def _part_name(extra: dict, part: int) -> str:
    return extra["parts"][part] if part >= 0 else "no part"


def figure_top_activation(extra: dict, settings: EvalSettings, path: Path, title: str) -> list[int]:
    """The paper's Figure 6: top-10% activation of chosen channels over faces of distinct
    identities (one column each), so a row shows whether a channel finds the same part
    on different people.

    Channels are the ``figure_channels`` most consistent ones (largest ``S[c]``, the same
    rule for every model), each row labelled with its dominant part. Returns the channels.
    """
    iou, maps, images = extra["iou"], extra["maps"], extra["images"]
    assignment = metrics.part_assignment(iou)
    spread = metrics.channel_consistency(assignment).nan_to_num(-1.0)
    channels = spread.argsort(descending=True)[:settings.figure_channels].tolist()
    dominant = metrics.dominant_parts_from_iou(iou).tolist()
    faces = _distinct_faces(extra, settings.figure_faces)
    size = images.shape[-1]
    pictures = _faces(images[faces])
    fig, axes = plt.subplots(len(channels), len(faces), figsize=(1.5 * len(faces), 1.5 * len(channels)),
                             squeeze=False)
    for row, channel in zip(axes, channels):
        up = _upsample(maps[faces, channel:channel + 1], size)[:, 0]
        top = metrics.top_activation_mask(maps[faces, channel:channel + 1], size, settings.fraction)[:, 0]
        for ax, picture, heat, keep in zip(row, pictures, up, top.numpy()):
            ax.imshow(picture)
            heat = np.where(keep, heat / max(heat.max(), 1e-12), np.nan)
            ax.imshow(heat, cmap="jet", alpha=0.55, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"ch {channel}\n{_part_name(extra, dominant[channel])}", fontsize=8)
    people = " (one identity per column)" if extra.get("labels") is not None else ""
    fig.suptitle(f"{title}: top {settings.fraction:.0%} activation{people}", fontsize=10)
    fig.tight_layout()
    _save(fig, path, dpi=70)
    return channels


def figure_maps_with_peaks(extra: dict, settings: EvalSettings, path: Path, title: str,
                           max_maps: int = 64) -> None:
    """The paper's Figure 5: one face and its channel maps, the counted peaks marked."""
    maps = extra["maps"][0]
    picture = _faces(extra["images"][:1])[0]
    shown = maps[:max_maps]
    peaks = metrics.peak_mask(shown, settings.min_prominence).numpy()
    columns = math.ceil(math.sqrt(len(shown) + 1))
    rows = math.ceil((len(shown) + 1) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.1 * rows), squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(picture)
    for ax, channel_map, marks in zip(axes[1:], shown.numpy(), peaks):
        ax.imshow(channel_map, cmap="viridis")
        v, u = np.nonzero(marks)[::-1]
        ax.scatter(v, u, s=10, c="red", marker="x", linewidths=1)
    for ax in axes:
        ax.set_axis_off()
    suffix = f" (first {len(shown)} of {len(maps)} channels)" if len(maps) > len(shown) else ""
    fig.suptitle(f"{title}: maps of one face, peaks (x){suffix}", fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi=70)


def figure_channel_parts(extra: dict, settings: EvalSettings, path: Path, title: str) -> None:
    """Per channel: where its counted peaks land over all evaluated faces, on the mean face,
    with the outline of its dominant part (``argmax_k mean_b IoU``) in that part's colour.

    A cell's opacity is how often a peak falls on it, relative to the channel's most
    frequent cell; the title gives that cell's share of faces. Up to
    ``figure_grid_channels`` channels, evenly spaced over the channel indices (no choice by
    score), shown grouped by dominant part.
    """
    from matplotlib import colormaps

    from train.data.synthetic import PART_COLOURS, PARTS

    colours = dict(zip(PARTS, PART_COLOURS / 255))  # by name: landmark parts are among them

    maps, iou, masks = extra["maps"], extra["iou"], extra["part_masks"]
    channels = maps.shape[1]
    shown = np.unique(np.linspace(0, channels - 1, min(channels, settings.figure_grid_channels))
                      .round().astype(int))
    dominant = metrics.dominant_parts_from_iou(iou).numpy()
    shown = sorted(shown, key=lambda c: (dominant[c] < 0, dominant[c], c))
    density = metrics.peak_mask(maps[:, shown], settings.min_prominence).double().mean(0).numpy()
    size = masks.shape[-1]
    face = _faces(extra["images"]).mean((0, -1)) / 255  # the mean face in grey, in [0, 1]
    outline = masks.double().mean(0).numpy()  # (K, S, S): how often each pixel is that part
    columns = math.ceil(math.sqrt(len(shown) * 1.5))
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.35 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    heat_colour = colormaps["autumn"](0.15)  # one strong colour; opacity carries the count
    for ax, channel, heat in zip(axes.ravel(), shown, density):
        part = int(dominant[channel])
        ax.imshow(face, cmap="gray", vmin=0, vmax=1.2, extent=(0, size, size, 0))
        overlay = np.zeros(heat.shape + (4,))
        overlay[..., :3] = heat_colour[:3]
        overlay[..., 3] = heat / heat.max() if heat.max() > 0 else 0
        ax.imshow(overlay, interpolation="nearest", extent=(0, size, size, 0))
        colour = colours[extra["parts"][part]] if part >= 0 else (0, 0, 0)
        if part >= 0:
            ax.contour(np.arange(size) + 0.5, np.arange(size) + 0.5, outline[part], levels=[0.5],
                       colors=[colour], linewidths=1.5)
        ax.set_title(f"{channel}: {_part_name(extra, part)} {heat.max():.0%}", fontsize=7, pad=2,
                     color=colour * np.array([0.75, 0.75, 0.75]) if part >= 0 else "black")
    fig.suptitle(f"{title}: where each channel's peaks land (opacity: how often, relative to its "
                 "busiest cell, whose share of faces is in the title); outline: its dominant part",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save(fig, path, dpi=80)


def figure_peak_histogram(extra: dict, settings: EvalSettings, path: Path, title: str) -> None:
    counts = metrics.count_peaks(extra["maps"], settings.min_prominence).flatten().numpy()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.hist(counts, bins=np.arange(counts.max() + 2) - 0.5, color="tab:blue", rwidth=0.85)
    ax.set_xlabel("peaks per map")
    ax.set_ylabel("maps")
    ax.set_title(f"{title}: mean {counts.mean():.2f}", fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi=80)


def figure_part_assignment(extra: dict, path: Path, title: str) -> None:
    """``A[c, k]`` as an image, channels sorted by dominant part then by its share."""
    assignment = metrics.part_assignment(extra["iou"]).nan_to_num(0).numpy()
    order = np.lexsort((-assignment.max(1), assignment.argmax(1)))
    fig, ax = plt.subplots(figsize=(4, 3.2))
    image = ax.imshow(assignment[order].T, aspect="auto", cmap="magma", vmin=0, vmax=1,
                      interpolation="nearest")
    ax.set_yticks(range(len(extra["parts"])), extra["parts"], fontsize=8)
    ax.set_xlabel("channel (sorted by dominant part)")
    ax.set_title(f"{title}: A[c, k]", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    _save(fig, path, dpi=80)


# ---------------------------------------------------------------------------- entry points


def describe(config, calibrated_tau: float | None = None, map_size: int | None = None) -> dict:
    """The run's settings that identify it in a report; ``calibrated_tau`` is the tau that
    ``ecloss.tau=auto`` chose (the checkpoint's ``calibrated_tau``), ``map_size`` the side
    of the target maps."""
    m, e = config.model, config.ecloss
    loss = "ECLoss" if e.enabled else "Softmax"
    network = f"{m.arch.upper()}{'-BN' if m.batch_norm else ''}"
    if m.width != 1.0:
        network += f" x{m.width:g}"
    return dict(network=network, loss=loss, label=f"{network} + {loss}", input_size=m.input_size,
                map_size=map_size, width=m.width, head=config.head.kind,
                ecloss=dict(enabled=e.enabled, templates=e.templates, estimator=e.estimator, tau=e.tau,
                            calibrated_tau=calibrated_tau, score_spread=e.score_spread,
                            radius=e.radius, diversity=e.diversity, normalize=e.normalize),
                beta=dict(schedule=config.beta.schedule, grad_ratio=config.beta.grad_ratio,
                          value=config.beta.value))


DEFAULT_DATA = {"synthetic": "synthetic", "synthetic_jitter": "synthetic_jitter"}


def evaluate_model(model, config, out: str | Path, data: dict[str, str] | None = None,
                   settings: EvalSettings | None = None, device="cpu", title: str | None = None,
                   run_dir: str | Path | None = None, calibrated_tau: float | None = None) -> dict:
    """Compute every metric on every data set, write ``out/metrics.json`` and the figures.

    ``data`` maps names to the ``--data`` paths (default: the held-out synthetic faces,
    aligned and jittered, as ``synthetic`` and ``synthetic_jitter``); ``run_dir``, the
    training run, lets ``train.report`` draw its training curves; ``calibrated_tau`` (the
    checkpoint's, for ``ecloss.tau=auto``) goes into the run's description.
    """
    settings = settings or EvalSettings()
    data = data or DEFAULT_DATA
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    info = describe(config, calibrated_tau, model.map_size)
    title = title or info["label"]
    results = {"run": info, "run_dir": str(run_dir) if run_dir else None, "settings": vars(settings),
               "datasets": {}, "figures": {}}
    for name, path in data.items():
        sources = _open_data(name, path, config, settings)
        entry = {}
        if "pairs" in sources:
            from train.verification import pair_accuracy

            entry["verification"] = pair_accuracy(model, sources["pairs"], settings.batch_size,
                                                   settings.folds, device)
        dataset = sources.get("parts") or sources.get("images")
        extra = None
        if dataset is not None:
            with_parts = "parts" in sources
            scores, extra = _explainability(model, dataset, settings, device, with_parts,
                                            sources.get("erased"))
            entry.update(scores)
        elif "pairs" in sources:  # robustness on the pair images (Table 5's LFW, CFP, AgeDB)
            from train.data.image import normalize

            images = sources["pairs"].images
            draws = _draws(len(images), settings)
            used = np.unique(np.concatenate(draws))
            maps = _maps(model, torch.stack([normalize(images[i]) for i in used]), settings.batch_size, device)
            entry.update(_robustness(maps, settings, draws, {int(i): k for k, i in enumerate(used)}))
        results["datasets"][name] = entry
        if extra is not None and name == next(iter(data)):
            figures = {}
            if "iou" in extra:
                figures["top_activation"] = "fig6_top_activation.png"
                results["figure_channels"] = figure_top_activation(
                    extra, settings, out / figures["top_activation"], title)
                figures["part_assignment"] = "part_assignment.png"
                figure_part_assignment(extra, out / figures["part_assignment"], title)
                figures["channel_parts"] = "channel_parts.png"
                figure_channel_parts(extra, settings, out / figures["channel_parts"], title)
            figures["maps_with_peaks"] = "fig5_maps_peaks.png"
            figure_maps_with_peaks(extra, settings, out / figures["maps_with_peaks"], title)
            figures["peak_histogram"] = "peaks_histogram.png"
            figure_peak_histogram(extra, settings, out / figures["peak_histogram"], title)
            results["figures"] = figures
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    return results


def first_draw(model, config, settings: EvalSettings, data: str = "synthetic_jitter",
               device="cpu") -> dict:
    """The images of the first draw of the held-out synthetic faces ``data`` that
    :func:`evaluate_model` draws with ``settings`` -- those its tracking metrics score --
    with ``model``'s maps of them: ``{"image", "part_masks", "label", "maps", "parts",
    "indices"}`` (``indices``: the faces' indices in the held-out set). For figures and
    measurements beside the evaluation, on the very faces it scored."""
    if data not in SYNTHETIC:
        raise ValueError(f"data must be one of {sorted(SYNTHETIC)}, got {data!r}")
    dataset = _synthetic(config, settings, SYNTHETIC[data])["parts"]
    indices = _draws(len(dataset), settings)[0]
    batch = _gather(dataset, indices)
    batch.update(maps=_maps(model.to(device).eval(), batch["image"], settings.batch_size, device),
                 parts=tuple(dataset.parts), indices=indices)
    return batch


def evaluate_checkpoint(checkpoint, out, data=None, settings=None, device="auto") -> dict:
    """:func:`evaluate_model` of a checkpoint file or run directory."""
    from train.checkpoint import load_checkpoint, model_from_state, resolve_checkpoint

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path, map_location=device)
    model, config = model_from_state(state, device, path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return evaluate_model(model, config, out, data, settings, device, run_dir=run_dir,
                          calibrated_tau=state.get("calibrated_tau"))


def _data_argument(text: str) -> tuple[str, str]:
    if text in SYNTHETIC:
        return text, text
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, 'synthetic' or 'synthetic_jitter', "
                                         f"got {text!r}")
    return name, path


def _check_arguments(args, settings: EvalSettings) -> dict[str, str]:
    """The ``--data`` sets by name; ``ValueError`` or ``FileNotFoundError`` for a user error
    found without reading any data."""
    for name, value in vars(settings).items():
        low = 2 if name == "folds" else 0 if name == "permutations" else 1
        if isinstance(value, int) and name != "seed" and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if not 0 < settings.fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {settings.fraction}")
    if not settings.min_prominence >= 0:
        raise ValueError(f"--min-prominence must be >= 0, got {settings.min_prominence}")
    pairs = args.data or list(DEFAULT_DATA.items())
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--data: the name {', '.join(repeated)} is given more than once")
    data = dict(pairs)
    for name, path in data.items():
        _check_data_path(name, path)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError as error:
            raise ValueError(f"--device {args.device}: {error}") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: torch sees no CUDA device here")
    return data


def main(argv=None) -> dict:
    """The command line; a user error exits with status 2 after one ``error: ...`` line."""
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file or a run directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--data", action="append", type=_data_argument, default=None,
                        help="NAME=PATH, 'synthetic' or 'synthetic_jitter' (repeatable; "
                             "default: both synthetic sets)")
    parser.add_argument("--device", default="auto")
    defaults = EvalSettings()
    for field, value in vars(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}",
                            type=int if value is None else type(value), default=value)
    args = parser.parse_args(argv)
    settings = EvalSettings(**{f: getattr(args, f) for f in vars(defaults)})
    try:
        data = _check_arguments(args, settings)
        read_checkpoint(args.checkpoint)  # an unreadable one fails here, before any output
        results = evaluate_checkpoint(args.checkpoint, args.out, data, settings, args.device)
    except USER_ERRORS as error:
        raise SystemExit(report_user_error(error)) from None
    print(json.dumps(results["datasets"], indent=2))
    return results


if __name__ == "__main__":
    main()
