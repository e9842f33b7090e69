"""What ``python -m train`` and ``python -m train.evaluate`` share: user errors in one line.

A user error (a bad config key or value, a missing or unreadable file, bad data) is printed
as ``error: ...`` on stderr, without a traceback, and the exit status is 2, as
``python -m train.data`` and argparse's own usage errors do.
"""
from __future__ import annotations

import pickle
import re
import sys

from train.checkpoint import NonFiniteError, load_checkpoint, resolve_checkpoint
from train.data.image import BadDataError

__all__ = ["USER_ERRORS", "USER_ERROR_STATUS", "report_user_error", "read_checkpoint"]

# NonFiniteError: the run diverged (its settings, e.g. the learning rate, are the cause).
USER_ERRORS = (ValueError, OSError, BadDataError, NonFiniteError)
USER_ERROR_STATUS = 2
# How a DataLoader worker's exception reaches the main process: the worker's traceback in
# the message (torch.utils.data's ExceptionWrapper).
_WORKER_TRACEBACK = re.compile(r"Caught \w+ in DataLoader worker process (\d+)\.\n"
                               r"Original Traceback", re.S)


def report_user_error(error: BaseException) -> int:
    """Print ``error: <message>`` to stderr, in one line (an error raised in a DataLoader
    worker without the worker's traceback); returns the exit status for it."""
    message = str(error)
    worker = _WORKER_TRACEBACK.match(message)
    if worker:
        last = message.rstrip().splitlines()[-1]  # "module.Type: the error's own message"
        message = f"{last.split(': ', 1)[-1]} (in DataLoader worker {worker.group(1)})"
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR_STATUS


def read_checkpoint(path, map_location="cpu", *, resume: bool = False) -> dict:
    """:func:`train.checkpoint.load_checkpoint`, with a file torch cannot read (truncated,
    not a checkpoint) raised as ``ValueError`` naming it."""
    checkpoint = resolve_checkpoint(path)
    try:
        return load_checkpoint(checkpoint, map_location, resume=resume)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as error:
        if str(checkpoint) in str(error):  # load_checkpoint's own message names the file
            raise
        # torch.load's do not: "invalid load key", "Ran out of input", "failed finding
        # central directory", even "invalid literal for int()" for a text file.
        raise ValueError(f"{checkpoint} is not a readable checkpoint: {error}") from error
