"""The run directory: where a run writes (``train.output_dir/train.run_name``, or the
resumed run's own), claimed by one run at a time (train/checkpoint.py's :class:`RunLock`),
with the fully resolved config as ``config.yaml``."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import yaml

from train.checkpoint import RunLock, check_writable, remove_temporaries, resolve_checkpoint
from train.config import Config, config_from_dict, config_to_dict

__all__ = ["RunDir", "open_run_dir", "claim_run_dir", "run_dir_of"]


class RunDir(NamedTuple):
    path: Path
    config: Config  # the run's config with train.run_name resolved
    lock: RunLock | None  # held by rank 0 only
    leftovers: list[Path]  # temporary files of an interrupted save, removed


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory of a checkpoint file (``<run dir>/checkpoints/<file>``, or the
    folder a checkpoint was copied to)."""
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder


def claim_run_dir(run_dir: Path, fresh: bool, config_text: str) -> tuple[RunLock, list[Path]]:
    """Lock ``run_dir`` for a run, check it and write its ``config.yaml``; returns the lock
    and the temporary files of an interrupted save that it removed (under the lock, so
    never a live run's).

    A new run's (``fresh``) must not hold a run yet, and its checkpoint folder must take a
    file: ``FileExistsError`` or :class:`train.checkpoint.CheckpointError` otherwise, the
    lock released.
    """
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    try:
        if fresh and (checkpoints / "last.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run: resume it with "
                                  f"--resume {run_dir} or choose another train.run_name")
        check_writable(checkpoints)
        leftovers = remove_temporaries(checkpoints)
        (run_dir / "config.yaml").write_text(config_text)
        return lock, leftovers
    except BaseException:
        lock.release()
        raise


def open_run_dir(config: Config, ctx, resumed: bool) -> RunDir:
    """The run directory of ``config``, the resumed run's when ``resumed``, claimed by
    rank 0 of ``ctx`` (:func:`claim_run_dir`); rank 0's ``OSError`` is raised on every rank."""
    run = config.train
    if resumed:
        path = run_dir_of(resolve_checkpoint(run.resume))
    else:
        name = run.run_name or ctx.broadcast_object(
            f"{config.model.arch}-{config.data.source}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        path = Path(run.output_dir) / name
    resolved = config_to_dict(config)
    resolved["train"]["run_name"] = path.name
    lock, leftovers, error = None, [], None
    if ctx.is_main:
        try:
            lock, leftovers = claim_run_dir(path, not resumed,
                                            yaml.safe_dump(resolved, sort_keys=False))
        except OSError as problem:
            error = problem
    error = ctx.broadcast_object(error)  # every rank stops on rank 0's error
    if error is not None:
        raise error
    return RunDir(path, config_from_dict(resolved), lock, leftovers)
