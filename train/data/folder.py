"""An image folder with one sub-folder per identity: ``root/<identity>/<image>.jpg``."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from train.data.image import BadDataError, decode_image, handle_bad_data, normalize

__all__ = ["ImageFolderFaces", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolderFaces(torch.utils.data.Dataset):
    """Identities are the sub-folders of ``root`` in sorted order (label = position).

    Item -> ``dict(image=float32 (3, size, size), label=int)``. An image that does not
    decode raises :class:`BadDataError` naming its path (``on_bad_data="stop"``) or is
    reported and returned as ``None`` (``"skip"``), which :func:`train.data.collate_faces`
    drops.
    """

    def __init__(self, root: str | os.PathLike, size: int = 112, on_bad_data: str = "stop"):
        if on_bad_data not in ("skip", "stop"):
            raise ValueError(f"on_bad_data must be 'skip' or 'stop', got {on_bad_data!r}")
        self.root, self.size, self.on_bad_data = Path(root), size, on_bad_data
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(self.root / name)):
                self.samples.extend((os.path.join(dirpath, f), label) for f in sorted(files)
                                    if f.lower().endswith(IMAGE_SUFFIXES))
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in sub-folders of {self.root}")
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def sample_digest(self) -> str:
        """SHA-256 of the sample list: each image's path under the root and its label."""
        digest = hashlib.sha256()
        for path, label in self.samples:
            digest.update(f"{os.path.relpath(path, self.root)}\t{label}\n".encode())
        return digest.hexdigest()

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            image = decode_image(data, self.size, path)
        except OSError as error:
            return handle_bad_data(BadDataError(f"{path}: cannot read ({error})"), self.on_bad_data)
        except BadDataError as error:
            return handle_bad_data(error, self.on_bad_data)
        return dict(image=normalize(image), label=label)
