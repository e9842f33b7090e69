"""The C++ extension (backends ``cpu`` and ``cuda``) against independent float64 evaluations.

Three levels: the contract functions (``row_stats``, ``column_sums``, ``input_grad`` of
``ecloss_fast.backends``) against an einsum evaluation of docs/design.md sections 2-3;
``ecloss(backend="cpu")`` against ``ecloss(backend="reference")`` for values and ``dx``;
and float64 ``gradcheck``. Tolerances: relative 1e-5 for float32 (docs/design.md section 4),
or, where a result is a small difference of larger terms (near-uniform softmaxes), a few times
the error of PyTorch's own float32 evaluation of the same formula, or that factor times
``log N``. At scores so large that a float32 ulp of a score exceeds 1, float32 rounding
decides between nearly tied templates; there the bound is what any float32 evaluation must
meet (``_near_ties``). The build itself is checked through the module: the extension loads,
and has CUDA kernels when a CUDA toolkit is there. GPU tests (``@pytest.mark.gpu``) compare
the ``cuda`` backend with the reference on CUDA.
"""
from __future__ import annotations

import gc
import math
import os
import re
import shutil
import warnings
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ecloss_fast as ef
from ecloss_fast import _dispatch
from ecloss_fast._ops import LossInputs, channel_loss_outputs
from ecloss_fast.backends import cpp_cpu, cpp_cuda, streaming
from ecloss_fast.testing import peaked_maps, random_maps
from _contract import (contract_templates, dx_scale, evaluate_contract, marginal_prior,
                       prior_dx)
from _tolerance import PRECISION_RELATIVE, assert_close, rounded, tf32_products
from bench import cpu as bench_cpu
from conftest import CPU_ISA_PATHS

TAU = 1e-3
RELATIVE = {torch.float64: 1e-12, torch.float32: 1e-5}
TAIL = 40.0  # a template this far below a row's max score has p < e^-40: no sum sees it
OPS = ("row_stats", "row_stats_with_grad", "column_sums", "input_grad")

needs_extension = pytest.mark.skipif(cpp_cpu.availability() is not None,
                                     reason=f"{cpp_cpu.availability()}")


def _compiler_present() -> bool:
    return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


def _cuda_toolkit_present() -> bool:
    """What setup.py looks for: CUDA_HOME/CUDA_PATH, or an nvcc on PATH."""
    return (torch.version.cuda is not None and os.environ.get("ECLOSS_FAST_CUDA") != "0"
            and any((os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                     shutil.which("nvcc"))))


def _scores(x, templates):
    return TAU * torch.einsum("bck,nk->bcn", x, templates)


def _near_ties(x, templates):
    """What float32 rounding leaves open, per row of ``x (B, C, K)`` (float32 templates).

    Returns the float64 ``row_max``, ``bound`` (no float32 evaluation of a score, in any
    summation order, with or without FMA, is further than this from its float64 value:
    Higham's ``gamma_K`` bound on a dot product plus the roundings of ``tau`` and of the
    product by it) and ``ties``: how many templates have a float64 score within
    ``2 * bound + TAIL`` of the max. Only those can hold weight in a float32 evaluation, so
    its ``log_sum`` is in ``[0, log ties]``, its entropy in ``[0, log ties]``, and two float32
    evaluations of the uniform loss differ by at most ``log ties``.
    """
    x, templates = x.double(), templates.double()
    unit = 2.0 ** -24
    scores = _scores(x, templates)
    magnitudes = _scores(x.abs(), templates.abs())
    bound = (x.shape[-1] + 4) * unit * 1.01 * magnitudes.amax(-1)
    row_max = scores.amax(-1)
    ties = (scores >= (row_max - 2 * bound - TAIL)[..., None]).sum(-1)
    return row_max, bound, ties


def _check_contract(backend, x, size, marginal, precision="ieee", seed=0):
    """The three contract functions on ``x (B, C, H*W)`` against float64 and float32 einsums.

    The backward functions take the backend's own statistics and a prior formed from its own
    column sums, as ``ecloss_fast._ops`` passes them: their ``p`` must be the forward's. The
    row weights are a channel's (the same for each of its maps), as the contract has them.
    """
    batch, channels, _ = x.shape
    accumulation = torch.float64 if x.dtype == torch.float64 else torch.float32
    templates = contract_templates(*size, accumulation, x.device)
    generator = torch.Generator().manual_seed(seed)
    channel_weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    weight = channel_weight.expand(batch, channels).to(x.device)
    truth = evaluate_contract(x.double(), templates.double(), weight, marginal)

    with tf32_products(x.is_cuda and precision == "tf32"):
        baseline = evaluate_contract(rounded(x, precision), rounded(templates, precision),
                                     weight.float(), marginal)
    # The CPU computes tf32 in full precision; bf16 with bfloat16 products where it has them.
    relative = (PRECISION_RELATIVE[precision] if x.is_cuda or precision == "bf16"
                else RELATIVE[accumulation])
    log_n = math.log(templates.shape[0])

    row_max, log_sum, neg_entropy = backend.row_stats(x, templates, TAU, precision)
    for statistic in (row_max, log_sum, neg_entropy):
        assert statistic.dtype == accumulation and statistic.shape == (batch, channels)
    assert_close("row_max", row_max, truth.row_max, baseline.row_max, relative)
    assert_close("log_sum", log_sum, truth.log_sum, baseline.log_sum, relative,
                  scale=log_n * batch * channels)
    assert_close("neg_entropy", neg_entropy, truth.neg_entropy, baseline.neg_entropy, relative,
                  scale=log_n * batch * channels)

    *statistics, neg_entropy_grad = backend.row_stats_with_grad(x, templates, TAU, precision)
    for name, statistic, expected, own in zip(("row_max", "log_sum", "neg_entropy"), statistics,
                                              truth, baseline):
        assert_close(f"{name} (with grad)", statistic, expected, own, relative,
                      scale=0.0 if name == "row_max" else log_n * batch * channels)
    assert neg_entropy_grad.dtype == accumulation and neg_entropy_grad.shape == x.shape
    assert_close("neg_entropy_grad", neg_entropy_grad, truth.neg_entropy_grad,
                  baseline.neg_entropy_grad, relative,
                  scale=dx_scale(1.0, templates.shape[0], x.numel()))

    sums = backend.column_sums(x, templates, TAU, row_max, log_sum, precision)
    assert sums.dtype == accumulation and sums.shape == (channels, templates.shape[0])
    assert_close("column_sums", sums, truth.column_sums, baseline.column_sums, relative)

    prior = marginal_prior(sums, channel_weight.to(sums)) if marginal else None
    dx = backend.input_grad(x, templates, TAU, row_max, log_sum, neg_entropy, prior,
                            weight.to(accumulation).contiguous(), precision)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    dx_size = dx_scale(weight.max().item(), templates.shape[0], x.numel())
    assert_close("dx", dx, truth.dx, baseline.dx, relative, scale=dx_size)

    if not hasattr(backend, "row_stats_with_scores"):
        return
    # The kept-scores route: the same statistics from the sweep that writes the scores, and
    # dx from those scores (the op's prior formed from their column sums, as above).
    *statistics, scores = backend.row_stats_with_scores(x, templates, TAU, precision)
    for name, statistic, own in zip(("row_max", "log_sum", "neg_entropy"), statistics,
                                    (row_max, log_sum, neg_entropy)):
        # The same scores, bitwise (docs/design.md section 9): the statistics of row_stats.
        assert torch.equal(statistic, own), f"{name} (with scores) differs from row_stats'"
    assert scores.dtype == accumulation and scores.shape == (batch, channels, templates.shape[0])
    operands = ((x, templates) if relative == RELATIVE[accumulation]
                else (rounded(x, precision), rounded(templates, precision)))
    assert_close("scores", scores, _scores(x.double(), templates.double()),
                 _scores(*(operand.to(accumulation) for operand in operands)), relative)
    kept_dx = backend.input_grad_from_scores(scores, templates, TAU, row_max, log_sum,
                                             neg_entropy, prior,
                                             weight.to(accumulation).contiguous(), precision)
    assert kept_dx.dtype == accumulation and kept_dx.shape == x.shape
    assert_close("dx (from scores)", kept_dx, truth.dx, baseline.dx, relative, scale=dx_size)


def _scaled_to_scores(x, templates, score_scale):
    """Maps ``x`` (B, C, H, W) times the factor that makes their largest float64 score
    ``score_scale``."""
    top = _scores(x.double().flatten(2), templates.double()).max().item()
    return (x.double() * (score_scale / top)).to(x.dtype)


# --- the build -------------------------------------------------------------------------


@pytest.mark.skipif(not _compiler_present(), reason="no C++ compiler: pure-Python install")
def test_extension_is_built_and_loads():
    assert cpp_cpu.availability() is None, cpp_cpu.availability()
    assert "cpu" in ef.available_backends()
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ecloss_fast_C::{op}", "CPU")


@needs_extension
@pytest.mark.skipif(not _cuda_toolkit_present(), reason="no CUDA toolkit or a CPU build of torch")
def test_cuda_kernels_are_built_when_the_toolkit_is_present():
    # The module itself, not the build log: the CUDA kernels registered when it loaded.
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ecloss_fast_C::{op}", "CUDA"), op
    why_not = cpp_cuda.availability()
    assert why_not is None or "no CUDA device" in why_not


# --- the cpu backend's contract functions -------------------------------------------------


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("marginal", [False, True])
@pytest.mark.parametrize("maps", [random_maps, peaked_maps])
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 7, 7, 7), (5, 2, 1, 9), (1, 3, 3, 2)])
def test_contract_matches_einsum(shape, maps, marginal, dtype, cpu_isa):
    b, c, h, w = shape
    x = maps(b, c, h, w, dtype=dtype, seed=b * 100 + c).reshape(b, c, h * w)
    _check_contract(cpp_cpu, x, (h, w), marginal, seed=h * w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("marginal", [False, True])
@pytest.mark.parametrize("maps", [random_maps, peaked_maps])
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 7, 7, 7), (2, 3, 14, 14)])
def test_streaming_backend_meets_the_same_contract(shape, maps, marginal, dtype):
    b, c, h, w = shape
    x = maps(b, c, h, w, dtype=dtype, seed=b * 100 + c).reshape(b, c, h * w)
    _check_contract(streaming, x, (h, w), marginal, seed=h * w)


@needs_extension
@pytest.mark.parametrize("marginal", [False, True])
@pytest.mark.parametrize("maps", [random_maps, peaked_maps])
def test_contract_full_14x14_set(maps, marginal, cpu_isa):
    x = maps(2, 3, 14, 14, dtype=torch.float32, seed=7).reshape(2, 3, 196)
    _check_contract(cpp_cpu, x, (14, 14), marginal)


@needs_extension
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 9), channels=st.integers(1, 8), height=st.integers(1, 5),
       width=st.integers(1, 6), peaked=st.booleans(), marginal=st.booleans(),
       seed=st.integers(0, 2**16))
def test_contract_random_shapes(batch, channels, height, width, peaked, marginal, seed,
                                cpu_isa):
    maps = peaked_maps if peaked else random_maps
    x = maps(batch, channels, height, width, dtype=torch.float32, seed=seed)
    _check_contract(cpp_cpu, x.reshape(batch, channels, -1), (height, width), marginal, seed=seed)


@needs_extension
@pytest.mark.parametrize("marginal", [False, True])
@pytest.mark.parametrize("maps", [random_maps, peaked_maps])
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 7, 7, 7), (2, 3, 14, 14), (7, 2, 3, 3)])
def test_bfloat16_products_meet_the_bf16_bound(shape, maps, marginal, cpu_isa):
    b, c, h, w = shape
    x = maps(b, c, h, w, dtype=torch.float32, seed=b * 10 + c).reshape(b, c, h * w)
    _check_contract(cpp_cpu, x, (h, w), marginal, precision="bf16", seed=h * w)


@needs_extension
@pytest.mark.skipif("avx512_bf16" not in CPU_ISA_PATHS, reason="this CPU has no AVX-512 BF16")
@pytest.mark.parametrize("marginal", [False, True])
@pytest.mark.parametrize("shape", [(7, 2, 3, 3), (3, 5, 4, 6), (2, 3, 14, 14), (2, 2, 28, 28)])
def test_bfloat16_products_match_float64_at_their_rounded_operands(shape, marginal):
    """On the avx512_bf16 path the products are exact and the sums float32, so the kernels
    meet float64 evaluated at the bfloat16-rounded maps and templates to float32's accuracy;
    the gradients' weights are rounded to bfloat16 too (2^-9 each: 1.2% in norm for the
    3x3 maps' neg_entropy_grad, a difference of two sums; at most 0.2% elsewhere). The bf16
    bound above (against float64 at the unrounded operands, or 8 times the rounding's own
    error) is too wide to see a dx that loses its last pixels: K of 9, 24, 196 and 784 end in
    a partial pair of vectors, or in whole ones (without the last vector of K, 2.5% to 100%
    of dx's norm here)."""
    os.environ[cpp_cpu.ISA_VARIABLE] = "avx512_bf16"
    b, c, h, w = shape
    x = peaked_maps(b, c, h, w, dtype=torch.float32, seed=h * w).reshape(b, c, h * w)
    templates = contract_templates(h, w, torch.float32)
    weight = (torch.rand(c, generator=torch.Generator().manual_seed(c), dtype=torch.float64)
              + 0.5).expand(b, c)
    truth = evaluate_contract(rounded(x, "bf16").double(), rounded(templates, "bf16").double(),
                              weight, marginal)
    row_max, log_sum, neg_entropy = cpp_cpu.row_stats(x, templates, TAU, "bf16")
    for name, got, expected in (("row_max", row_max, truth.row_max),
                                ("log_sum", log_sum, truth.log_sum)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5, msg=name)
    neg_entropy_grad = cpp_cpu.row_stats_with_grad(x, templates, TAU, "bf16")[3]
    sums = cpp_cpu.column_sums(x, templates, TAU, row_max, log_sum, "bf16")
    prior = marginal_prior(sums, weight[0].float()) if marginal else None
    dx = cpp_cpu.input_grad(x, templates, TAU, row_max, log_sum, neg_entropy, prior,
                            weight.float().contiguous(), "bf16")
    for name, got, expected in (("neg_entropy_grad", neg_entropy_grad, truth.neg_entropy_grad),
                                ("column_sums", sums, truth.column_sums), ("dx", dx, truth.dx)):
        error = (got.double() - expected).norm() / expected.norm()
        assert error < 2e-2, f"{name}: relative error {error:.3g}"


@needs_extension
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_packed_templates_are_reused_only_while_the_matrix_is_unchanged(precision, cpu_isa):
    # The kernels keep packed copies of recent template matrices: an in-place change, or a
    # new matrix, must be seen (float64 truth for each).
    x = random_maps(2, 3, 4, 5, dtype=torch.float32, seed=4).reshape(2, 3, 20)
    templates = contract_templates(4, 5, torch.float32).clone()
    tolerance = 3e-2 if precision == "bf16" else 1e-5
    for change in (lambda t: t, lambda t: t.mul_(-0.5), lambda t: t[:5].add_(1.0)):
        change(templates)
        for _ in range(2):
            _assert_packed_templates_current(x, templates, precision, tolerance)
    _assert_packed_templates_current(x, contract_templates(4, 5, torch.float32) * 3.0,
                                     precision, tolerance)


def _assert_packed_templates_current(x, templates, precision, tolerance):
    tau = 0.5  # a peaked softmax: the entropy moves with every template value
    neg_entropy = cpp_cpu.row_stats(x, templates, tau, precision)[2]
    truth = evaluate_contract(x.double(), templates.double(), torch.ones(2, 3), False, tau=tau)
    error = (neg_entropy.double() - truth.neg_entropy).abs().max().item()
    assert error <= tolerance * truth.neg_entropy.abs().max().item()


@needs_extension
@pytest.mark.skipif("avx512_bf16" not in CPU_ISA_PATHS, reason="this CPU has no AVX-512 BF16")
def test_bfloat16_products_are_used_on_the_avx512_bf16_path():
    # The scores of bfloat16 operands: those of the rounded maps and templates (exact
    # products, float32 sums), not the float32 ones.
    os.environ[cpp_cpu.ISA_VARIABLE] = "avx512_bf16"
    x = random_maps(3, 4, 7, 7, dtype=torch.float32, seed=3).reshape(3, 4, 49)
    templates = contract_templates(7, 7, torch.float32)
    row_max = cpp_cpu.row_stats(x, templates, TAU, "bf16")[0]
    rounded = _scores(x.bfloat16().double(), templates.bfloat16().double()).amax(-1)
    full = _scores(x.double(), templates.double()).amax(-1)
    assert (row_max.double() - rounded).abs().max() < 1e-2 * (full - rounded).abs().max()


@needs_extension
def test_bfloat16_precision_computes_in_float32_on_the_other_paths(cpu_isa):
    if cpu_isa == "avx512_bf16":
        pytest.skip("the avx512_bf16 path has bfloat16 products")
    x = random_maps(3, 4, 7, 7, dtype=torch.float32, seed=3).reshape(3, 4, 49)
    templates = contract_templates(7, 7, torch.float32)
    for full, bf16 in zip(cpp_cpu.row_stats(x, templates, TAU, "ieee"),
                          cpp_cpu.row_stats(x, templates, TAU, "bf16")):
        assert torch.equal(full, bf16)


@needs_extension
def test_the_instruction_set_path_is_the_one_asked_for(cpu_isa):
    assert cpp_cpu.isa_in_use() == cpu_isa
    assert torch.ops.ecloss_fast_C.cpu_isa() == cpu_isa
    del os.environ[cpp_cpu.ISA_VARIABLE]
    assert cpp_cpu.isa_in_use() == CPU_ISA_PATHS[-1]  # unset: the best this CPU has


@needs_extension
def test_auto_passes_over_the_cpu_backend_on_its_baseline_path_only(cpu_isa):
    # bench/NOTES.md ("auto on an AVX2 CPU"): there torch's BLAS is about 2x faster.
    expected = "torch" if cpu_isa == "baseline" else "cpu"
    x = random_maps(2, 3, 7, 7).reshape(2, 3, 49)
    templates = contract_templates(7, 7, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a performance choice, not a problem: no warning
        assert _dispatch.resolve_backend("auto", x.device, x.dtype, 49) == expected
        for prior in (False, True):
            assert _dispatch.choose_backend("auto", x, templates, TAU, "ieee", prior) == expected
    assert (cpp_cpu.slower_here() is None) == (cpu_isa != "baseline")
    # Named explicitly, the cpu backend runs on every path.
    assert _dispatch.resolve_backend("cpu", x.device, x.dtype, 49) == "cpu"


@needs_extension
def test_instruction_set_paths_this_cpu_has():
    flags = bench_cpu.cpu_flags()
    expected = ["baseline"]
    if {"avx2", "fma"} <= flags:
        expected.append("avx2")
    if {"avx512f", "avx512vl", "avx512dq"} <= flags:
        expected.append("avx512")
        if {"avx512bw", "avx512_bf16"} <= flags:
            expected.append("avx512_bf16")
    assert CPU_ISA_PATHS == expected


@needs_extension
@pytest.mark.parametrize("value, says", [
    ("avx1024", "is not an instruction-set path (the paths are baseline, avx2, avx512, "
                "avx512_bf16)"),
    ("AVX2", "is not an instruction-set path")])
def test_an_unknown_instruction_set_path_is_a_clear_error(value, says):
    os.environ[cpp_cpu.ISA_VARIABLE] = value
    x = random_maps(2, 2, 3, 3).reshape(2, 2, 9)
    with pytest.raises(ValueError) as raised:
        cpp_cpu.row_stats(x, contract_templates(3, 3, torch.float32), TAU, "ieee")
    message = str(raised.value)
    assert message.startswith(f"ECLOSS_FAST_CPU_ISA={value!r} {says}")
    assert message.endswith(f"this CPU has: {', '.join(CPU_ISA_PATHS)} (unset it for the "
                            f"best, {CPU_ISA_PATHS[-1]!r})")


@needs_extension
@pytest.mark.skipif(CPU_ISA_PATHS[-1:] == ["avx512_bf16"], reason="this CPU has every path")
def test_a_path_this_cpu_lacks_is_a_clear_error():
    lacking = cpp_cpu.ISA_PATHS[len(CPU_ISA_PATHS)]
    os.environ[cpp_cpu.ISA_VARIABLE] = lacking
    with pytest.raises(ValueError, match=f"ECLOSS_FAST_CPU_ISA={lacking!r} names a path this "
                                         f"CPU does not have; this CPU has: "
                                         f"{', '.join(CPU_ISA_PATHS)}"):
        cpp_cpu.isa_in_use()
    with pytest.raises(ValueError, match=f"this CPU has no '{lacking}' path"):
        torch.ops.ecloss_fast_C.set_cpu_isa(lacking)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maps", [random_maps, peaked_maps])
def test_input_grad_with_a_general_prior(maps, dtype, cpu_isa):
    # Any (C, N) prior, as the channel-diversity term passes one: dx against float64.
    batch, channels, size = 5, 3, (4, 6)
    x = maps(batch, channels, *size, dtype=dtype, seed=4).reshape(batch, channels, -1)
    templates = contract_templates(*size, dtype)
    generator = torch.Generator().manual_seed(4)
    channel_weight = torch.rand(channels, generator=generator, dtype=torch.float64) - 0.5
    prior = torch.randn(channels, templates.shape[0], generator=generator, dtype=torch.float64)
    weight = channel_weight.expand(batch, channels)
    row_max, log_sum, neg_entropy = cpp_cpu.row_stats(x, templates, TAU, "ieee")
    dx = cpp_cpu.input_grad(x, templates, TAU, row_max, log_sum, neg_entropy, prior.to(dtype),
                            weight.to(dtype).contiguous(), "ieee")
    truth = prior_dx(x.double(), templates.double(), weight, prior)
    baseline = prior_dx(x.float(), templates.float(), weight.float(), prior.float())
    size_of_terms = TAU * (prior.abs().max().item() + math.log(templates.shape[0])) * math.sqrt(
        x.numel())
    assert_close("dx", dx, truth, baseline, RELATIVE[dtype], scale=size_of_terms)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_run_in_float32(dtype, cpu_isa):
    x = peaked_maps(2, 3, 4, 5, dtype=dtype, seed=3).reshape(2, 3, 20)
    templates = contract_templates(4, 5, torch.float32)
    row_max, log_sum, neg_entropy = cpp_cpu.row_stats(x, templates, TAU, "ieee")
    expected = evaluate_contract(x.double(), templates.double(),
                                 torch.ones(2, 3, dtype=torch.float64), False)
    torch.testing.assert_close(row_max.double(), expected.row_max, rtol=1e-6, atol=0)
    torch.testing.assert_close(log_sum.double(), expected.log_sum, rtol=1e-5, atol=1e-6)
    dx = cpp_cpu.input_grad(x, templates, TAU, row_max, log_sum, neg_entropy, None,
                            torch.ones(2, 3), "ieee")
    assert dx.dtype == dtype
    torch.testing.assert_close(dx.double(), expected.dx, rtol=1e-2,
                               atol=1e-2 * expected.dx.abs().max().item())


@needs_extension
@pytest.mark.parametrize("shape", [(13, 4, 5, 5), (2, 3, 14, 14)])  # few rows: template parts
def test_results_are_deterministic_and_independent_of_threads(shape, cpu_isa):
    batch, channels, height, width = shape
    x = peaked_maps(*shape, dtype=torch.float32, seed=11).reshape(batch, channels, -1)
    templates = contract_templates(height, width, torch.float32)
    channel_weight = torch.rand(channels)
    threads = torch.get_num_threads()

    def run():
        row_max, log_sum, neg_entropy = cpp_cpu.row_stats(x, templates, TAU, "ieee")
        sums = cpp_cpu.column_sums(x, templates, TAU, row_max, log_sum, "ieee")
        dx = cpp_cpu.input_grad(x, templates, TAU, row_max, log_sum, neg_entropy,
                                marginal_prior(sums, channel_weight),
                                channel_weight.expand(batch, channels).contiguous(), "ieee")
        with_grad = cpp_cpu.row_stats_with_grad(x, templates, TAU, "ieee")
        *_, scores = cpp_cpu.row_stats_with_scores(x, templates, TAU, "ieee")
        kept_dx = cpp_cpu.input_grad_from_scores(
            scores, templates, TAU, row_max, log_sum, neg_entropy,
            marginal_prior(sums, channel_weight),
            channel_weight.expand(batch, channels).contiguous(), "ieee")
        return row_max, log_sum, neg_entropy, sums, dx, *with_grad, scores, kept_dx

    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(max(2, threads))
        first, second = run(), run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(single, first, second):
        assert torch.equal(a, b) and torch.equal(b, c)


@needs_extension
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_non_finite_statistics(bad, cpu_isa):
    x = random_maps(2, 2, 3, 3, seed=1).reshape(2, 2, 9)
    x[1, 0, 4] = bad
    statistics = cpp_cpu.row_stats(x, contract_templates(3, 3, torch.float32), TAU, "ieee")
    assert not all(torch.isfinite(statistic[1, 0]) for statistic in statistics)
    assert all(torch.isfinite(statistic[0]).all() for statistic in statistics)


@needs_extension
def test_malformed_arguments_raise_naming_the_argument():
    x = random_maps(2, 3, 4, 4).reshape(2, 3, 16)
    templates = contract_templates(4, 4, torch.float32)
    with pytest.raises(TypeError, match="templates must be Float"):
        cpp_cpu.row_stats(x, templates.double(), TAU, "ieee")
    with pytest.raises(ValueError, match="templates must be \\(N, K\\)"):
        cpp_cpu.row_stats(x, templates[:, :15].contiguous(), TAU, "ieee")
    with pytest.raises(ValueError, match="precision must be"):
        cpp_cpu.row_stats(x, templates, TAU, "fp8")
    row_max, log_sum, neg_entropy = cpp_cpu.row_stats(x, templates, TAU, "ieee")
    with pytest.raises(ValueError, match="prior must be \\(C, N\\)"):
        cpp_cpu.input_grad(x, templates, TAU, row_max, log_sum, neg_entropy, torch.zeros(2, 5),
                           row_max, "ieee")
    with pytest.raises(ValueError, match="per-row statistics must be \\(B, C\\)"):
        cpp_cpu.column_sums(x, templates, TAU, row_max, log_sum.t().contiguous(), "ieee")
    with pytest.raises(TypeError, match="per-row statistics must be Float"):
        cpp_cpu.input_grad(x, templates, TAU, row_max, log_sum.double(), neg_entropy, None,
                           row_max, "ieee")


@needs_extension
def test_opcheck_schema_and_meta_kernels():
    x = peaked_maps(2, 3, 3, 4, seed=5).reshape(2, 3, 12)
    templates = contract_templates(3, 4, torch.float32)
    row_max, log_sum, neg_entropy = cpp_cpu.row_stats(x, templates, TAU, "ieee")
    prior = marginal_prior(cpp_cpu.column_sums(x, templates, TAU, row_max, log_sum, "ieee"),
                            torch.ones(3))
    cases = {
        "row_stats": (x, templates, TAU, "ieee"),
        "row_stats_with_grad": (x, templates, TAU, "ieee"),
        "column_sums": (x, templates, TAU, row_max, log_sum, "ieee"),
        "input_grad": (x, templates, TAU, row_max, log_sum, neg_entropy, prior,
                       torch.ones(2, 3), "ieee"),
    }
    operands = cpp_cuda.operand_templates(templates, "ieee")
    for name, args in cases.items():  # the fake (Meta) outputs' metadata must be the real ones'
        torch.library.opcheck(getattr(torch.ops.ecloss_fast_C, name).default, args)
        torch.library.opcheck(getattr(torch.ops.ecloss_fast_C, name).default, (*args, operands))


# --- scores of every magnitude (docs/design.md section 4) --------------------------------


def _constant_maps(batch, size, value):
    return torch.full((batch, 1, size, size), value)


def _template_maps(batch, size, value, index=1000):
    """``batch`` copies of one template, clamped at 0, times ``value``."""
    template = ef.make_templates(size)[index].clamp_min(0)
    return (template * value).expand(batch, 1, size, size).contiguous()


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maps", ["constant", "peaked"])
@pytest.mark.parametrize("score_scale", [10.0, 1e4, 1e7, 1e9, 1e12, 1e30])
def test_probabilities_of_every_sweep_sum_to_one(score_scale, maps, dtype, cpu_isa):
    # The cause of marginal losses above 0: p recomputed from a rounded lse = max + log l
    # do not sum to 1 once the ulp of the max exceeds log l. Formed from (row_max, log_sum)
    # and bitwise the forward's scores, each row's p sum to 1 to rounding at every magnitude.
    batch, size = 5, 7
    templates = contract_templates(size, size, dtype)
    x = (_constant_maps(batch, size, 1.0) if maps == "constant"
         else peaked_maps(batch, 1, size, size, seed=2)).to(dtype)
    rows = _scaled_to_scores(x, templates, score_scale).reshape(batch, 1, -1)
    row_max, log_sum, neg_entropy = cpp_cpu.row_stats(rows, templates, TAU, "ieee")
    assert all(torch.isfinite(s).all() for s in (row_max, log_sum, neg_entropy))
    sums = cpp_cpu.column_sums(rows, templates, TAU, row_max, log_sum, "ieee")
    mass = sums.double().sum(-1)
    rounding = 1e-6 if dtype == torch.float32 else 1e-13
    assert (mass - batch).abs().max().item() <= rounding * batch, mass


@needs_extension
@pytest.mark.parametrize("size", [7, 14])
@pytest.mark.parametrize("value", [3e10, 1e11, 1e15])
def test_huge_maps_give_finite_results_within_their_near_tie_bound(value, size, cpu_isa):
    # Past scores of ~1.5e9 an FMA-contracted shift tau * <x, T> - max exceeds the range of
    # exp, and the loss of such maps was NaN (the reference gives -6.07 for 1e11 at 7x7).
    x = _constant_maps(2, size, value)
    rows = x.reshape(2, 1, -1)
    templates = contract_templates(size, size)
    log_n = math.log(templates.shape[0])
    rounding = RELATIVE[torch.float32] * log_n
    row_max, log_sum, neg_entropy = cpp_cpu.row_stats(rows, templates, TAU, "ieee")
    truth_max, bound, ties = _near_ties(rows, templates)
    log_ties = ties.double().log()
    assert all(torch.isfinite(s).all() for s in (row_max, log_sum, neg_entropy))
    assert ((row_max.double() - truth_max).abs() <= bound).all()
    assert (log_sum >= 0).all() and (log_sum.double() <= log_ties + rounding).all()
    assert (neg_entropy <= rounding).all() and (neg_entropy.double() >= -log_ties - rounding).all()

    for estimator in ("uniform", "marginal"):
        maps = x.clone().requires_grad_()
        loss = ef.ecloss(maps, backend="cpu", estimator=estimator)
        (dx,) = torch.autograd.grad(loss, maps)
        assert torch.isfinite(loss) and torch.isfinite(dx).all()
        expected = ef.ecloss(x, backend="reference", estimator=estimator).item()
        if estimator == "uniform":  # the entropy of each row is in [0, log ties]
            assert -log_n - rounding <= loss.item() <= -log_n + log_ties.max().item() + rounding
            assert abs(loss.item() - expected) <= log_ties.max().item() + rounding
        else:  # identical maps: pbar = p, so the loss is 0 whatever the rounding
            assert abs(loss.item()) <= rounding
            # The reference's float32 GEMM may round two identical rows differently (its
            # blocking depends on the row's position and on the threads it gets), and at
            # these scores that changes which templates tie: only section 4.1's range holds.
            assert -math.log(2) - rounding <= expected <= rounding


@needs_extension
@pytest.mark.parametrize("maps, batch, value", [
    (_constant_maps, 4, 2e9), (_template_maps, 1, 1e9), (_constant_maps, 2, 3e10),
    (_template_maps, 8, 1e8), (_constant_maps, 3, 1e4), (_template_maps, 5, 10.0)])
def test_marginal_loss_of_identical_maps_is_zero(maps, batch, value, cpu_isa):
    # The maps of the channel are equal (or B = 1), so pbar = p and the loss is exactly 0 for
    # any scores; it came out +3.46 (constant 2e9, B = 4) and +0.457 (template 1e9, B = 1).
    x = maps(batch, 7, value).requires_grad_()
    loss = ef.ecloss(x, backend="cpu", estimator="marginal")
    (dx,) = torch.autograd.grad(loss, x)
    n = ef.num_templates(7)
    assert abs(loss.item()) <= RELATIVE[torch.float32] * math.log(n)
    # A minimum: the gradient vanishes too, to rounding of the terms it is a difference of.
    assert dx.norm().item() <= RELATIVE[torch.float32] * dx_scale(1 / batch, n, x.numel())


def _maps_sharing_templates(seed):
    """(8, 2, 7, 7) peaked maps: channel 0 uses four templates twice each (rows b and b + 4,
    with different noise), channel 1 eight distinct templates (the marginal loss is
    -log 8, the edge of its range, once the softmax is one-hot)."""
    x = peaked_maps(8, 2, 7, 7, dtype=torch.float64, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    noise = 1 + 0.02 * torch.randn(4, 49, generator=generator, dtype=torch.float64)
    x[4:, 0] = x[:4, 0] * noise.view(4, 7, 7)
    return x.float()


@needs_extension
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("score_scale", [30.0, 1e8, 1e14, 1e30, 1e34])
def test_marginal_loss_of_peaked_maps_matches_float64_at_every_score_scale(score_scale, seed,
                                                                           cpu_isa):
    # At 1e8 the loss came out up to +18 and below -log B. Above scores of ~1e3 the input is
    # checked to be decided: every row has one template ahead of the rest by more than
    # float32 rounding can move (then float32 and float64 pick the same ones).
    templates = contract_templates(7, 7)
    x = _scaled_to_scores(_maps_sharing_templates(seed), templates, score_scale)
    if score_scale > 1e3:
        assert (_near_ties(x.reshape(8, 2, -1), templates)[2] == 1).all()
    maps = x.clone().requires_grad_()
    loss = ef.ecloss(maps, backend="cpu", estimator="marginal", reduction="none")
    (dx,) = torch.autograd.grad(loss.sum(), maps)
    reference_x = x.double().requires_grad_()
    expected = ef.ecloss(reference_x, backend="reference", estimator="marginal",
                         reduction="none")
    (expected_dx,) = torch.autograd.grad(expected.sum(), reference_x)
    n = templates.shape[0]
    rounding = RELATIVE[torch.float32] * math.log(n)
    assert (loss.double() - expected).abs().max().item() <= rounding, (loss, expected)
    assert (loss >= -math.log(min(n, 8)) - rounding).all() and (loss <= rounding).all()
    assert torch.isfinite(dx).all()
    scale = max(expected_dx.norm().item(), dx_scale(1 / 8, n, x.numel()))
    assert (dx.double() - expected_dx).norm().item() <= RELATIVE[torch.float32] * scale


@needs_extension
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 7, 7, 7), (4, 6, 7, 7), (8, 4, 14, 14)])
def test_float32_loss_and_dx_of_peaked_maps_within_1e5_of_float64(shape, estimator, seed,
                                                                  cpu_isa):
    # docs/design.md section 4, with no allowance for near-uniform softmaxes: relative to the
    # result itself. The recomputed p were not the forward's and dx missed by up to 8e-5.
    x = peaked_maps(*shape, seed=seed * 31 + shape[1]).requires_grad_()
    loss = ef.ecloss(x, backend="cpu", estimator=estimator, precision="ieee")
    (dx,) = torch.autograd.grad(loss, x)
    reference_x = x.detach().double().requires_grad_()
    expected = ef.ecloss(reference_x, backend="reference", estimator=estimator)
    (expected_dx,) = torch.autograd.grad(expected, reference_x)
    relative = RELATIVE[torch.float32]
    assert abs(loss.item() - expected.item()) <= relative * abs(expected.item())
    error = ((dx.double() - expected_dx).norm() / expected_dx.norm()).item()
    assert error <= relative, f"relative dx error {error:.3g}"


# --- through ecloss(backend="cpu") ------------------------------------------------------


def _keeps_scores(x, estimator="uniform", diversity=0.0, templates=None, subset=0):
    """Whether ``ecloss(x, backend="cpu")`` takes the kept-scores route: the op's outputs
    hold the ``(B, C, N)`` scores."""
    outputs = channel_loss_outputs(LossInputs(
        x=x.detach(), templates=templates, radius=4.0, subset=subset, tau=1e-3,
        marginal=estimator == "marginal", diversity=diversity, diagnostics=False,
        precision="", backend="cpu", group="", with_grad=x.requires_grad))
    return outputs.scores.numel() > 0


@needs_extension
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("maps", [random_maps, peaked_maps])
@pytest.mark.parametrize("shape, kept", [((4, 3, 5, 3), True), ((2, 3, 14, 14), True),
                                         ((9, 4, 3, 4), False), ((5, 48, 14, 14), False)])
def test_ecloss_cpu_matches_reference(shape, kept, maps, reduction, estimator, cpu_isa):
    # Both routes of the op: the scores kept (B*C <= K) and the fused sweeps.
    x = maps(*shape, dtype=torch.float32, seed=sum(shape)).requires_grad_()
    assert _keeps_scores(x, estimator) == kept
    reference_x = x.detach().double().requires_grad_()
    kwargs = dict(estimator=estimator, reduction=reduction)
    loss = ef.ecloss(x, backend="cpu", **kwargs)
    expected = ef.ecloss(reference_x, backend="reference", **kwargs)
    upstream = torch.linspace(0.5, 2.0, expected.numel(), dtype=torch.float64)
    upstream = upstream.reshape(expected.shape)
    (dx,) = torch.autograd.grad(loss, x, upstream.float())
    (expected_dx,) = torch.autograd.grad(expected, reference_x, upstream)
    n = ef.num_templates(shape[2], shape[3])
    size = torch.log(torch.tensor(float(n))).item() * (shape[1] if reduction != "mean" else 1)
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    assert (loss.double() - expected).abs().max().item() <= 1e-5 * max(size, 1.0)
    assert dx.dtype == x.dtype
    row_weight = upstream.max().item() / shape[0] / (shape[1] if reduction == "mean" else 1)
    scale = max(expected_dx.norm().item(), dx_scale(row_weight, n, x.numel()))
    assert (dx.double() - expected_dx).norm().item() <= 1e-5 * scale


@needs_extension
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
@pytest.mark.parametrize("shape, kept", [((3, 2, 3, 3), True), ((5, 2, 3, 3), False)])
def test_gradcheck_float64(shape, kept, estimator, cpu_isa):
    x = peaked_maps(*shape, dtype=torch.float64, seed=2, scale=300.0).requires_grad_()
    assert _keeps_scores(x, estimator) == kept

    def loss(maps):
        return ef.ecloss(maps, backend="cpu", estimator=estimator, reduction="none", tau=1e-2)

    assert torch.autograd.gradcheck(loss, (x,), eps=1e-4, atol=1e-9, rtol=1e-6)


@needs_extension
@pytest.mark.parametrize("batch, channels, kept", [(4, 4, True), (1, 16, True), (17, 1, False),
                                                   (3, 6, False)])
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
def test_scores_are_kept_when_the_rows_are_no_more_than_the_pixels(batch, channels, kept,
                                                                   estimator):
    # K = 16: B*C = 16 keeps them (the scores are then no larger than the templates).
    x = peaked_maps(batch, channels, 4, 4, seed=5).requires_grad_()
    outputs = channel_loss_outputs(LossInputs(
        x=x.detach(), templates=None, radius=4.0, subset=0, tau=1e-3,
        marginal=estimator == "marginal", diversity=0.0, diagnostics=False, precision="",
        backend="cpu", group="", with_grad=True))
    n = ef.num_templates(4, 4)
    assert outputs.scores.shape == ((batch, channels, n) if kept else (0,))
    if kept:  # the forward's scores, which the backward reuses
        expected = _scores(x.detach().double().flatten(2), contract_templates(4, 4).double())
        torch.testing.assert_close(outputs.scores.double(), expected, rtol=1e-5, atol=1e-9)
    assert outputs.neg_entropy_grad.numel() == 0 or not kept


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator, diversity", [("uniform", 0.0), ("marginal", 0.0),
                                                  ("uniform", 0.5), ("marginal", 0.5)])
def test_kept_scores_at_28x28_match_the_reference(estimator, diversity, dtype, cpu_isa):
    # Where the route is for: a 28x28 map with few rows (a subset of the templates keeps the
    # float64 reference small), with the marginal prior and the diversity term's.
    x = peaked_maps(2, 8, 28, 28, dtype=dtype, seed=7, scale=30.0).requires_grad_()
    kwargs = dict(estimator=estimator, diversity=diversity, templates=400, reduction="none")
    assert _keeps_scores(x, estimator, diversity, subset=400)
    loss = ef.ecloss(x, backend="cpu", **kwargs)
    upstream = torch.linspace(0.5, 2.0, loss.numel(), dtype=torch.float64)
    (dx,) = torch.autograd.grad(loss, x, upstream.to(dtype))
    reference_x = x.detach().double().requires_grad_()
    expected = ef.ecloss(reference_x, backend="reference", **kwargs)
    (expected_dx,) = torch.autograd.grad(expected, reference_x, upstream)
    relative = RELATIVE[dtype]
    assert (loss.double() - expected).abs().max().item() <= relative * math.log(400)
    scale = max(expected_dx.norm().item(), dx_scale(2.0 / 2, 400, x.numel()))
    assert (dx.double() - expected_dx).norm().item() <= relative * scale


@needs_extension
def test_kept_scores_ops_reject_malformed_scores():
    templates = contract_templates(3, 3)
    stats = torch.zeros(2, 2)
    scores = torch.zeros(2, 2, templates.shape[0])
    ops = torch.ops.ecloss_fast_C
    with pytest.raises(ValueError, match=r"scores must be \(B, C, N\) with N = 46"):
        ops.input_grad_from_scores(scores[..., :-1], templates, TAU, stats, stats, stats, None,
                                   stats, "ieee")
    with pytest.raises(TypeError, match="scores must be Float"):
        ops.input_grad_from_scores(scores.double(), templates, TAU, stats, stats, stats, None,
                                   stats, "ieee")
    with pytest.raises(ValueError, match="per-row statistics must be"):
        ops.input_grad_from_scores(scores, templates, TAU, stats[:1], stats, stats, None,
                                   stats, "ieee")
    for maps in (torch.zeros(2, 9), torch.zeros(9)):
        with pytest.raises(ValueError, match=r"row_stats_with_scores: x must be \(B, C, K\)"):
            ops.row_stats_with_scores(maps, templates, TAU, "ieee")


# --- the cuda backend's operand templates (made by torch ops: checked on the CPU) ---------


def _rounded_in_float64(values, mantissa_bits, ties_away):
    """``values`` rounded to ``mantissa_bits`` bits after the leading one, in float64 (exact
    here: every step scales by a power of 2 or rounds an integer-sized number); normal
    float32 values only (a float32 subnormal has a fixed ulp, not this one)."""
    v = values.double()
    _, exponent = torch.frexp(v)  # |v| = m 2^e, m in [0.5, 1): the leading bit is 2^(e-1)
    ulp = torch.ldexp(torch.ones_like(v), exponent - 1 - mantissa_bits)
    steps = v.abs() / ulp
    steps = torch.floor(steps + 0.5) if ties_away else torch.round(steps)  # round: half-even
    return torch.copysign(steps * ulp, v).float()


def _float32_from_bits(bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def test_tf32_rounding_is_to_nearest_with_ties_away_from_zero():
    generator = torch.Generator().manual_seed(11)
    random = torch.randn(4000, generator=generator) * torch.logspace(-20, 20, 4000)
    # Exact ties (low 13 bits 0x1000, ties-to-even would round half of them down), their
    # neighbours, and a mantissa of all ones whose rounding carries into the exponent.
    special = _float32_from_bits([
        0x3F801000, 0x3F803000, 0xBF801000, 0xBF803000, 0x3F800FFF, 0x3F801001,
        0x3FFFFFFF, 0xBFFFFFFF, 0x00800000 | 0x1000, 0x7F7FE000])
    values = torch.cat([random, special])
    expected = _rounded_in_float64(values, 10, ties_away=True)
    assert torch.equal(cpp_cuda.round_to_tf32(values), expected)
    kept = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    assert torch.equal(cpp_cuda.round_to_tf32(kept).view(torch.int32), kept.view(torch.int32))
    assert torch.isnan(cpp_cuda.round_to_tf32(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("count, pixels", [(5, 12), (32, 16), (33, 49), (1226, 49), (301, 196)])
def test_operand_templates_are_zero_padded_copies_in_the_operand_type(count, pixels, precision):
    generator = torch.Generator().manual_seed(count + pixels)
    templates = torch.rand(count, pixels, generator=generator) * 2 - 1
    operands = cpp_cuda.operand_templates(templates, precision)
    rows, columns = -(-count // 32) * 32, -(-pixels // 16) * 16  # whole tiles, WMMA k steps
    assert operands.shape == (rows, columns) and operands.is_contiguous()
    assert operands.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert operands.data_ptr() % 16 == 0
    assert not operands[count:].any() and not operands[:, pixels:].any()
    expected = {"ieee": templates,
                "tf32": _rounded_in_float64(templates, 10, ties_away=True),
                "bf16": _rounded_in_float64(templates, 7, ties_away=False)}[precision]
    assert torch.equal(operands[:count, :pixels].float(), expected)


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_operand_templates_are_cached_remade_after_in_place_changes_and_freed_with_them(
        precision):
    templates = torch.rand(40, 20) * 2 - 1
    first = cpp_cuda.operand_templates(templates, precision)
    assert cpp_cuda.operand_templates(templates, precision) is first
    templates.mul_(2)  # exact in every operand type: the new copy is the old one doubled
    again = cpp_cuda.operand_templates(templates, precision)
    assert again is not first and torch.equal(again, first * 2)
    assert cpp_cuda.operand_templates(templates, precision) is again
    freed = weakref.ref(again)
    del again, templates
    gc.collect()
    assert freed() is None


@needs_extension
def test_cpu_kernels_ignore_operand_templates():
    x = peaked_maps(3, 4, 5, 5, seed=6).reshape(3, 4, 25)
    templates = contract_templates(5, 5, torch.float32)
    operands = cpp_cuda.operand_templates(templates, "ieee")
    ops = torch.ops.ecloss_fast_C
    stats = ops.row_stats(x, templates, TAU, "ieee")
    for got, expected in zip(ops.row_stats(x, templates, TAU, "ieee", operands), stats):
        assert torch.equal(got, expected)
    row_max, log_sum, neg_entropy = stats
    assert torch.equal(ops.column_sums(x, templates, TAU, row_max, log_sum, "ieee", operands),
                       ops.column_sums(x, templates, TAU, row_max, log_sum, "ieee"))
    weight = torch.ones(3, 4)
    assert torch.equal(
        ops.input_grad(x, templates, TAU, row_max, log_sum, neg_entropy, None, weight, "ieee",
                       operands),
        ops.input_grad(x, templates, TAU, row_max, log_sum, neg_entropy, None, weight, "ieee"))


# --- the cuda backend, on a GPU ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("marginal", [False, True])
@pytest.mark.parametrize("maps", [random_maps, peaked_maps])
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 3, 14, 14), (70, 2, 7, 7)])
def test_cuda_contract_matches_einsum(shape, maps, marginal, precision):
    assert cpp_cuda.availability() is None, cpp_cuda.availability()
    b, c, h, w = shape
    x = maps(b, c, h, w, seed=b + c).reshape(b, c, h * w).cuda()
    _check_contract(cpp_cuda, x, (h, w), marginal, precision)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
def test_ecloss_cuda_matches_reference(estimator, precision, dtype):
    x = peaked_maps(4, 6, 14, 14, dtype=torch.float64, seed=4).cuda()
    x_in = x.to(dtype).requires_grad_()
    loss = ef.ecloss(x_in, backend="cuda", estimator=estimator, precision=precision)
    reference_x = x_in.detach().double().requires_grad_()
    expected = ef.ecloss(reference_x, backend="reference", estimator=estimator)
    (dx,) = torch.autograd.grad(loss, x_in)
    (expected_dx,) = torch.autograd.grad(expected, reference_x)
    relative = PRECISION_RELATIVE[precision]
    log_n = torch.log(torch.tensor(float(ef.num_templates(14)))).item()
    assert abs(loss.item() - expected.item()) <= relative * max(abs(expected.item()), log_n)
    assert dx.dtype == dtype
    dx_relative = max(relative, 2.0 ** -7 if dtype == torch.bfloat16 else 0.0)
    assert (dx.double() - expected_dx).norm() <= 4 * dx_relative * expected_dx.norm()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("value", [2e9, 1e11])
def test_cuda_huge_maps_give_finite_statistics_whose_p_sum_to_one(value, precision):
    x = _constant_maps(70, 7, value).reshape(70, 1, 49).cuda()
    templates = contract_templates(7, 7, torch.float32, "cuda")
    row_max, log_sum, neg_entropy = cpp_cuda.row_stats(x, templates, TAU, precision)
    assert all(torch.isfinite(s).all() for s in (row_max, log_sum, neg_entropy))
    sums = cpp_cuda.column_sums(x, templates, TAU, row_max, log_sum, precision)
    assert (sums.double().sum(-1) - 70).abs().max().item() <= 1e-6 * 70
    loss = ef.ecloss(x.view(70, 1, 7, 7), backend="cuda", estimator="marginal",
                     precision=precision)
    assert abs(loss.item()) <= 1e-5 * math.log(templates.shape[0])


@pytest.mark.gpu
def test_cuda_column_sums_are_deterministic():
    x = peaked_maps(130, 3, 7, 7, seed=9).reshape(130, 3, 49).cuda()
    templates = contract_templates(7, 7, torch.float32, "cuda")
    row_max, log_sum, _ = cpp_cuda.row_stats(x, templates, TAU, "tf32")
    first = cpp_cuda.column_sums(x, templates, TAU, row_max, log_sum, "tf32")
    assert torch.equal(first, cpp_cuda.column_sums(x, templates, TAU, row_max, log_sum, "tf32"))


@pytest.mark.gpu
def test_cuda_kernels_reject_missing_or_misshapen_operand_templates():
    x = peaked_maps(2, 3, 7, 7, seed=3).reshape(2, 3, 49).cuda()
    templates = contract_templates(7, 7, torch.float32, "cuda")
    with pytest.raises(ValueError, match="operand_templates"):
        torch.ops.ecloss_fast_C.row_stats(x, templates, TAU, "bf16")
    operands = cpp_cuda.operand_templates(templates, "bf16")
    with pytest.raises(ValueError, match="operand_templates must be"):
        torch.ops.ecloss_fast_C.row_stats(x, templates, TAU, "bf16", operands[:-32])
    with pytest.raises(TypeError, match="operand_templates must be"):
        torch.ops.ecloss_fast_C.row_stats(x, templates, TAU, "tf32", operands)


def _probabilities_to_log(dtype, finite=False):
    """q over every binade the floor keeps and the ones it floors: 0, subnormals, the smallest
    normal, both sides of the reduction's sqrt(1/2) and of 1, near-uniform and peaked
    softmax columns, and (unless ``finite``) the values that come back as they are (NaN,
    +inf)."""
    info = torch.finfo(dtype)
    generator = torch.Generator().manual_seed(5)
    special = torch.tensor([0.0, info.tiny / 4, info.tiny, info.tiny * 3, 0.70710677, 0.70710678,
                            0.7071068, 1 - info.eps, 1.0, 1 + info.eps, 2.0, 1.4142135,
                            *(() if finite else (float("nan"), float("inf")))],
                           dtype=torch.float64)
    spread = torch.logspace(math.log10(info.tiny) - 2, 0, 3000, dtype=torch.float64)
    softmax = torch.rand(5000, generator=generator, dtype=torch.float64) / 19307
    return torch.cat([special, spread, softmax]).to(dtype).reshape(2, -1).contiguous()


def _float64_log_floored(q):
    """log max(q, tiny) evaluated in float64 by torch (NaN and +inf as they are)."""
    floored = torch.where(q < torch.finfo(q.dtype).tiny, torch.finfo(q.dtype).tiny, q)
    return floored.double().log()


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_floored_matches_float64_within_two_ulps(dtype, cpu_isa):
    q = _probabilities_to_log(dtype)
    scale = torch.tensor([1.0, -0.375], dtype=dtype)
    expected = _float64_log_floored(q)
    for factors, got in ((None, cpp_cpu.log_floored(q)),
                         (scale, cpp_cpu.log_floored(q, scale))):
        assert got.dtype == dtype and got.shape == q.shape
        reference = expected if factors is None else expected * factors.double()[:, None]
        finite = reference.isfinite()
        assert torch.equal(got.isnan(), reference.isnan())
        infinite = ~finite & ~reference.isnan()
        assert torch.equal(got[infinite], reference[infinite].to(dtype))
        ulps = ((got.double() - reference).abs()[finite]
                / (torch.finfo(dtype).eps * reference.abs()[finite].clamp_min(1e-300)))
        assert ulps.max() <= 2.0, f"{ulps.max():.2f} ulps"


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weighted_log_sums_match_float64(dtype, cpu_isa):
    q = _probabilities_to_log(dtype, finite=True)
    weights = torch.rand(q.shape, generator=torch.Generator().manual_seed(6), dtype=dtype)
    got = cpp_cpu.weighted_log_sums(weights, q)
    expected = (weights.double() * _float64_log_floored(q)).sum(-1)
    # Each product is within ~2.5 ulps in dtype (the log's 1.25, the product's rounding); the
    # float64 sum of N same-signed terms adds ~sqrt(N) float64 ulps (the float64 case's bound).
    columns = q.shape[-1]
    relative = torch.finfo(dtype).eps * 3 + torch.finfo(torch.float64).eps * 2 * math.sqrt(columns)
    torch.testing.assert_close(got.double(), expected, rtol=relative, atol=0)


@needs_extension
@pytest.mark.parametrize("call, says", [
    (lambda: cpp_cpu.log_floored(torch.rand(4, 6).t()), "must be a contiguous (R, N) float32"),
    (lambda: cpp_cpu.log_floored(torch.rand(4, 6, dtype=torch.float16)), "float32 or float64"),
    (lambda: cpp_cpu.log_floored(torch.rand(24)), "(R, N)"),
    (lambda: cpp_cpu.log_floored(torch.rand(4, 6), torch.rand(6)), "the scale must be (R,)"),
    (lambda: cpp_cpu.log_floored(torch.rand(4, 6), torch.rand(4, dtype=torch.float64)),
     "in the dtype of probabilities"),
    (lambda: cpp_cpu.weighted_log_sums(torch.rand(4, 5), torch.rand(4, 6)),
     "the weights must be (R, N)")])
def test_log_floored_rejects_malformed_input_saying_why(call, says):
    with pytest.raises(RuntimeError, match=re.escape(says)):
        call()


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["cpu", "torch"])  # reference: autograd, not the op
def test_the_marginal_takes_the_same_logarithms_with_and_without_the_kernels(
        backend, dtype, monkeypatch):
    # The op layer takes log pbar of CPU tensors with log_floored and weighted_log_sums
    # (ecloss_fast/_ops.py); torch's log elsewhere. Both give the marginal loss and dx.
    def loss_and_grad():
        x = peaked_maps(3, 4, 7, 7, dtype=dtype, seed=7).requires_grad_()
        loss = ef.ecloss(x, estimator="marginal", backend=backend).sum()
        return loss.detach(), torch.autograd.grad(loss, x)[0]

    from ecloss_fast import _ops

    with_kernels = loss_and_grad()
    assert _ops._cpu_kernels(with_kernels[0]) is not None
    monkeypatch.setattr(_ops, "_cpu_kernels", lambda tensor: None)
    with_torch = loss_and_grad()
    relative = RELATIVE[dtype]
    for got, expected in zip(with_kernels, with_torch):
        torch.testing.assert_close(got, expected, rtol=relative, atol=relative * expected.abs().max())
