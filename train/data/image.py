"""Image decoding and normalisation shared by every data source.

The model takes ``float32 (3, S, S)`` images scaled as arcface_torch does:
``(pixel / 255 - 0.5) / 0.5``, so values lie in ``[-1, 1]``.
"""
from __future__ import annotations

import io
import logging

import numpy as np
import torch
from PIL import Image

__all__ = ["MEAN", "STD", "BadDataError", "handle_bad_data", "normalize", "denormalize",
           "decode_image"]

MEAN = 0.5
STD = 0.5


logger = logging.getLogger("train.data")


class BadDataError(RuntimeError):
    """A record or image that cannot be read; the message names its key or path."""


def handle_bad_data(error: BadDataError, on_bad_data: str) -> None:
    """``"stop"``: raise ``error``; ``"skip"``: report it and return ``None`` for the item.

    A ``None`` item is dropped by :func:`train.data.collate_faces`, which counts it.
    """
    if on_bad_data == "stop":
        raise error
    logger.warning("skipping bad data: %s", error)
    return None


def normalize(image: np.ndarray) -> torch.Tensor:
    """``uint8 (H, W, 3)`` to the model's ``float32 (3, H, W)`` input."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return (tensor / 255.0 - MEAN) / STD


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``(..., 3, H, W)`` model input to ``uint8 (..., H, W, 3)``."""
    pixels = ((images.float() * STD + MEAN) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return pixels.movedim(-3, -1)


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (PIL modes ``I;16*``, and ``I`` as older Pillows open 16-bit
    PNGs) scaled to 8 bits: ``convert("RGB")`` clips it instead, every value above 255
    white. Other images as they are."""
    if not image.mode.startswith("I"):
        return image
    grey = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8))


def decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    """Decode JPEG/PNG bytes to ``uint8 (size, size, 3)`` RGB, resizing if needed (16-bit
    greyscale scaled to 8 bits).

    ``where`` (a path or a record key) goes into the :class:`BadDataError` raised for data
    that does not decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = _eight_bit(image).convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            return np.array(image)  # a writable copy, as torch.from_numpy wants
    except Exception as error:  # PIL raises several types for corrupt data
        raise BadDataError(f"{where}: cannot decode image ({type(error).__name__}: {error})") \
            from error
