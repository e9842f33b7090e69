"""Data sources for the trainer: synthetic faces, image folders and InsightFace RecordIO.

Every source yields ``dict(image=float32 (3, S, S), label=int, ...)`` items and has a
``num_classes`` attribute; :func:`build_dataset` picks one from a
:class:`train.config.DataConfig`.
"""
from __future__ import annotations

import torch

from train.data.image import BadDataError

__all__ = ["BadDataError", "build_dataset", "collate_faces"]


def build_dataset(config, size: int):
    """The dataset that ``config`` (a ``DataConfig``) names, at ``size x size`` pixels."""
    if config.source == "synthetic":
        from train.data.synthetic import SyntheticFaces
        return SyntheticFaces(config.num_identities, config.images_per_identity, size=size,
                              seed=config.seed, jitter=config.jitter, identity=config.identity)
    if config.source == "folder":
        from train.data.folder import ImageFolderFaces
        return ImageFolderFaces(config.path, size, on_bad_data=config.on_bad_data)
    from train.data.recordio import RecordIODataset
    return RecordIODataset(config.path, size=size, on_bad_data=config.on_bad_data,
                           num_classes=config.num_classes)


def collate_faces(items: list) -> dict:
    """Stack items into a batch, dropping the ``None`` of skipped bad data.

    The batch has the items' keys plus ``skipped``, the number dropped; when every item
    was bad it holds only ``skipped``.
    """
    kept = [item for item in items if item is not None]
    batch = torch.utils.data.default_collate(kept) if kept else {}
    batch["skipped"] = len(items) - len(kept)
    return batch
