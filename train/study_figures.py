"""The study report's figures: where each channel's maximum lands on held-out faces, and the
channels that track each part.

Both are drawn for one seed from the runs' final checkpoints on the faces their evaluation
scored the tracking metrics on (the first draw of the jittered held-out faces,
``EvalSettings.faces_seed = 1000 + seed``; :func:`train.evaluate.first_draw`); which
channels are confident and their normalised gains are the evaluation's own
(``metrics.json``), not recomputed. Where a map's maximum lands is read on the map
upsampled bilinearly to the faces' size, as the tracking metrics upsample it.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

__all__ = ["maximum_parts", "landing_fractions", "figure_landing", "figure_part_channels",
           "figures_markdown"]


def maximum_parts(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Where each map's maximum lands: int64 ``(B, C)``, the part ``k`` whose mask holds the
    maximum pixel of the map upsampled bilinearly to the masks' ``S x S``
    (``align_corners=False``; the first pixel on ties), ``K`` for a pixel of no part (the
    background), ``K + 1`` for a dead map (maximum <= 0, no place to land).

    ``maps`` ``(B, C, h, w)``; ``masks`` ``(B, K, S, S)`` bool, disjoint parts.
    """
    if maps.dim() != 4 or masks.dim() != 4 or maps.shape[0] != masks.shape[0]:
        raise ValueError(f"maps (B, C, h, w) and masks (B, K, S, S) of one batch expected, got "
                         f"shapes {tuple(maps.shape)} and {tuple(masks.shape)}")
    parts, size = masks.shape[1], masks.shape[-1]
    landed = torch.empty(maps.shape[:2], dtype=torch.int64)
    for b in range(maps.shape[0]):  # one image at a time: (C, S, S) floats at a time
        up = F.interpolate(maps[b:b + 1].float(), size=(size, size), mode="bilinear",
                           align_corners=False).flatten(2)[0]
        label = torch.full((size * size,), parts, dtype=torch.int64)
        for k in range(parts):
            label[masks[b, k].flatten().cpu()] = k
        landed[b] = label[up.argmax(-1).cpu()]
        landed[b, (maps[b].flatten(1).amax(-1) <= 0).cpu()] = parts + 1
    return landed


def landing_fractions(landed: torch.Tensor, parts: int) -> np.ndarray:
    """``(C, parts + 2)``: per channel, the fraction of images whose maximum lands in each
    part, the background and nowhere (dead), from :func:`maximum_parts`."""
    counts = torch.nn.functional.one_hot(landed, parts + 2).double().mean(0)
    return counts.numpy()


def _part_colours(parts) -> list:
    from train.data.synthetic import PART_COLOURS, PARTS

    colours = dict(zip(PARTS, PART_COLOURS / 255))
    return [colours.get(part, (0.5, 0.5, 0.5)) for part in parts]


def figure_landing(panels, parts, path: Path, title: str) -> None:
    """One panel per run: rows are channels (sorted by where their maximum lands most
    often), columns the parts, the background and dead; a cell's shade is the fraction of
    faces. Right of each panel, confident channels (the evaluation's) are marked in their
    preferred part's colour.

    ``panels``: ``(label, fractions (C, K + 2), confident (C,) bool, preferred (C,) int)``.
    """
    colours = _part_colours(parts)
    columns = list(parts) + ["background", "dead"]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels) + 0.8, 6.2), squeeze=False)
    image = None
    for ax, (label, fractions, confident, preferred) in zip(axes[0], panels):
        top = fractions.argmax(1)
        order = np.lexsort((-fractions.max(1), top))
        channels = len(order)
        marks = np.ones((channels, 1, 3))
        for row, channel in enumerate(order):
            if confident[channel] and preferred[channel] >= 0:
                marks[row, 0] = colours[preferred[channel]]
        image = ax.imshow(fractions[order], aspect="auto", cmap="Greys", vmin=0, vmax=1,
                          interpolation="nearest", extent=(-0.5, len(columns) - 0.5, channels - 0.5, -0.5))
        ax.imshow(marks, aspect="auto", interpolation="nearest",
                  extent=(len(columns) - 0.3, len(columns) + 0.5, channels - 0.5, -0.5))
        ax.set_xlim(-0.5, len(columns) + 0.5)
        ax.set_xticks(list(range(len(columns))) + [len(columns) + 0.1],
                      columns + ["confident"], rotation=90, fontsize=7)
        for tick, colour in zip(ax.get_xticklabels(), colours):
            tick.set_color(np.asarray(colour) * 0.8)
        ax.set_yticks([])
        ax.set_ylabel(f"{channels} channels", fontsize=7)
        ax.set_title(f"{label}\n{int(np.sum(confident))} confident", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02, pad=0.02, label="fraction of faces")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def _faces(images: torch.Tensor) -> np.ndarray:
    from train.data.image import denormalize

    return denormalize(images).numpy()


def figure_part_channels(panels, parts, path: Path, title: str) -> None:
    """Per part (rows), each run's channel of highest normalised gain on it, drawn on the
    same faces: the map upsampled to the face (opacity: its value over its maximum on
    that face), the part's outline in its colour, x where the maximum lands.

    ``panels``: ``(label, gain (C, K), confident (C,) bool, preferred (C,) int, maps
    (F, C, h, w), images (F, 3, S, S), masks (F, K, S, S))``, the same ``F`` faces each.
    """
    colours = _part_colours(parts)
    faces = panels[0][4].shape[0]
    # Each run's faces side by side, a narrow empty column between runs.
    ratios = ([1.0] * faces + [0.35]) * len(panels)
    fig, axes = plt.subplots(len(parts), len(ratios) - 1, squeeze=False,
                             figsize=(0.95 * sum(ratios[:-1]) + 0.9, 0.98 * len(parts) + 0.7),
                             gridspec_kw=dict(width_ratios=ratios[:-1], wspace=0.04, hspace=0.08,
                                              left=0.1, right=0.99, bottom=0.01, top=0.92))
    for ax in axes[:, faces::faces + 1].ravel():
        ax.set_axis_off()
    for column, (label, gain, confident, preferred, maps, images, masks) in enumerate(panels):
        pictures = _faces(images)
        size = images.shape[-1]
        up = F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False).numpy()
        first_column = column * (faces + 1)
        for k, part in enumerate(parts):
            channel = int(np.nan_to_num(gain[:, k], nan=-np.inf).argmax())
            tracks = bool(confident[channel]) and int(preferred[channel]) == k
            for f in range(faces):
                ax = axes[k, first_column + f]
                heat = up[f, channel]
                peak = heat.max()
                overlay = np.zeros(heat.shape + (4,))
                overlay[..., 0] = 1.0
                # Squared, so the map's high values stand out from its broad low ones.
                overlay[..., 3] = np.clip(heat / peak, 0, 1) ** 2 * 0.8 if peak > 0 else 0
                ax.imshow(pictures[f].mean(-1), cmap="gray", vmin=-40, vmax=300)
                ax.imshow(overlay)
                ax.contour(masks[f, k].numpy().astype(float), levels=[0.5], colors=[colours[k]],
                           linewidths=1.3)
                if peak > 0:
                    row, col = np.unravel_index(heat.argmax(), heat.shape)
                    ax.plot(col, row, marker="x", color="cyan", markersize=6, mew=2)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[k, first_column].set_ylabel(
                f"{part}\nch {channel}: {gain[channel, k]:+.2f}{' *' if tracks else ''}",
                fontsize=7, color=np.asarray(colours[k]) * 0.75)
        axes[0, first_column].set_title(label, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def _run_data(budget, record: dict, seed: int, device) -> dict:
    """The run's maps of its evaluation's first draw and its channels' tracking results."""
    from train.checkpoint import load_for_eval
    from train.evaluate import first_draw
    from train.study import eval_settings

    model, config = load_for_eval(record["run_dir"], device)
    drawn = first_draw(model, config, eval_settings(budget, seed), device=device)
    channels = record["metrics"][budget.eval_data[-1]]["tracking"]["channels"]
    parts = list(drawn["parts"])
    preferred = np.array([parts.index(p) if p is not None else -1 for p in channels["preferred_part"]])
    return dict(drawn=drawn, gain=np.array(channels["normalized_gain"], dtype=np.float64),
                confident=np.array(channels["confident"], dtype=bool), preferred=preferred)


def figures_markdown(budget, records: dict, arms, out: Path, faces: int = 4) -> list[str]:
    """Draw the figures into ``out/figures`` for one seed, the one most arms have (the
    arms without it are left out), and return the report's section."""
    from train.report import training_curves
    from train.study_cosine import distinct_identities

    def has_tracking(arm, seed):
        record = records.get(arm.name, {}).get(seed)
        return record is not None and "channels" in record["metrics"][budget.eval_data[-1]].get(
            "tracking", {})

    # The seed the most arms have (primary arms first: they go seed by seed), the lowest.
    seeds = sorted({seed for arm in arms for seed in records.get(arm.name, {})})
    if not seeds:
        return ["## Figures", "", "No evaluated run yet.", ""]
    seed = max(seeds, key=lambda s: (sum(has_tracking(arm, s) for arm in arms if arm.primary),
                                     sum(has_tracking(arm, s) for arm in arms), -s))
    tracked = [arm for arm in arms if has_tracking(arm, seed)]
    if not tracked:
        return ["## Figures", "", "No evaluated run with tracking metrics yet.", ""]
    device = "cuda" if budget.device == "auto" and torch.cuda.is_available() else (
        "cpu" if budget.device == "auto" else budget.device)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    data = {arm.name: _run_data(budget, records[arm.name][seed], seed, device) for arm in tracked}
    parts = data[tracked[0].name]["drawn"]["parts"]
    lines = [f"## Figures (seed {seed}, the faces each evaluation scored)", ""]
    primary = [arm for arm in tracked if arm.primary]
    if training_curves([(arm.label, Path(records[arm.name][seed]["run_dir"])) for arm in primary],
                       figures / "training_curves.png"):
        lines += ["Training of the primary arms:", "", "![training curves](figures/training_curves.png)", ""]
    landing = []
    for arm in tracked:
        run = data[arm.name]
        fractions = landing_fractions(maximum_parts(run["drawn"]["maps"], run["drawn"]["part_masks"]),
                                      len(parts))
        landing.append((arm.name, fractions, run["confident"], run["preferred"]))
    count = data[tracked[0].name]["drawn"]["maps"].shape[0]
    figure_landing(landing, parts, figures / "maximum_landing.png",
                   f"Where each channel's maximum lands on {count} held-out faces (seed {seed})")
    lines += ["### Per channel: where its maximum lands", "",
              f"Each row is a channel; each column a part (or the background, or dead: a map "
              f"without a positive value); the shade is the fraction of the {count} held-out "
              "faces on which the channel's maximum (its map upsampled to the face) falls "
              "there. Channels are sorted by where it falls most often. Right: the channels "
              "the evaluation found confident, in the colour of their preferred part.", "",
              "![where each channel's maximum lands](figures/maximum_landing.png)", ""]
    shown = distinct_identities(data[tracked[0].name]["drawn"]["label"], faces)
    panels = []
    for arm in primary:
        run = data[arm.name]
        drawn = run["drawn"]
        panels.append((arm.name, run["gain"], run["confident"], run["preferred"],
                       drawn["maps"][shown], drawn["image"][shown], drawn["part_masks"][shown]))
    if panels:
        figure_part_channels(panels, parts, figures / "part_channels.png",
                             f"Per part, the channel of highest normalised gain on it (seed {seed})")
        lines += ["### Per part: the channel that tracks it best", "",
                  f"For each part (rows) and each primary arm, the channel with the highest "
                  f"normalised tracking gain on that part (its gain beside its number; * when "
                  f"the channel is confident and prefers this part), on {len(shown)} held-out "
                  "faces of different identities: its map in red (opacity: value over the "
                  "map's maximum on that face), the part's outline, x at the maximum.", "",
                  "![per part, the channel that tracks it best](figures/part_channels.png)", ""]
    return lines
