"""Face verification pairs: InsightFace ``.bin`` sets, LFW-style pair lists, synthetic pairs.

Every reader returns :class:`VerificationPairs`: ``images`` ``uint8 (2n, S, S, 3)`` with the
pairs interleaved (``images[2i]``, ``images[2i + 1]``) as InsightFace's ``.bin`` files
store them, and ``issame`` ``bool (n,)``. :func:`pair_accuracy` embeds both images of each
pair with flip augmentation and applies :func:`ecloss_fast.metrics.verification_accuracy`.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ecloss_fast.metrics import verification_accuracy
from train.data.image import BadDataError, decode_image, normalize

__all__ = ["VerificationPairs", "load_bin", "read_bin", "read_pairs_list", "synthetic_pairs",
           "embed", "pair_accuracy", "RunVerification"]


@dataclass
class VerificationPairs:
    """``images`` ``uint8 (2n, S, S, 3)``, pairs interleaved; ``issame`` ``bool (n,)``."""

    name: str
    images: np.ndarray
    issame: np.ndarray

    def __len__(self) -> int:
        return len(self.issame)


def load_bin(path) -> tuple[list[bytes], np.ndarray]:
    """The encoded images and ``issame`` of an InsightFace ``.bin`` file, undecoded.

    It is a pickled ``(bins, issame_list)``: ``bins`` holds ``2n`` encoded JPEG/PNG images
    as ``bytes`` or ``uint8`` arrays; Python 2 pickles load with ``encoding="bytes"``.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            bins, issame = pickle.load(handle, encoding="bytes")
        except Exception as error:  # pickle raises many types for a file that is not one
            raise BadDataError(f"{path}: not an InsightFace .bin file ({type(error).__name__}: {error})") \
                from error
    issame = np.asarray(issame, dtype=bool)
    if len(bins) != 2 * len(issame):
        raise BadDataError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected twice as many)")
    return [data if isinstance(data, bytes) else np.asarray(data, np.uint8).tobytes() for data in bins], issame


def read_bin(path, size: int, limit: int | None = None) -> VerificationPairs:
    """An InsightFace ``.bin`` file (``lfw.bin``, ``cfp_ff.bin``, ``calfw.bin``, ...), decoded.

    Images are resized to ``size`` (no alignment); ``limit`` keeps the first pairs only.
    See :func:`load_bin` for the format.
    """
    path = Path(path)
    bins, issame = load_bin(path)
    count = len(issame) if limit is None else min(limit, len(issame))
    images = np.stack([decode_image(data, size, f"{path}[{i}]")
                       for i, data in enumerate(tqdm(bins[:2 * count], desc=f"read {path.name}", leave=False))])
    return VerificationPairs(path.stem, images, issame[:count])


def read_pairs_list(pairs_file, image_root, size: int, limit: int | None = None) -> VerificationPairs:
    """LFW's ``pairs.txt`` over an image folder ``ROOT/NAME/NAME_0001.jpg``.

    Lines ``NAME I J`` are same-identity pairs, ``NAME1 I NAME2 J`` different ones; a
    header line of one or two integers (LFW's "10 300") is skipped.
    """
    root = Path(image_root)
    images, issame = [], []
    for line_number, line in enumerate(Path(pairs_file).read_text().splitlines(), 1):
        fields = line.split()
        if not fields or all(f.isdigit() for f in fields):
            continue
        if len(fields) == 3:
            pair, same = [(fields[0], fields[1]), (fields[0], fields[2])], True
        elif len(fields) == 4:
            pair, same = [(fields[0], fields[1]), (fields[2], fields[3])], False
        else:
            raise BadDataError(f"{pairs_file}:{line_number}: expected 3 or 4 fields, got {line!r}")
        for name, number in pair:
            path = root / name / f"{name}_{int(number):04d}.jpg"
            try:
                images.append(decode_image(path.read_bytes(), size, str(path)))
            except FileNotFoundError as error:
                raise BadDataError(f"{pairs_file}:{line_number}: missing image {path}") from error
        issame.append(same)
        if limit is not None and len(issame) >= limit:
            break
    return VerificationPairs(Path(pairs_file).stem, np.stack(images), np.array(issame))


def synthetic_pairs(faces, pairs: int, seed: int = 0) -> VerificationPairs:
    """Half same-identity, half different-identity pairs drawn from a ``SyntheticFaces`` set.

    Items ``i`` of the set belong to identity ``i // faces.images_per_identity``; the pairs
    alternate same and different, as InsightFace's sets do.
    """
    rng = np.random.default_rng(seed)
    per = faces.images_per_identity
    identities = len(faces) // per
    if per < 2 or identities < 2:
        raise ValueError("synthetic pairs need at least 2 identities with 2 images each")
    indices, issame = [], []
    for i in range(pairs):
        first = rng.integers(identities)
        if i % 2 == 0:
            a, b = rng.choice(per, 2, replace=False)
            indices += [first * per + a, first * per + b]
        else:
            second = (first + rng.integers(1, identities)) % identities
            indices += [first * per + rng.integers(per), second * per + rng.integers(per)]
        issame.append(i % 2 == 0)
    images = np.stack([faces.raw_image(int(i)) for i in indices])
    return VerificationPairs("synthetic", images, np.array(issame))


@torch.no_grad()
def embed(model, images: np.ndarray, batch_size: int = 64, flip: bool = True,
          device=None, desc: str = "embed") -> torch.Tensor:
    """Embeddings ``(n, d)`` of ``uint8 (n, S, S, 3)`` images, with the mirror's added if ``flip``."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        batch = torch.stack([normalize(image) for image in images[start:start + batch_size]]).to(device)
        embedding = model(batch).embedding
        if flip:
            embedding = embedding + model(batch.flip(-1)).embedding
        out.append(embedding.float().cpu())
    return torch.cat(out)


def pair_accuracy(model, pairs: VerificationPairs, batch_size: int = 64, folds: int = 10,
                  device=None) -> dict:
    """``{"accuracy": mean, "std": std, "pairs": n}`` over ``folds`` folds, flip augmentation."""
    embeddings = embed(model, pairs.images, batch_size, flip=True, device=device, desc=f"embed {pairs.name}")
    mean, std = verification_accuracy(embeddings[0::2], embeddings[1::2], pairs.issame, folds=folds)
    return {"accuracy": mean, "std": std, "pairs": len(pairs)}


class RunVerification:
    """A training run's ``train.verify`` sets, scored every ``every`` steps (at the next
    logged step) by rank 0 (the backbone is the same on every rank; the others go on to
    the next collective and wait there).

    Checked before the run starts: ``FileNotFoundError`` naming the missing files, then,
    where ``read`` (the scoring rank), each read at ``size`` and checked to hold the 10
    pairs that the 10-fold protocol needs at least.
    """

    def __init__(self, paths, every: int, size: int, read: bool):
        missing = [path for path in paths if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"train.verify: no file at {', '.join(missing)}")
        self.enabled, self.every, self.scored_at = bool(paths), every, 0
        self.sets = [read_bin(path, size) for path in paths] if read else []
        for path, pairs in zip(paths, self.sets):
            if len(pairs) < 10:
                raise ValueError(f"train.verify: {path} holds {len(pairs)} pairs; the 10-fold "
                                 "protocol needs at least 10")

    def due(self, step: int) -> bool:
        """Whether a multiple of ``every`` was passed since the last scores (or the start,
        ``scored_at``)."""
        return self.enabled and step // self.every > self.scored_at // self.every

    def scores(self, backbone, step: int, batch_size: int, device, log) -> dict:
        """``{"verify_<name>": accuracy}`` of ``backbone`` at ``step`` on each set (none
        on the other ranks), logged; the backbone is back in training mode afterwards."""
        self.scored_at = step
        if not self.sets:
            return {}
        try:
            scores = {f"verify_{pairs.name}": pair_accuracy(backbone, pairs, batch_size=batch_size,
                                                            device=device)["accuracy"]
                      for pairs in self.sets}
        finally:
            backbone.train()
        log.info("step %d: verification accuracy %s", step,
                 ", ".join(f"{name[7:]} {value:.4f}" for name, value in scores.items()))
        return scores
