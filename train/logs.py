"""Run logs: ``log.csv`` (one row per logged step) and TensorBoard events, rank 0 only."""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

__all__ = ["RunLog", "CSV_FIELDS", "console_logger", "release_console_logger"]

CSV_FIELDS = ("step", "epoch", "lr", "loss", "ce", "ecloss", "beta", "grad_ratio", "accuracy",
              "images_per_s", "grad_norm", "amp_scale", "skipped_steps", "skipped_images",
              "mi_over_log_n", "max_p", "score_std")


def console_logger(run_dir: Path | None, enabled: bool) -> logging.Logger:
    """The ``train`` logger during a run: to stderr and ``<run dir>/train.log`` on rank 0.

    Its children (``train.data`` reports bad records) go to the same places. Call
    :func:`release_console_logger` when the run ends.
    """
    logger = logging.getLogger("train")
    release_console_logger()
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if enabled and run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.propagate = False  # the run prints its own messages, once
    return logger


def release_console_logger() -> None:
    """Close the run's handlers and hand ``train`` messages back to the root logger."""
    logger = logging.getLogger("train")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


class RunLog:
    """Appends rows to ``log.csv`` and scalars to TensorBoard under ``<run dir>/tensorboard``.

    The columns are :data:`CSV_FIELDS` and then ``extra_fields`` (the run's verification
    sets, ``verify_<name>``: blank in the rows that did not score them). On resume from
    step ``k``, rows after ``k`` (written by the interrupted run after its last checkpoint)
    are dropped and TensorBoard purges its events after ``k``.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int | None,
                 extra_fields: tuple[str, ...] = ()):
        self.enabled = enabled
        self.writer = None
        self.fields = CSV_FIELDS + tuple(extra_fields)
        if not enabled:
            return
        self.path = run_dir / "log.csv"
        rows = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        with open(self.path, "w", newline="") as handle:
            # A resumed run may score other sets: their old columns go.
            writer = csv.DictWriter(handle, self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logging.getLogger("train").warning(
                    "TensorBoard is not installed (pip install tensorboard); logging to CSV only")
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                            purge_step=None if resume_step is None else resume_step + 1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.fields).writerow({k: row.get(k, "") for k in self.fields})
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    tag = (key.replace("verify_", "verify/", 1) if key.startswith("verify_")
                           else f"train/{key}")
                    self.writer.add_scalar(tag, value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
