"""``python -m bench.gpu_smoke``: every fused GPU kernel once, checked, with its resources.

The first thing ``bench/gpu_check.sh`` runs after the build, so that a cut-short GPU session
still learns whether the kernels work. For the paper shape (B=64, C=512, 14x14, full set)
first, then a ragged one (B=5, C=3, 5x7: no dimension a multiple of anything), every
backend that runs on CUDA other than ``torch``, and ``auto``, is compared with the ``torch``
backend at the same precision, for both estimators, float32, bfloat16 and float16 maps
(float16 with ``precision=None``: float16 products), loss and ``dx``; then the
registers, spill bytes and shared memory of every Triton kernel the runs compiled are
printed as the JIT reports them (not as an offline compile predicts them).

The Triton training sweeps are also compared function by function with the ``torch``
backend's (``row_stats_with_grad``: all four outputs; ``input_grad`` with a marginal and
a general prior), each in both its forms, fused and split (``configs.FUSED`` picks one at
run time), so that the form not picked is checked too.

Exit status: 0 when every comparison is within its bound, 1 otherwise, 2 without CUDA.
``--time-budget S`` stops starting new cases after ``S`` seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from unittest import mock

import torch

import ecloss_fast as ef
from ecloss_fast._dispatch import auto_choice
from ecloss_fast.testing import peaked_maps

# Relative error bounds of the loss and dx against a float64 evaluation (design notes,
# Numerics); against the torch backend at the same precision both sides err, so twice that.
_BOUND = {"ieee": 2e-5, "tf32": 6e-3, "bf16": 6e-2, "fp16": 6e-3}
SHAPES = {"paper": (64, 512, 14, 14), "ragged": (5, 3, 5, 7)}  # in the order they run
# (maps dtype, the kernels' precision): "fp16" is float16 maps with precision=None.
CASES = [(torch.bfloat16, "bf16"), (torch.float32, "tf32"), (torch.float32, "ieee"),
         (torch.float32, "bf16"), (torch.float16, "fp16")]
ESTIMATORS = ("uniform", "marginal")


def api_precision(precision: str) -> str | None:
    """``ecloss``'s ``precision`` for the kernels' one (it names no "fp16": None gives it)."""
    return None if precision == "fp16" else precision


def _loss_and_grad(maps, backend, estimator, precision):
    x = maps.detach().clone().requires_grad_()
    loss = ef.ecloss(x, backend=backend, estimator=estimator, precision=api_precision(precision))
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach().double(), grad.double()


def _relative(value, truth) -> float:
    return float((value - truth).norm() / truth.norm().clamp_min(1e-30))


def _check(shape_name, dtype, precision, estimator, backends) -> bool:
    maps = peaked_maps(*SHAPES[shape_name], dtype=dtype, seed=1).cuda()
    truth_loss, truth_grad = _loss_and_grad(maps, "torch", estimator, precision)
    ok = True
    for backend in backends:
        start = time.perf_counter()
        try:
            loss, grad = _loss_and_grad(maps, backend, estimator, precision)
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001 -- report every failure, go on to the next
            print(f"FAIL {backend:6s} {shape_name:6s} {str(dtype)[6:]:8s} {precision:4s} "
                  f"{estimator:8s} raised {type(error).__name__}: {error}")
            ok = False
            continue
        loss_error, grad_error = _relative(loss, truth_loss), _relative(grad, truth_grad)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
        passed = finite and max(loss_error, grad_error) <= _BOUND[precision]
        ok &= passed
        if backend == "auto":  # the backend auto ran, its warm-up's verdict included
            batch, channels, height, width = maps.shape
            backend = "auto:" + auto_choice(maps.device, dtype, (batch, channels, height * width),
                                            precision, estimator == "marginal")
        print(f"{'ok  ' if passed else 'FAIL'} {backend:6s} {shape_name:6s} {str(dtype)[6:]:8s} "
              f"{precision:4s} {estimator:8s} loss {loss_error:.1e} dx {grad_error:.1e} "
              f"(bound {_BOUND[precision]:.0e}) {1e3 * (time.perf_counter() - start):8.1f} ms "
              "incl. compile")
    return ok


def _contract_outputs(module, maps, templates, prior, precision):
    """``row_stats_with_grad`` and ``input_grad`` with ``prior`` of one backend module."""
    *stats, grad = module.row_stats_with_grad(maps, templates, 1e-3, precision)
    weight = torch.full_like(stats[0], -1.0 / maps.shape[0])
    dx = module.input_grad(maps, templates, 1e-3, *stats, prior, weight, precision)
    return [*stats, grad, dx]


def _check_training_sweeps(shape_name, dtype, precision) -> bool:
    """Triton's training sweeps, fused and split, against the ``torch`` backend's."""
    from ecloss_fast._templates import template_matrix
    from ecloss_fast.backends import streaming, triton_fused

    batch, channels, height, width = SHAPES[shape_name]
    maps = peaked_maps(batch, channels, height, width, dtype=dtype, seed=2).cuda()
    maps = maps.reshape(batch, channels, height * width)
    templates = template_matrix(height, width, 4.0, None, maps.device, torch.float32)
    row_max, log_sum, _ = streaming.row_stats(maps, templates, 1e-3, precision)
    sums = streaming.column_sums(maps, templates, 1e-3, row_max, log_sum, precision)
    marginal = -torch.log((sums / batch).clamp_min(torch.finfo(torch.float32).tiny)) / batch
    generator = torch.Generator(device="cuda").manual_seed(3)
    priors = {"marginal": marginal,
              "general": marginal + torch.randn(marginal.shape, generator=generator,
                                                device="cuda") / batch}
    names = ("row_max", "log_sum", "neg_entropy", "neg_entropy_grad", "dx")
    ok = True
    for prior_name, prior in priors.items():
        truth = _contract_outputs(streaming, maps, templates, prior, precision)
        for form in ("fused", "split"):
            with mock.patch.object(triton_fused, "_fused", lambda *args, f=form: f == "fused"):
                try:
                    got = _contract_outputs(triton_fused, maps, templates, prior, precision)
                    torch.cuda.synchronize()
                except Exception as error:  # noqa: BLE001 -- report every failure, go on
                    print(f"FAIL triton {form:5s} {shape_name:6s} {str(dtype)[6:]:8s} "
                          f"{precision:4s} {prior_name:8s} raised {type(error).__name__}: {error}")
                    ok = False
                    continue
            errors = {name: _relative(value.double(), want.double())
                      for name, value, want in zip(names, got, truth)}
            finite = all(bool(torch.isfinite(value).all()) for value in got)
            passed = finite and max(errors.values()) <= _BOUND[precision]
            ok &= passed
            print(f"{'ok  ' if passed else 'FAIL'} triton {form:5s} {shape_name:6s} "
                  f"{str(dtype)[6:]:8s} {precision:4s} prior {prior_name:8s} "
                  + " ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    return ok


def _triton_resources() -> None:
    """Registers, spills and shared memory of every compiled Triton kernel of this process."""
    try:
        from triton.runtime.jit import JITFunction

        from ecloss_fast.triton_kernels import column_sums, input_grad, row_prior, row_stats
    except ImportError as error:
        print(f"triton kernels not importable: {error}")
        return
    print(f"\n{'kernel':22s} {'regs':>5s} {'spills':>7s} {'shared':>8s}  specialisation")
    for module in (row_stats, column_sums, row_prior, input_grad):
        for name, function in vars(module).items():
            if not isinstance(function, JITFunction) or not name.endswith("_kernel"):
                continue
            for caches in function.device_caches.values():
                for key, compiled in caches[0].items():
                    compiled._init_handles()
                    print(f"{name:22s} {compiled.n_regs:5d} {compiled.n_spills:7d} "
                          f"{compiled.metadata.shared:8d}  {str(key)[:100]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-budget", type=float, default=60.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    backends = [name for name in ef.available_backends() if name in ("triton", "cuda")]
    backends.append("auto")
    print(f"{torch.cuda.get_device_name()}: backends {backends}, comparing with 'torch'")
    start, ok = time.perf_counter(), True
    for shape_name in SHAPES:
        for dtype, precision in CASES:
            for estimator in ESTIMATORS:
                if time.perf_counter() - start > args.time_budget:
                    print(f"time budget of {args.time_budget:.0f} s reached; stopping")
                    _triton_resources()
                    return 1
                ok &= _check(shape_name, dtype, precision, estimator, backends)
            if "triton" in backends:
                ok &= _check_training_sweeps(shape_name, dtype, precision)
    _triton_resources()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
