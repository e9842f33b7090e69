"""Checkpoints: atomic, checksummed, one file for any number of processes, enough to resume
exactly; and the run directory's lock.

A checkpoint is a ``torch.save`` dict::

    version, step, epoch, batch_in_epoch, world_size, config (nested dict),
    model, head (state dicts without DDP's "module." prefix), optimizer, scheduler,
    scaler, beta, calibrated_tau (ecloss.tau=auto: the tau of the run's first batch, else
    None; absent from older checkpoints), rng (one entry per rank: python, numpy, torch,
    cuda states), data (the data set's identity: images, classes and a SHA-256 of its
    sample list; absent from older checkpoints), sha256 (see below)

It is written to a temporary file in the same directory, flushed to disk and renamed over
the target with ``os.replace``, so a run killed while saving leaves the previous file
intact (and a hidden ``.last.pt.*.tmp``, which the next run in that directory removes).
Only rank 0 writes; the other ranks' RNG states travel to it by ``all_gather``.

Before writing, every floating-point tensor is checked to be finite: a non-finite model is
never saved (:class:`NonFiniteError`). ``sha256`` is the SHA-256 of everything else in the
dict (:func:`payload_digest`: tensors by dtype, shape and bytes, other values pickled),
checked by :func:`load_checkpoint`, so a damaged file is refused instead of resumed or
evaluated. Checkpoints written before the checksum existed load without the check.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import tempfile
from pathlib import Path

import torch

__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "NonFiniteError", "RunInUseError", "RunLock",
           "save_checkpoint", "save_run_checkpoint", "load_checkpoint", "resolve_checkpoint",
           "step_checkpoint", "load_for_eval", "model_from_state", "payload_digest",
           "nonfinite_tensors", "check_writable", "remove_temporaries", "load_weights",
           "RESUME_KEYS", "MODEL_KEYS"]

CHECKPOINT_VERSION = 1
CHECKSUM_KEY = "sha256"
# What a checkpoint must hold to be evaluated, and to be resumed.
MODEL_KEYS = ("version", "config", "model")
RESUME_KEYS = MODEL_KEYS + ("step", "epoch", "batch_in_epoch", "world_size", "head", "optimizer",
                            "scheduler", "scaler", "beta", "rng", "skipped_steps", "skipped_images")
_TEMPORARY = ".*.tmp"  # what save_checkpoint and check_writable leave when killed


class CheckpointError(OSError):
    """A checkpoint that cannot be written or a folder that cannot hold one; the message
    names the file (and the step) and the cause."""


class NonFiniteError(FloatingPointError):
    """Training diverged: a non-finite model that is not saved, or too many non-finite
    steps in a row; the message names the last checkpoint that holds finite values."""


class RunInUseError(OSError):
    """Another process holds the run directory's lock."""


def payload_digest(state: dict) -> str:
    """SHA-256 of ``state`` without its ``sha256`` entry: tensors by dtype, shape and bytes
    (on the CPU, wherever they live), dicts and sequences entry by entry in order, any
    other value pickled. Equal for a dict and the same dict saved and loaded again."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in state.items() if key != CHECKSUM_KEY})
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(pickle.dumps(value, protocol=4))


def nonfinite_tensors(state, prefix: str = "") -> list[str]:
    """The dotted names of the floating-point tensors in ``state`` (nested dicts and
    lists) that hold a NaN or an infinity."""
    if isinstance(state, torch.Tensor):
        bad = state.is_floating_point() and not bool(torch.isfinite(state).all())
        return [prefix] if bad else []
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [name for key, value in items
            for name in nonfinite_tensors(value, f"{prefix}.{key}" if prefix else str(key))]


def _listed(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


class _RecordingWriter:
    """The file torch.save writes to, keeping the first ``OSError`` of a write: torch's
    zip writer swallows it and raises "unexpected pos", which names no cause."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


def _cause(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} (errno {error.errno})"
    return f"{type(error).__name__}: {error}"


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` with its checksum to ``path`` atomically (temporary file, fsync,
    ``os.replace``). :class:`NonFiniteError` before writing anything when a tensor is not
    finite; :class:`CheckpointError` naming the file, the step and the cause when the
    write fails (the previous file is then left as it was)."""
    path = Path(path)
    step = state.get("step", "?")
    bad = nonfinite_tensors(state)
    if bad:
        raise NonFiniteError(f"step {step}: not saving {path}: non-finite values in {_listed(bad)}")
    state = {**state, CHECKSUM_KEY: payload_digest(state)}
    temporary = writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                                 dir=path.parent)
        with os.fdopen(descriptor, "wb") as handle:
            writer = _RecordingWriter(handle)
            torch.save(state, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        temporary = None
    except (OSError, RuntimeError) as error:
        cause = writer.error if writer is not None and writer.error is not None else error
        raise CheckpointError(f"cannot save {path} at step {step}: {_cause(cause)}") from error
    finally:
        if temporary is not None:  # failed or interrupted: the previous file stays
            Path(temporary).unlink(missing_ok=True)
    return path


def save_run_checkpoint(state: dict, path: Path, keep: int = 0) -> None:
    """Write ``state`` to ``path`` (a run's ``checkpoints/last.pt``) and, when ``keep > 0``,
    beside it as ``step_<step>.pt`` too, keeping the newest ``keep`` of those."""
    save_checkpoint(state, path)
    if keep > 0:
        save_checkpoint(state, path.with_name(f"step_{state['step']:09d}.pt"))
        kept = sorted(path.parent.glob("step_*.pt"))
        for old in kept[:-keep]:
            old.unlink()


def check_writable(folder: str | os.PathLike) -> None:
    """:class:`CheckpointError` unless a checkpoint can be written in ``folder``: a file
    is created there as :func:`save_checkpoint` creates one, written, and removed."""
    folder = Path(folder)
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
        try:
            os.write(descriptor, b"\0")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
            os.unlink(probe)
    except OSError as error:
        raise CheckpointError(f"cannot write checkpoints in {folder}: {_cause(error)}") from error


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that runs killed while saving left in ``folder``;
    returns them. Call it only while holding the run's :class:`RunLock`."""
    leftovers = sorted(Path(folder).glob(_TEMPORARY))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


class RunLock:
    """An exclusive ``fcntl`` lock on ``<run dir>/.lock``, which holds the owner's process
    id; :class:`RunInUseError` naming that process when another one holds it. The kernel
    releases it when the process ends, however it ends."""

    NAME = ".lock"

    def __init__(self, run_dir: str | os.PathLike):
        run_dir = Path(run_dir)
        handle = open(run_dir / self.NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RunInUseError(f"{run_dir} is in use by process {owner}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file itself, or ``<run dir>/checkpoints/last.pt`` for a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def step_checkpoint(run_dir: str | os.PathLike, step: int) -> Path:
    """The checkpoint a run kept at ``step`` (``checkpoints/step_<step>.pt``, see
    ``train.keep_checkpoints``); ``FileNotFoundError`` naming the steps it kept."""
    checkpoints = Path(run_dir) / "checkpoints"
    path = checkpoints / f"step_{step:09d}.pt"
    if not path.is_file():
        kept = sorted(int(p.stem[5:]) for p in checkpoints.glob("step_*.pt") if p.stem[5:].isdigit())
        raise FileNotFoundError(f"no checkpoint of step {step} in {checkpoints} (kept steps: "
                                f"{', '.join(map(str, kept)) or 'none'})")
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, resume: bool = False) -> dict:
    """The checkpoint dict; ``path`` may be a run directory (see :func:`resolve_checkpoint`).

    ``ValueError`` naming the file when it is not a checkpoint of this trainer, lacks what
    evaluating (or, with ``resume``, resuming) needs, does not match its checksum, or holds
    non-finite values.
    """
    path = resolve_checkpoint(path)
    # weights_only=False: the checkpoint holds numpy and python RNG states, and it is the
    # user's own file. Never load checkpoints from untrusted sources.
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a checkpoint of this trainer (version {CHECKPOINT_VERSION})")
    missing = [key for key in (RESUME_KEYS if resume else MODEL_KEYS) if key not in state]
    if missing:
        raise ValueError(f"{path} is not a complete checkpoint: it lacks {', '.join(missing)}"
                         f"{' (needed to resume)' if resume else ''}")
    recorded = state.get(CHECKSUM_KEY)
    if recorded is not None and payload_digest(state) != recorded:
        raise ValueError(f"{path} is damaged: its content does not match the SHA-256 it was "
                         "saved with; use another checkpoint (e.g. a step_*.pt beside it)")
    bad = nonfinite_tensors({key: state[key] for key in ("model", "head", "optimizer")
                             if key in state})
    if bad:
        raise ValueError(f"{path} holds non-finite values in {_listed(bad)}: the run had "
                         "diverged when it was saved; use an earlier checkpoint")
    return state


def load_weights(module: torch.nn.Module, weights: dict, path, part: str) -> None:
    """``module.load_state_dict(weights)``, a mismatch raised as ``ValueError`` naming the
    checkpoint ``path`` and its ``part`` ("model", "head")."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"{path}: its {part} does not fit this model: "
                         f"{' '.join(str(error).split())}") from error


def load_for_eval(path: str | os.PathLike, device="cpu"):
    """``(model, config)``: the trained :class:`models.FaceNet` in eval mode and its Config."""
    return model_from_state(load_checkpoint(path, map_location=device), device, path)


def model_from_state(state: dict, device="cpu", path="the checkpoint"):
    """``(model, config)`` of a loaded checkpoint dict, as :func:`load_for_eval`."""
    from models import build_model
    from train.config import config_from_dict

    config = config_from_dict(state["config"])
    m = config.model
    model = build_model(m.arch, batch_norm=m.batch_norm, width=m.width, input_size=m.input_size,
                        embedding_dim=m.embedding_dim, dropout=m.dropout,
                        drop_last_pool=m.drop_last_pool)
    load_weights(model, state["model"], path, "model")
    return model.to(device).eval(), config
