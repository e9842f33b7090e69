"""Run logs: ``log.csv`` (one row per logged step) and TensorBoard events, rank 0 only; the
console and ``train.log``; the progress bar's summary of a row.

A row's ``loss``, ``ce``, ``ecloss`` and ``grad_norm`` are means over the interval's steps
that were applied; when every step of the interval was skipped as non-finite they are
blank (``None``: an empty field in ``log.csv``, no TensorBoard point), never 0.
``skipped_steps`` counts the run's skipped steps so far.
"""
from __future__ import annotations

import csv
import io
import logging
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["RunLog", "CSV_FIELDS", "console_logger", "release_console_logger", "record_error",
           "interval_means", "progress_postfix", "LogInterval", "IntervalMeans"]

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


def record_error(logger: logging.Logger, error: BaseException) -> None:
    """Write ``error`` to the run's ``train.log`` only: the command line prints it to the
    console itself, as its one ``error:`` line."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (error,), None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def interval_means(sums: dict, applied_steps: float) -> dict:
    """``sums`` (over an interval's applied steps) divided by their count; ``None`` for
    each when no step was applied."""
    if applied_steps == 0:
        return {key: None for key in sums}
    return {key: total / applied_steps for key, total in sums.items()}


class IntervalMeans(NamedTuple):
    """A log interval over every rank (:meth:`LogInterval.means`)."""

    losses: dict  # loss, ce, ecloss, grad_norm: means over the applied steps (interval_means)
    applied_steps: float
    accuracy: float
    images_per_s: float
    diagnostics: dict  # the ECLoss diagnostics of the logged step, over the global batch
    stop: bool  # some rank asked to stop


class LogInterval:
    """The sums of a log interval's steps on one rank, kept on the device: adding a step
    reads nothing on the host; :meth:`means` reads the interval once."""

    def __init__(self, device: torch.device):
        zero = torch.zeros((), device=device, dtype=torch.float64)
        self.sums = {key: zero.clone() for key in ("loss", "ce", "ecloss", "correct", "grad_norm",
                                                    "finite_steps")}
        self.images = self.steps = 0
        self.start = time.perf_counter()

    def add(self, result: dict) -> None:
        """Add a step: its ``loss``, ``ce``, ``ecloss`` and ``grad_norm`` when it was applied
        (``finite``), its ``correct`` and ``images`` always."""
        finite = result["finite"]
        self.steps += 1
        self.images += result["images"]
        self.sums["correct"] += result["correct"]
        self.sums["finite_steps"] += finite
        for key in ("loss", "ce", "ecloss", "grad_norm"):
            self.sums[key] += torch.where(finite, result[key].double(), 0.0)

    def means(self, ctx, diagnostics: dict, stop: bool) -> IntervalMeans:
        """The interval over every rank of ``ctx`` with this rank's request to ``stop``, in
        one all-reduce: the interval's one host synchronisation.

        ``diagnostics`` are the ECLoss diagnostics of the logged step's call (device
        scalars), read in that all-reduce rather than with a synchronisation of their own.
        Each rank holds its maps' share, weighted as its loss is, so their mean over the
        ranks is the global batch's value.
        """
        sums = self.sums
        local = torch.stack([sums["loss"], sums["ce"], sums["ecloss"], sums["correct"],
                             sums["grad_norm"], sums["finite_steps"],
                             *diagnostics.values()]).to(torch.float64)
        host = torch.tensor([self.images, float(stop)], dtype=torch.float64, device=local.device)
        summed = ctx.all_reduce_sum(torch.cat([local, host])).tolist()
        loss, ce, ecl, correct, grad_norm, finite_steps = summed[:6]
        count = len(diagnostics)
        shares, (images, stops) = summed[6:6 + count], summed[6 + count:8 + count]
        elapsed = time.perf_counter() - self.start
        return IntervalMeans(
            interval_means({"loss": loss, "ce": ce, "ecloss": ecl, "grad_norm": grad_norm},
                           finite_steps),
            finite_steps, correct / max(images, 1), images / max(elapsed, 1e-9),
            {name: share / ctx.world_size for name, share in zip(diagnostics, shares)}, stops > 0)


def progress_postfix(row: dict) -> dict:
    """The progress bar's summary of a row: losses, accuracy, speed, the ECLoss diagnostics
    and verification scores (short names); "skipped" when no step of the interval was applied."""
    if row["loss"] is None:
        losses = {"skipped": f"all steps since the last row, {row['skipped_steps']} in the run"}
    else:
        losses = dict(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", ecl=f"{row['ecloss']:.3g}")
    names = {"mi_over_log_n": "mi", "max_p": "max_p", "score_std": "s_std"}
    diagnostics = {short: f"{row[name]:.3g}" for name, short in names.items() if name in row}
    verification = {name[7:]: f"{value:.3f}" for name, value in row.items()
                    if name.startswith("verify_")}
    return (losses | dict(acc=f"{row['accuracy']:.3f}", img_s=f"{row['images_per_s']:.0f}")
            | diagnostics | verification)


class RunLog:
    """Appends rows to ``log.csv`` and scalars to TensorBoard under ``<run dir>/tensorboard``.

    The columns are :data:`CSV_FIELDS` and then ``extra_fields`` (the run's verification
    sets, ``verify_<name>``: blank in the rows that did not score them). On resume from
    step ``k``, rows after ``k`` (written by the interrupted run after its last checkpoint)
    are dropped and TensorBoard purges its events after ``k``; so is a last line that a
    killed run left unfinished (with a warning), and any other line that is not a row is a
    ``ValueError`` naming the file and the line.
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
            rows = [row for row in self._rows() if int(row["step"]) <= resume_step]
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

    def _rows(self) -> list[dict]:
        """The rows of the existing ``log.csv``, without an unfinished last line."""
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            partial = text[text.rfind("\n") + 1:]
            logging.getLogger("train").warning("%s: dropped its unfinished last line %r (the "
                                               "run was killed while writing it)", self.path, partial)
            text = text[:len(text) - len(partial)]
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        for number, row in enumerate(rows, start=2):
            if not (row.get("step") or "").isdigit() or None in row.values():
                raise ValueError(f"{self.path}:{number}: not a row of this log ({row}); "
                                 "remove the line or the file to resume")
        return rows

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
