"""The torch version the extension ``ecloss_fast._C`` was built against, read from its file.

setup.py compiles ``MARKER`` followed by ``torch.__version__`` and a NUL into the extension
(csrc/ops.cpp, ``ECLOSS_FAST_TORCH_VERSION``). Reading it from the file, without loading the
library, lets an extension built for another torch be reported and left unloaded (its C++
ABI need not match the running torch's), and lets setup.py rebuild it. Imports nothing of
ecloss_fast: setup.py loads this file by path.
"""
from __future__ import annotations

import mmap
import os

__all__ = ["MARKER", "recorded_torch_version"]

MARKER = b"ecloss-fast extension built against torch "


def recorded_torch_version(path: str | os.PathLike) -> str | None:
    """The torch version recorded in the extension at ``path``; ``None`` when the file does
    not record one (built before ecloss-fast recorded it) or is empty."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return None
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(MARKER)
            if start < 0:
                return None
            start += len(MARKER)
            end = data.find(b"\0", start)
            return data[start:end].decode("ascii", "replace")
