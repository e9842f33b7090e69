"""Running the kernels in Triton's interpreter from a process that imported Triton normally.

``@triton.jit`` decides at decoration time, from ``TRITON_INTERPRET``
(``triton.knobs.runtime.interpret``), whether it makes a compiled ``JITFunction`` or an
``InterpretedFunction``, and that includes Triton's own library: ``tl.sum``, ``tl.max`` and
``tl.zeros`` are ``@jit`` functions of ``triton.language.standard``. Once ``triton`` is
imported without the variable, setting it changes nothing, and which module a test run
imports first is not ours to decide. ``run_interpreted`` therefore runs a kernel's Python
source with Triton's interpreter (``InterpretedFunction``) and, for the duration of that
launch only, lets every ``JITFunction`` it calls (our helpers and Triton's library) run as
an ``InterpretedFunction`` too; that is what ``TRITON_INTERPRET=1`` at import time would
have built. A kernel that is interpreted already (its module was imported under
``TRITON_INTERPRET=1``) is launched as it is, under the same patch, since Triton's library
may have been imported before the variable was set.

Triton's interpreter (3.8; the releases up to ``LEAKING_BELOW``) also patches
``triton.language`` for every launch and every device-function call (``tl.sum``,
``tl.max``: ``InterpretedFunction.__call__`` opens a patch scope and never closes it), and
leaves the patches in place: a later ``triton.compile`` in the same process then builds
with the interpreter's ``cast`` and fails with "'ir.value' object has no attribute
'dtype'". On those releases ``run_interpreted`` puts back, after each launch, every name
the interpreter replaced in the namespaces it patches (``language_names`` and
``restore_language``, which the tests' isolation uses too). A release from
``LEAKING_BELOW`` on is assumed to clean up after itself;
tests/test_triton.py::test_interpreted_launch_leaves_triton_language_as_it_was fails if it
does not, and ``LEAKING_BELOW`` is then to be raised.
"""
from __future__ import annotations

import contextlib

__all__ = ["run_interpreted", "interpreter_leaks", "language_names", "restore_language",
           "LEAKING_BELOW"]

# The first Triton release not known to leave the interpreter's patches in place (3.8 leaves
# them; no later release has been tried).
LEAKING_BELOW = (3, 9)

# id(JITFunction) -> (that JITFunction, its InterpretedFunction). Keyed by identity: a
# JITFunction's own hash walks its source and fails while the interpreter patches Triton.
_TWINS: dict[int, tuple] = {}


def interpreter_leaks() -> bool:
    """Whether the installed Triton's interpreter leaves its patches in place (a release
    below ``LEAKING_BELOW``), so that ``run_interpreted`` must undo them."""
    import triton

    release = tuple(int(part) for part in triton.__version__.split(".")[:2])
    return release < LEAKING_BELOW


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


def language_names() -> list[tuple[object, dict]]:
    """Every name of the namespaces Triton's interpreter patches, with its value now."""
    return [(namespace, dict(vars(namespace))) for namespace in _patched_namespaces()]


def restore_language(names: list[tuple[object, dict]]) -> None:
    """Give every name of ``names`` (``language_names()``) its value there again.

    Names added since stay: the interpreter's rewritten functions, cached per function,
    look them up (and ``tl.semantic`` is a submodule the import system sets).
    """
    for namespace, values in names:
        current = vars(namespace)
        for name, value in values.items():
            if current.get(name) is not value:
                setattr(namespace, name, value)


@contextlib.contextmanager
def _language_restored():
    """On exit, every name of the patched namespaces is again what it was on entry."""
    names = language_names()
    try:
        yield
    finally:
        restore_language(names)


def run_interpreted(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` in Triton's interpreter.

    Tensors may live on the CPU (the interpreter copies CUDA tensors to the host and back).
    Launch options such as ``num_warps`` are accepted and ignored.
    """
    from triton.runtime.jit import JITFunction

    # A kernel module imported under TRITON_INTERPRET=1 is interpreted already, but Triton's
    # library may still be compiled (imported before the variable was set): patch anyway.
    interpreted = _interpreted_twin(kernel) if isinstance(kernel, JITFunction) else kernel
    restored = _language_restored() if interpreter_leaks() else contextlib.nullcontext()
    with restored, _jit_calls_interpreted():
        interpreted[grid](*args, **kwargs)
