"""Checkpoints: atomic, one file for any number of processes, enough to resume exactly.

A checkpoint is a ``torch.save`` dict::

    version, step, epoch, batch_in_epoch, world_size, config (nested dict),
    model, head (state dicts without DDP's "module." prefix), optimizer, scheduler,
    scaler, beta, calibrated_tau (ecloss.tau=auto: the tau of the run's first batch, else
    None; absent from older checkpoints), rng (one entry per rank: python, numpy, torch,
    cuda states)

It is written to a temporary file in the same directory, flushed to disk and renamed over
the target with ``os.replace``, so a run killed while saving leaves the previous file
intact. Only rank 0 writes; the other ranks' RNG states travel to it by ``all_gather``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "resolve_checkpoint",
           "load_for_eval", "model_from_state"]

CHECKPOINT_VERSION = 1


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file itself, or ``<run dir>/checkpoints/last.pt`` for a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint dict; ``path`` may be a run directory (see :func:`resolve_checkpoint`)."""
    path = resolve_checkpoint(path)
    # weights_only=False: the checkpoint holds numpy and python RNG states, and it is the
    # user's own file. Never load checkpoints from untrusted sources.
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a checkpoint of this trainer (version {CHECKPOINT_VERSION})")
    return state


def load_for_eval(path: str | os.PathLike, device="cpu"):
    """``(model, config)``: the trained :class:`models.FaceNet` in eval mode and its Config."""
    return model_from_state(load_checkpoint(path, map_location=device), device)


def model_from_state(state: dict, device="cpu"):
    """``(model, config)`` of a loaded checkpoint dict, as :func:`load_for_eval`."""
    from models import build_model
    from train.config import config_from_dict

    config = config_from_dict(state["config"])
    m = config.model
    model = build_model(m.arch, batch_norm=m.batch_norm, width=m.width, input_size=m.input_size,
                        embedding_dim=m.embedding_dim, dropout=m.dropout,
                        drop_last_pool=m.drop_last_pool)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config
