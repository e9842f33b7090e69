"""The weight ``beta`` of ECLoss in ``classification_loss + beta * ECLoss``, set automatically,
and the CPU switch that keeps ECLoss's tiny gradients from slowing training down.

The paper starts at ``beta = 1e-5``, "then automatically changed by the program", without
saying how. At the target layer the ECLoss gradient carries a factor ``tau / (B * C)``
(docs/design.md, section 2.4), so a fixed small ``beta`` leaves it many orders of magnitude
below the classification gradient, and a fixed large one overwhelms it once the maps
sharpen. :class:`GradientRatioBeta` ties ``beta`` to what decides its effect, the ratio of
the two gradients at a chosen tensor.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
from typing import Iterable, Iterator

import torch

__all__ = ["GradientRatioBeta", "flush_subnormals"]

_STATE_KEYS = ("log_beta", "measured_ratio", "measurements", "steps")


def _number(name: str, value, *, above: float, infinite_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    value = float(value)
    if not (value > above and (infinite_ok or math.isfinite(value))):
        finite = "" if infinite_ok else " and finite"
        raise ValueError(f"{name} must be above {above:g}{finite}; got {value}")
    return value


class GradientRatioBeta:
    """``beta`` such that ``beta * ||dECLoss/dz|| = ratio * ||dCE/dz||`` at a tensor ``z``.

    ``z`` is what :meth:`step` is given as ``at``: a parameter (the target convolution's
    weight, as the project's trainer uses) or a tensor of the graph (the maps themselves),
    or several of them (the norms are then over all of them). Every ``every``-th call of
    :meth:`step`, the first included, measures both gradient norms with
    ``torch.autograd.grad`` (leaving ``.grad`` alone) and moves ``beta`` towards the value
    that meets the ratio exactly, ``target = ratio * ||dCE/dz|| / ||dECLoss/dz||``:

    - upwards smoothly, ``log beta <- ema * log beta + (1 - ema) * log target`` (``beta``
      spans orders of magnitude: a geometric average keeps one noisy batch from
      dominating), and at most by the factor ``max_growth`` per measurement;
    - downwards at once, ``beta <- target``, when ``target`` is below half of ``beta``
      (ECLoss more than twice too strong);
    - never above ``max_value``: near a uniform template softmax (the start of training)
      the ECLoss gradient is tiny and the matching ``beta`` reaches 1e8-1e9, which
      overflowed the maps as soon as they sharpened (VGG16-BN, 7x7 maps, synthetic faces).

    It starts at ``initial`` (the paper's 1e-5). ``measured_ratio`` is the ratio that the
    ``beta`` in force achieved at the last measurement (NaN before the first).
    A measurement costs two backward passes from the losses down to ``z`` and a host
    synchronisation, hence every ``every`` steps rather than every step. Measurements with
    a zero or non-finite norm (an overflowing fp16 step) are ignored.

    Example, in any training loop::

        import torch.nn.functional as F
        import ecloss_fast as ef

        criterion = ef.ECLoss()
        auto_beta = ef.GradientRatioBeta(ratio=0.25, every=10)
        for images, labels in loader:
            maps, logits = model(images)        # maps: post-ReLU output of model.last_conv
            ce = F.cross_entropy(logits, labels)
            ecl = criterion(maps)
            beta = auto_beta.step(ce, ecl, at=model.last_conv.weight)
            optimizer.zero_grad()
            (ce + beta * ecl).backward()
            optimizer.step()
        checkpoint = {"model": model.state_dict(), "beta": auto_beta.state_dict()}

    Mixed precision: pass the losses as the backward pass scales them
    (``scaler.scale(ce)``); a common scale cancels in the ratio. Data parallelism:
    :meth:`step` measures this process's gradients; so that every process uses the same
    ``beta``, measure the norms of the gradients as they are combined (the mean over the
    processes for a parameter) and give them to :meth:`observe`, as ``train/trainer.py``
    does. On the CPU, train under :func:`flush_subnormals`.
    """

    def __init__(self, ratio: float = 0.25, *, every: int = 10, initial: float = 1e-5,
                 ema: float = 0.9, max_growth: float = 2.0, max_value: float = 1e5):
        self.ratio = _number("ratio", ratio, above=0.0)
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError(f"every must be an int; got {type(every).__name__}")
        if every < 1:
            raise ValueError(f"every must be at least 1; got {every}")
        self.every = every
        initial = _number("initial", initial, above=0.0)
        if isinstance(ema, bool) or not isinstance(ema, (int, float)):
            raise TypeError(f"ema must be a number; got {type(ema).__name__}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1) (1 would never move beta); got {ema}")
        self.ema = float(ema)
        self.max_growth = _number("max_growth", max_growth, above=1.0, infinite_ok=True)
        self.max_value = _number("max_value", max_value, above=0.0, infinite_ok=True)
        if initial > self.max_value:
            raise ValueError(f"initial ({initial:g}) must not exceed max_value "
                             f"({self.max_value:g})")
        self.log_beta = math.log(initial)
        self.measured_ratio = math.nan
        self.measurements = 0  # measurements used
        self.steps = 0  # calls of step()

    @property
    def value(self) -> float:
        """The current ``beta``."""
        return math.exp(self.log_beta)

    @staticmethod
    def achieved_ratio(beta: float, classification_grad_norm: float,
                       ecloss_grad_norm: float) -> float | None:
        """``beta * ecloss_grad_norm / classification_grad_norm``, or ``None`` when either
        norm is zero or not finite (the measurement says nothing)."""
        norms = (classification_grad_norm, ecloss_grad_norm)
        if not all(math.isfinite(norm) and norm > 0 for norm in norms):
            return None
        return beta * ecloss_grad_norm / classification_grad_norm

    @staticmethod
    def gradient_norms(classification_loss: torch.Tensor, ecloss: torch.Tensor,
                       at: torch.Tensor | Iterable[torch.Tensor]) -> tuple[float, float]:
        """``(||dCE/dz||, ||dECLoss/dz||)`` over the tensors ``at``; keeps both graphs."""
        tensors = [at] if isinstance(at, torch.Tensor) else list(at)
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("at must be a tensor or a non-empty sequence of tensors; "
                            f"got {type(at).__name__}")
        norms = []
        for name, loss in (("classification_loss", classification_loss), ("ecloss", ecloss)):
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"{name} must be a scalar tensor; got {type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(f"{name} must be a scalar tensor; got shape {tuple(loss.shape)}")
            if not loss.requires_grad:
                raise ValueError(f"{name} does not require grad: it was computed without a graph")
            grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
            if all(grad is None for grad in grads):
                raise ValueError(f"{name} does not depend on at")
            squares = [grad.double().square().sum() for grad in grads if grad is not None]
            norms.append(torch.stack(squares).sum().sqrt())
        classification_norm, ecloss_norm = torch.stack(norms).tolist()  # one host sync
        return classification_norm, ecloss_norm

    def observe(self, classification_grad_norm: float, ecloss_grad_norm: float) -> bool:
        """Update ``beta`` from two gradient norms measured at the same tensor; returns
        whether the measurement was used."""
        measured = self.achieved_ratio(self.value, classification_grad_norm, ecloss_grad_norm)
        if measured is None:
            return False
        self.measured_ratio = measured
        target = math.log(self.ratio * classification_grad_norm / ecloss_grad_norm)
        if target < self.log_beta - math.log(2):
            self.log_beta = target  # ECLoss more than twice too strong: at once
        else:
            smoothed = self.ema * self.log_beta + (1 - self.ema) * target
            self.log_beta = min(smoothed, self.log_beta + math.log(self.max_growth))
        self.log_beta = min(self.log_beta, math.log(self.max_value))
        self.measurements += 1
        return True

    def step(self, classification_loss: torch.Tensor, ecloss: torch.Tensor,
             at: torch.Tensor | Iterable[torch.Tensor]) -> float:
        """``beta`` for this training step; measures first on every ``every``-th call.

        Call it once per step, after both losses and before their backward pass.
        """
        if self.steps % self.every == 0:
            self.observe(*self.gradient_norms(classification_loss, ecloss, at))
        self.steps += 1
        return self.value

    def state_dict(self) -> dict:
        """What changes during training (the settings come from the constructor)."""
        return {"log_beta": self.log_beta, "measured_ratio": self.measured_ratio,
                "measurements": self.measurements, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"state is missing {', '.join(missing)}; expected the keys of "
                             "GradientRatioBeta.state_dict()")
        self.log_beta = float(state["log_beta"])
        self.measured_ratio = float(state["measured_ratio"])
        self.measurements, self.steps = int(state["measurements"]), int(state["steps"])

    def __repr__(self) -> str:
        return (f"GradientRatioBeta(ratio={self.ratio:g}, every={self.every}, "
                f"value={self.value:.3g}, ema={self.ema:g}, max_growth={self.max_growth:g}, "
                f"max_value={self.max_value:g})")


def _flushes_subnormals() -> bool:
    """torch has a setter for flush-to-zero but no getter: a subnormal times one tells."""
    return (torch.tensor(1e-40) * 1.0).item() == 0.0


@functools.lru_cache(maxsize=1)
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime that runs PyTorch's intra-op threads, if one is loaded (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps
                     if any(name in line for name in ("libgomp", "libiomp", "libomp"))}
    except OSError:
        return None
    for path in sorted(paths):
        library = ctypes.CDLL(path)
        if hasattr(library, "GOMP_parallel"):  # libgomp's; LLVM's and Intel's export it too
            library.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
                                              ctypes.c_uint]
            return library
    return None


_ThreadBody = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _set_flush(enabled: bool) -> bool:
    """Set flush-to-zero in this thread and in every intra-op thread; whether it is supported."""
    supported = torch.set_flush_denormal(enabled)
    runtime = _openmp_runtime() if torch.get_num_threads() > 1 else None
    if supported and runtime is not None:
        body = _ThreadBody(lambda _: torch.set_flush_denormal(enabled))
        # A parallel region of the runtime's own thread team: each thread sets its flag.
        runtime.GOMP_parallel(ctypes.cast(body, ctypes.c_void_p), None,
                              torch.get_num_threads(), 0)
    return supported


@contextlib.contextmanager
def flush_subnormals(enabled: bool = True) -> Iterator[bool]:
    """Flush subnormal floats to zero on the CPU inside the block; restores the previous
    setting after it. Yields whether the CPU supports it (see ``torch.set_flush_denormal``).

    ECLoss's gradient is small (``tau / (B*C)`` times ``beta``), and through a backbone's
    backward pass it reaches subnormal floats, which x86 CPUs process tens of times slower
    than normal ones (GPUs do not slow down). ``torch.set_flush_denormal(True)`` alone sets
    the flag of the calling thread only: PyTorch's other intra-op (OpenMP) threads keep
    the subnormals. This sets it in every thread of PyTorch's OpenMP team as well; call it
    after ``torch.set_num_threads``. Flushed values are below 1.2e-38 (float32), far below
    anything a loss needs. docs/design.md section 4.5 has what it saves, measured.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool; got {type(enabled).__name__}")
    previous = _flushes_subnormals()
    supported = _set_flush(enabled)
    try:
        yield supported
    finally:
        _set_flush(previous)
