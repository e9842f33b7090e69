"""Starting from a checkpoint: a resume (``train.resume``, the run's own checkpoint, in its
run directory) or a branch (``train.branch_from=RUN_DIR:STEP``, another run's checkpoint
of that step, into a new run directory, with this run's own config).

Either way the run continues everything the checkpoint holds (train/checkpoint.py):
weights, optimizer, schedules, calibrated tau, counters, position in the data and random
states, provided the config still defines the same parameters and samples
(:func:`check_resumable`); the data set is checked separately (``check_same_data``).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from train.checkpoint import load_checkpoint, step_checkpoint
from train.config import Config, branch_point, config_from_dict, config_to_dict
from train.runtime import mix, seed_everything, set_rng_state

__all__ = ["Start", "find_start", "check_resumable", "restore_position", "RESUMABLE_CHANGES"]


# Keys of the model, head and data sections that a resumed run may change; the others
# define the parameters and the samples and must match the checkpoint.
RESUMABLE_CHANGES = frozenset({"head.alpha", "head.sample_rate", "data.num_workers",
                               "data.on_bad_data"})


class Start(NamedTuple):
    """The checkpoint a run starts from."""

    state: dict
    origin: str | Path  # where the run names it: train.resume's value, or the branch's file
    branched: bool  # from train.branch_from (not a resume)


def find_start(config: Config) -> Start | None:
    """The checkpoint ``config`` starts from, checked to fit it; ``None`` for a new run.

    A resume of a branch reads the branch's own checkpoint: ``train.resume`` takes
    precedence over ``train.branch_from``.
    """
    run = config.train
    if run.resume:
        start = Start(load_checkpoint(run.resume, resume=True), run.resume, branched=False)
    elif run.branch_from is not None:
        path = step_checkpoint(*branch_point(run.branch_from))
        start = Start(load_checkpoint(path, resume=True), path, branched=True)
    else:
        return None
    check_resumable(start.state["config"], config, "branch" if start.branched else "resume")
    return start


def check_resumable(saved: dict, config: Config, verb: str = "resume") -> None:
    """``ValueError`` naming the key when ``config`` cannot continue a checkpoint trained
    with the config dict ``saved``: a key of the model, head or data sections outside
    :data:`RESUMABLE_CHANGES` differs (``verb``: "resume" or "branch", for the message)."""
    # Through Config, so that keys added after the checkpoint take their defaults.
    saved = config_to_dict(config_from_dict(saved))
    current = config_to_dict(config)
    for section in ("model", "head", "data"):
        for key, value in current[section].items():
            name = f"{section}.{key}"
            before = saved[section].get(key)
            # One file named two ways (a relative path from where the run started, an
            # absolute one now) is the same data; check_same_data checks its content.
            same_file = (name == "data.path" and value is not None and before is not None
                         and Path(value).resolve() == Path(before).resolve())
            if name not in RESUMABLE_CHANGES and before != value and not same_file:
                raise ValueError(f"cannot {verb}: {name} is {value!r} but the checkpoint "
                                 f"was trained with {before!r}")


def restore_position(state: dict, ctx, steps_per_epoch: int, global_batch: int, seed: int,
                     log) -> tuple[int, int, int]:
    """``(step, epoch, batch_in_epoch)`` to continue the checkpoint ``state`` from in the
    process group ``ctx``, with the random states restored: the rank's own when the number
    of processes is unchanged, else reseeded from (``seed``, rank, step)."""
    step, epoch = state["step"], state["epoch"]
    if state["world_size"] == ctx.world_size:
        batch_in_epoch = state["batch_in_epoch"]
        set_rng_state(state["rng"][ctx.rank], ctx.device)
    else:
        # Same samples seen (the order is global); the per-rank RNG streams cannot be
        # continued, so they restart from (seed, rank, step).
        seen = state["batch_in_epoch"] * state["world_size"]
        batch_in_epoch = seen // ctx.world_size
        seed_everything(mix(seed, ctx.rank, step))
        log.warning(
            "resuming with %d processes instead of %d: the global batch is now %d, the "
            "data order is kept, random streams are reseeded, and steps and the learning "
            "rate schedule count the new batches", ctx.world_size, state["world_size"],
            global_batch)
    if batch_in_epoch >= steps_per_epoch:
        epoch, batch_in_epoch = epoch + 1, 0
    log.info("resumed at step %d (epoch %d, batch %d)", step, epoch + 1, batch_in_epoch)
    return step, epoch, batch_in_epoch
