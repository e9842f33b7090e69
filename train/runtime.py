"""What a run sets for the whole process, and restores: its random streams (seeds derived
from several integers, the global generators seeded, their states saved in a checkpoint
and restored from it) and the global switches of :func:`global_switches`.

Per-step randomness that must replay on resume without any saved state (the flips)
draws from its own generator seeded by :func:`mix` of (seed, step, rank); the global
generators (the model's initialisation, dropout, partial FC's class sampling) are seeded
by (seed, rank) when a run starts and carried through checkpoints by :func:`rng_state`.
"""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

import ecloss_fast

__all__ = ["mix", "seed_everything", "rng_state", "set_rng_state", "global_switches", "autocast"]


def mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (numpy's SeedSequence hashing)."""
    words = np.random.SeedSequence(list(numbers)).generate_state(2, np.uint32)
    return int(words.view(np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (every device's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """The global generators' states: python, numpy, torch, and ``device``'s when CUDA."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore the states of :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def global_switches(deterministic: bool, device: torch.device):
    """PyTorch's deterministic algorithms (``train.deterministic``; cuDNN's benchmark
    otherwise) and, on the CPU, subnormal floats flushed to zero; the previous switches
    are restored on exit."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic
    try:
        # ECLoss's gradient carries tau / (B*C) * beta: on the CPU it turns into subnormal
        # floats in the backbone's backward, which made a step 50x slower (bench/NOTES.md).
        # In every intra-op thread: set_flush_denormal alone reaches the calling thread only.
        with ecloss_fast.flush_subnormals(device.type == "cpu"):
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]


def autocast(amp: str, device: torch.device):
    """The forward pass's context for ``train.amp``: ``"none"``, ``"bf16"`` or ``"fp16"``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
