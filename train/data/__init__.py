"""Data sources for the trainer: synthetic faces, image folders and InsightFace RecordIO.

Every source yields ``dict(image=float32 (3, S, S), label=int, ...)`` items and has a
``num_classes`` attribute and a ``sample_digest()`` (SHA-256 of what defines its samples);
:func:`build_dataset` picks one from a :class:`train.config.DataConfig`.
"""
from __future__ import annotations

import torch

from train.data.image import BadDataError

__all__ = ["BadDataError", "build_dataset", "collate_faces", "random_flips", "data_identity",
           "check_same_data"]


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


def random_flips(images: torch.Tensor, seed: int) -> torch.Tensor:
    """``images (B, C, H, W)``, each mirrored with probability 1/2: the coins come from a
    generator of their own seeded with ``seed``, so no random state is involved."""
    generator = torch.Generator().manual_seed(seed)
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def collate_faces(items: list) -> dict:
    """Stack items into a batch, dropping the ``None`` of skipped bad data.

    The batch has the items' keys plus ``skipped``, the number dropped; when every item
    was bad it holds only ``skipped``.
    """
    kept = [item for item in items if item is not None]
    batch = torch.utils.data.default_collate(kept) if kept else {}
    batch["skipped"] = len(items) - len(kept)
    return batch


def data_identity(dataset) -> dict:
    """What a checkpoint records of its data set: ``images``, ``classes`` and ``samples``,
    the SHA-256 of its sample list (``dataset.sample_digest()``)."""
    return {"images": len(dataset), "classes": dataset.num_classes,
            "samples": dataset.sample_digest()}


def check_same_data(saved: dict | None, current: dict, allow_change: bool, log) -> None:
    """``ValueError`` when a resumed run's data set (``current``, :func:`data_identity`) is
    not the checkpoint's (``saved``): another class count always (the classifier has one
    row per class), another sample list unless ``allow_change`` (then a warning on ``log``).
    Checkpoints that predate the record (``saved`` None) are not checked."""
    if saved is None or saved == current:
        return
    if saved["classes"] != current["classes"]:
        raise ValueError(f"cannot resume: the data set has {current['classes']} classes, the "
                         f"checkpoint's classifier {saved['classes']}; a resumed run keeps its "
                         "classes")
    change = (f"the data set changed since the checkpoint ({saved['images']} images then, "
              f"{current['images']} now"
              f"{', another sample list' if saved['images'] == current['images'] else ''})")
    if not allow_change:
        raise ValueError(f"cannot resume: {change}, so the samples and their order would differ; "
                         "give --allow-data-change (train.allow_data_change=true) to go on with it")
    log.warning("%s; going on with the new data (train.allow_data_change)", change)
