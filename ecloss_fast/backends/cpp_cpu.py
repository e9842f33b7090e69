"""Backend ``cpu``: the fused C++ kernels of csrc/cpu_kernels.cpp, float32 and float64.

Each function is one call of ``torch.ops.ecloss_fast_C.*`` (schema in csrc/ops.cpp), which
the extension ``ecloss_fast._C`` registers when imported: the contract of docs/design.md
section 9. ``precision="bf16" on float32 and bfloat16 maps uses bfloat16 products
(``vdpbf16ps``, float32 accumulation) where the CPU has AVX-512 BF16, and full float32
elsewhere; ``"ieee"`` and ``"tf32"`` compute in full float32 (float64 maps in float64).
float16 inputs run in float32 (``"fp16"``, the resolution of ``precision=None`` for float16
maps, which the extension does not name, is passed as ``"ieee"``). Packed copies of the
template matrix are kept between calls while the matrix lives unchanged.

The kernels are compiled for four instruction-set paths, ``ISA_PATHS``, and run the best
one this CPU has; the environment variable ``ECLOSS_FAST_CPU_ISA`` caps it (read at every
call, so a test or a user can force each path the CPU has). ``"avx512_bf16"`` differs from
``"avx512"`` only for ``precision="bf16"``.

``row_stats_with_scores`` and ``input_grad_from_scores`` give the op its kept-scores route
(docs/design.md section 9) where there are no more rows than pixels: training streams the
templates (965 MB at 28x28) twice, where the fused sweeps stream them 3 (uniform) or 4
times (marginal) and compute 3 or 5 GEMMs' products against 2.

``log_floored`` and ``weighted_log_sums`` are not of the backend contract: the op layer takes
the marginal estimator's logarithms of CPU tensors with them, whichever backend runs
(``ecloss_fast/_ops.py``).

The extension records the torch version it was built against (``ecloss_fast._build_info``);
one built against another torch is not loaded: ``availability`` and ``build_problem`` say
so and how to rebuild, and ``backend="auto"`` warns before running another backend.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ecloss_fast._build_info import recorded_torch_version
from ecloss_fast._precision import PRECISIONS, extension_precision

__all__ = ["availability", "supports", "build_problem", "row_stats", "row_stats_with_grad",
           "column_sums", "input_grad", "extension_error", "extension_torch_version", "TAKES",
           "ISA_PATHS", "ISA_VARIABLE", "isa_paths", "isa_in_use", "slower_here",
           "row_stats_with_scores", "input_grad_from_scores", "log_floored",
           "weighted_log_sums"]

ISA_VARIABLE = "ECLOSS_FAST_CPU_ISA"
ISA_PATHS = ("baseline", "avx2", "avx512", "avx512_bf16")

_BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` or "
               "`python setup.py build_ext --inplace` (needs a C++ compiler)")
_EXTENSION = "ecloss_fast._C"


def _extension_path() -> str | None:
    spec = importlib.util.find_spec(_EXTENSION)
    return None if spec is None else spec.origin


def _torch_mismatch(path: str | None) -> str | None:
    """Why the built extension at ``path`` must not be loaded: it records another torch."""
    built = None if path is None else recorded_torch_version(path)
    if built is None or built == torch.__version__:
        return None
    return (f"the C++ extension {_EXTENSION} ({path}) was built against torch {built}, but "
            f"torch {torch.__version__} is running, so it is not loaded (its C++ ABI need not "
            f"match); rebuild it for this torch with `python setup.py build_ext --inplace` "
            f"or `pip install --no-build-isolation -e .`")


# The extension's ops this module calls: a build from older sources may lack some.
_EXTENSION_OPS = ("row_stats", "row_stats_with_grad", "column_sums", "input_grad",
                  "row_stats_with_scores", "input_grad_from_scores", "cpu_isa_paths",
                  "cpu_isa", "set_cpu_isa", "log_floored", "weighted_log_sums")


def _other_sources() -> str | None:
    """Why the loaded extension does not fit this package's Python: its precision names
    (``precisions()``, from csrc/ecloss_precision.h) are not ``_precision.PRECISIONS``, or
    it lacks an op of ``_EXTENSION_OPS`` (a build older than this change of the sources, or
    names changed on one side only)."""
    ops = torch.ops.ecloss_fast_C
    names = tuple(ops.precisions()) if hasattr(ops, "precisions") else None
    missing = [name for name in _EXTENSION_OPS if not hasattr(ops, name)]
    if names == PRECISIONS and not missing:
        return None
    problem = (f"it has no {', '.join(missing)} (an older build)" if names == PRECISIONS
               else f"it names the precisions {names or '(no list: an older build)'}, the "
                    f"Python {PRECISIONS}")
    return (f"the C++ extension {_EXTENSION} does not match this package's Python: {problem}; "
            f"rebuild it with `python setup.py build_ext --inplace` or "
            f"`pip install --no-build-isolation -e .`")


def _import_extension() -> tuple[str | None, str | None]:
    """(why the extension is unavailable, why its build does not fit this process)."""
    mismatch = _torch_mismatch(_extension_path())
    if mismatch is not None:
        return mismatch, mismatch
    try:
        from ecloss_fast import _C  # noqa: F401  (importing registers the ops)
    except ImportError as error:
        return (f"the C++ extension {_EXTENSION} was not built or does not load ({error}); "
                f"{_BUILD_HINT}"), None
    mismatch = _other_sources()
    return mismatch, mismatch


extension_error, _build_problem = _import_extension()


def extension_torch_version() -> str | None:
    """The torch version the extension records (``None``: not built, or built before
    ecloss-fast recorded it)."""
    path = _extension_path()
    return None if path is None else recorded_torch_version(path)


def availability() -> str | None:
    return extension_error


def build_problem() -> str | None:
    """The extension's torch mismatch, if any (the contract's ``build_problem``)."""
    return _build_problem


TAKES = "CPU tensors of float16, bfloat16, float32 or float64, maps of any size"


def supports(device: torch.device, dtype: torch.dtype, pixels: int) -> bool:
    return torch.device(device).type == "cpu"


def isa_paths() -> list[str]:
    """The instruction-set paths this CPU (and build) has, lowest first."""
    return list(torch.ops.ecloss_fast_C.cpu_isa_paths())


_applied_isa: str | None = None  # the ECLOSS_FAST_CPU_ISA value the extension was last given


def _apply_isa_variable() -> None:
    """Give the extension the path ``ECLOSS_FAST_CPU_ISA`` names (unset or empty: the best),
    when the variable changed since the last call; a ``ValueError`` names the variable, its
    value and this CPU's paths for an unknown path or one this CPU lacks."""
    global _applied_isa
    requested = os.environ.get(ISA_VARIABLE, "")
    if requested == _applied_isa:
        return
    paths = isa_paths()
    if requested and requested not in paths:
        problem = (f"is not an instruction-set path (the paths are {', '.join(ISA_PATHS)})"
                   if requested not in ISA_PATHS else "names a path this CPU does not have")
        raise ValueError(f"{ISA_VARIABLE}={requested!r} {problem}; this CPU has: "
                         f"{', '.join(paths)} (unset it for the best, {paths[-1]!r})")
    torch.ops.ecloss_fast_C.set_cpu_isa(requested or paths[-1])
    _applied_isa = requested


def isa_in_use() -> str:
    """The path the kernels run: ``ECLOSS_FAST_CPU_ISA`` if set, else the best this CPU has."""
    _apply_isa_variable()
    return torch.ops.ecloss_fast_C.cpu_isa()


def slower_here() -> str | None:
    """The contract's ``slower_here``: on the baseline path the kernels have 4-wide vectors and
    no FMA, a quarter of the AVX2 path's flops per cycle, and ``torch`` (its BLAS) ran the
    paper setting about 2x faster (bench/NOTES.md, "auto on an AVX2 CPU")."""
    if isa_in_use() != "baseline":
        return None
    return ("its kernels run the baseline instruction-set path (no AVX2+FMA here, or "
            f"{ISA_VARIABLE}=baseline), where 'torch' is faster")


def row_stats(x, templates, tau, precision):
    _apply_isa_variable()
    return torch.ops.ecloss_fast_C.row_stats(x, templates, tau,
                                             extension_precision(precision, "ieee"))


def row_stats_with_grad(x, templates, tau, precision):
    _apply_isa_variable()
    return torch.ops.ecloss_fast_C.row_stats_with_grad(x, templates, tau,
                                                       extension_precision(precision, "ieee"))


def column_sums(x, templates, tau, row_max, log_sum, precision):
    _apply_isa_variable()
    return torch.ops.ecloss_fast_C.column_sums(x, templates, tau, row_max, log_sum,
                                               extension_precision(precision, "ieee"))


def input_grad(x, templates, tau, row_max, log_sum, neg_entropy, prior, row_weight, precision):
    _apply_isa_variable()
    return torch.ops.ecloss_fast_C.input_grad(x, templates, tau, row_max, log_sum, neg_entropy,
                                              prior, row_weight,
                                              extension_precision(precision, "ieee"))


def row_stats_with_scores(x, templates, tau, precision):
    _apply_isa_variable()
    return torch.ops.ecloss_fast_C.row_stats_with_scores(x, templates, tau,
                                                         extension_precision(precision, "ieee"))


def input_grad_from_scores(scores, templates, tau, row_max, log_sum, neg_entropy, prior,
                           row_weight, precision):
    _apply_isa_variable()
    return torch.ops.ecloss_fast_C.input_grad_from_scores(
        scores, templates, tau, row_max, log_sum, neg_entropy, prior, row_weight,
        extension_precision(precision, "ieee"))


def log_floored(probabilities, scale=None):
    """``scale[r] * log max(q[r, t], tiny)`` (``scale=None``: the logarithm) of a contiguous
    ``(R, N)`` float32 or float64 tensor, ``tiny`` its dtype's smallest normal; NaN and +inf
    come back as they are. Within 1.25 ulp of float64's log (float32; 1 ulp in float64)."""
    _apply_isa_variable()
    return torch.ops.ecloss_fast_C.log_floored(probabilities, scale)


def weighted_log_sums(weights, probabilities):
    """``sum_t weights[r, t] * log max(q[r, t], tiny)`` per row, summed in float64."""
    _apply_isa_variable()
    return torch.ops.ecloss_fast_C.weighted_log_sums(weights, probabilities)
