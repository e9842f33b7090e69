"""Triton kernels of ECLoss, one per file, and how to run them in Triton's interpreter.

``row_stats``, ``column_sums``, ``row_prior`` and ``input_grad`` each hold one
``@triton.jit`` kernel; ``_tiles`` holds the helpers they share and ``configs`` the launch
configurations. The launchers live in ``ecloss_fast.backends.triton_fused``.

Interpreting in a process that imported Triton normally. ``@triton.jit`` decides at
decoration time, from ``TRITON_INTERPRET`` (``triton.knobs.runtime.interpret``), whether
it makes a compiled ``JITFunction`` or an ``InterpretedFunction``, and that includes
Triton's own library: ``tl.sum``, ``tl.max`` and ``tl.zeros`` are ``@jit`` functions of
``triton.language.standard``. Once ``triton`` is imported without the variable, setting it
changes nothing, and which module a test run imports first is not ours to decide.
``run_interpreted`` therefore runs a kernel's Python source with Triton's interpreter
(``InterpretedFunction``) and, for the duration of that launch only, lets every
``JITFunction`` it calls (our helpers and Triton's library) run as an
``InterpretedFunction`` too; that is what ``TRITON_INTERPRET=1`` at import time would have
built. A kernel that is interpreted already (its module was imported under
``TRITON_INTERPRET=1``) is launched as it is, under the same patch, since Triton's library
may have been imported before the variable was set.

Triton's interpreter (3.8) also patches ``triton.language`` for every launch and every
device-function call (``tl.sum``, ``tl.max``: ``InterpretedFunction.__call__`` opens a patch
scope and never closes it), and leaves the patches in place: a later ``triton.compile`` in
the same process then builds with the interpreter's ``cast`` and fails with "'ir.value'
object has no attribute 'dtype'". ``run_interpreted`` puts back, after each launch, every
name the interpreter replaced in the namespaces it patches.
"""
from __future__ import annotations

import contextlib

__all__ = ["run_interpreted"]

# id(JITFunction) -> (that JITFunction, its InterpretedFunction). Keyed by identity: a
# JITFunction's own hash walks its source and fails while the interpreter patches Triton.
_TWINS: dict[int, tuple] = {}


def _interpreted_twin(function):
    from triton.runtime.interpreter import InterpretedFunction

    if id(function) not in _TWINS:
        _TWINS[id(function)] = (function, InterpretedFunction(function.fn))
    return _TWINS[id(function)][1]


@contextlib.contextmanager
def _jit_calls_interpreted():
    """Within the block, calling a ``JITFunction`` (a device call) runs it interpreted.

    Outside a kernel such a call raises in Triton; inside an interpreted kernel it is the
    device-function call that an ``InterpretedFunction`` makes. Patching the class method
    for the block only is not thread-safe: interpreted launches are for tests on the CPU.
    """
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__

    def call_interpreted(self, *args, **kwargs):
        return _interpreted_twin(self)(*args, **kwargs)

    JITFunction.__call__ = call_interpreted
    try:
        yield
    finally:
        JITFunction.__call__ = original


def _patched_namespaces():
    """What Triton's interpreter patches: ``triton.language``, its core module, ``math``, and
    the core classes ``tensor``, ``dtype`` and ``tensor_descriptor_base``."""
    import triton.language as tl

    core = tl.core
    return [tl, core, tl.math, core.tensor, core.dtype, core.tensor_descriptor_base]


@contextlib.contextmanager
def _triton_language_restored():
    """On exit, every name of ``_patched_namespaces`` is again what it was on entry.

    Names the interpreter added stay: the interpreter's rewritten functions, cached per
    function, look them up (and ``tl.semantic`` is a submodule the import system sets).
    """
    saved = [(namespace, dict(vars(namespace))) for namespace in _patched_namespaces()]
    try:
        yield
    finally:
        for namespace, names in saved:
            current = vars(namespace)
            for name, value in names.items():
                if current.get(name) is not value:
                    setattr(namespace, name, value)


def run_interpreted(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` in Triton's interpreter.

    Tensors may live on the CPU (the interpreter copies CUDA tensors to the host and back).
    Launch options such as ``num_warps`` are accepted and ignored.
    """
    from triton.runtime.jit import JITFunction

    # A kernel module imported under TRITON_INTERPRET=1 is interpreted already, but Triton's
    # library may still be compiled (imported before the variable was set): patch anyway.
    interpreted = _interpreted_twin(kernel) if isinstance(kernel, JITFunction) else kernel
    with _triton_language_restored(), _jit_calls_interpreted():
        interpreted[grid](*args, **kwargs)
