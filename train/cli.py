"""What ``python -m train`` and ``python -m train.evaluate`` share: user errors in one line.

A user error (a bad config key or value, a missing or unreadable file, bad data) is printed
as ``error: ...`` on stderr, without a traceback, and the exit status is 2, as
``python -m train.data`` and argparse's own usage errors do.
"""
from __future__ import annotations

import pickle
import sys

from train.checkpoint import load_checkpoint, resolve_checkpoint
from train.data.image import BadDataError

__all__ = ["USER_ERRORS", "USER_ERROR_STATUS", "report_user_error", "read_checkpoint"]

USER_ERRORS = (ValueError, OSError, BadDataError)
USER_ERROR_STATUS = 2


def report_user_error(error: BaseException) -> int:
    """Print ``error: <message>`` to stderr; returns the exit status for it."""
    print(f"error: {error}", file=sys.stderr)
    return USER_ERROR_STATUS


def read_checkpoint(path, map_location="cpu") -> dict:
    """:func:`train.checkpoint.load_checkpoint`, with a file torch cannot read (truncated,
    not a checkpoint) raised as ``ValueError`` naming it."""
    checkpoint = resolve_checkpoint(path)
    try:
        return load_checkpoint(checkpoint, map_location)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as error:
        if str(checkpoint) in str(error):  # load_checkpoint's own message names the file
            raise
        # torch.load's do not: "invalid load key", "Ran out of input", "failed finding
        # central directory", even "invalid literal for int()" for a text file.
        raise ValueError(f"{checkpoint} is not a readable checkpoint: {error}") from error
