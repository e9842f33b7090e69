"""The C++ extension (backends ``cpu`` and ``cuda``) against independent float64 evaluations.

Three levels: the contract functions (``row_stats``, ``column_sums``, ``input_grad`` of
``ecloss_fast.backends``) against an einsum evaluation of SPEC sections 2-3 written here;
``ecloss(backend="cpu")`` against ``ecloss(backend="reference")`` for values and ``dx``;
and float64 ``gradcheck``. Tolerances: relative 1e-5 for float32 (SPEC section 4), or, where
a result is a small difference of larger terms (near-uniform softmaxes), a few times the
error of PyTorch's own float32 evaluation of the same formula. The build itself is checked
through the module: the extension loads, and has CUDA kernels when a CUDA toolkit is there.
GPU tests (``@pytest.mark.gpu``) compare the ``cuda`` backend with the reference on CUDA.
"""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ecloss_fast as ef
from ecloss_fast.backends import cpp_cpu, cpp_cuda
from ecloss_fast.testing import peaked_maps, random_maps
from _contract import contract_templates, evaluate_contract

TAU = 1e-3
RELATIVE = {torch.float64: 1e-12, torch.float32: 1e-5}
GPU_RELATIVE = {"ieee": 1e-5, "tf32": 3e-3, "bf16": 3e-2}
BASELINE_MARGIN = 8.0  # the kernel may be this many times less exact than torch's float32
OPS = ("row_stats", "column_sums", "input_grad")

needs_extension = pytest.mark.skipif(cpp_cpu.availability() is not None,
                                     reason=f"{cpp_cpu.availability()}")


def _compiler_present() -> bool:
    return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


def _cuda_toolkit_present() -> bool:
    """What setup.py looks for: CUDA_HOME/CUDA_PATH, or an nvcc on PATH."""
    return (torch.version.cuda is not None and os.environ.get("ECLOSS_FAST_CUDA") != "0"
            and any((os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                     shutil.which("nvcc"))))


def _dx_scale(row_weight, num_templates, numel):
    """Size of the terms whose difference dx is, in norm: tau * row_weight * log N per entry."""
    return TAU * row_weight * math.log(num_templates) * math.sqrt(numel)


def _assert_close(name, got, truth, baseline, relative, scale=0.0):
    """``got`` within ``relative`` of ``truth`` (or of ``scale``, the size of the terms whose
    difference ``truth`` is), or within a few times ``baseline``'s own error."""
    error = (got.double() - truth).norm().item()
    allowed = max(relative * max(truth.norm().item(), scale),
                  BASELINE_MARGIN * (baseline.double() - truth).norm().item(), 1e-300)
    assert error <= allowed, f"{name}: error {error:.3g} > allowed {allowed:.3g}"


def _check_contract(backend, x, size, marginal, seed=0):
    """The three contract functions on ``x (B, C, H*W)`` against float64 and float32 einsums."""
    batch, channels, _ = x.shape
    h, w = size
    accumulation = torch.float64 if x.dtype == torch.float64 else torch.float32
    templates = contract_templates(h, w, accumulation, x.device)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(batch, channels, generator=generator, dtype=torch.float64) + 0.5
    truth = evaluate_contract(x.double(), templates.double(), weight.to(x.device), marginal)
    baseline = evaluate_contract(x.float(), templates.float(), weight.float().to(x.device), marginal)
    relative = RELATIVE[accumulation]
    size = torch.log(torch.tensor(float(templates.shape[0]))).item()

    lse, neg_entropy = backend.row_stats(x, templates, TAU, "ieee")
    assert lse.dtype == neg_entropy.dtype == accumulation
    assert lse.shape == neg_entropy.shape == (batch, channels)
    _assert_close("lse", lse, truth[0], baseline[0], relative)
    _assert_close("neg_entropy", neg_entropy, truth[1], baseline[1], relative,
                  scale=size * batch * channels)

    # The backward functions take the exact statistics, so only their own error shows.
    lse_in, neg_in = truth[0].to(accumulation), truth[1].to(accumulation)
    sums = backend.column_sums(x, templates, TAU, lse_in, "ieee")
    assert sums.dtype == accumulation and sums.shape == (channels, templates.shape[0])
    _assert_close("column_sums", sums, truth[2], baseline[2], relative)

    log_q = truth[3].to(accumulation) if marginal else None
    dx = backend.input_grad(x, templates, TAU, lse_in, neg_in, log_q, weight.to(accumulation),
                            "ieee")
    assert dx.dtype == x.dtype and dx.shape == x.shape
    _assert_close("dx", dx, truth[4], baseline[4], relative,
                  scale=_dx_scale(weight.max().item(), templates.shape[0], x.numel()))


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
def test_contract_matches_einsum(shape, maps, marginal, dtype):
    b, c, h, w = shape
    x = maps(b, c, h, w, dtype=dtype, seed=b * 100 + c).reshape(b, c, h * w)
    _check_contract(cpp_cpu, x, (h, w), marginal, seed=h * w)


@needs_extension
@pytest.mark.parametrize("marginal", [False, True])
@pytest.mark.parametrize("maps", [random_maps, peaked_maps])
def test_contract_full_14x14_set(maps, marginal):
    x = maps(2, 3, 14, 14, dtype=torch.float32, seed=7).reshape(2, 3, 196)
    _check_contract(cpp_cpu, x, (14, 14), marginal)


@needs_extension
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 9), channels=st.integers(1, 8), height=st.integers(1, 5),
       width=st.integers(1, 6), peaked=st.booleans(), marginal=st.booleans(),
       seed=st.integers(0, 2**16))
def test_contract_random_shapes(batch, channels, height, width, peaked, marginal, seed):
    maps = peaked_maps if peaked else random_maps
    x = maps(batch, channels, height, width, dtype=torch.float32, seed=seed)
    _check_contract(cpp_cpu, x.reshape(batch, channels, -1), (height, width), marginal, seed=seed)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_run_in_float32(dtype):
    x = peaked_maps(2, 3, 4, 5, dtype=dtype, seed=3).reshape(2, 3, 20)
    templates = contract_templates(4, 5, torch.float32)
    lse, neg_entropy = cpp_cpu.row_stats(x, templates, TAU, "ieee")
    expected = evaluate_contract(x.double(), templates.double(), torch.ones(2, 3, dtype=torch.float64),
                         False)
    torch.testing.assert_close(lse.double(), expected[0], rtol=1e-6, atol=0)
    dx = cpp_cpu.input_grad(x, templates, TAU, lse, neg_entropy, None, torch.ones(2, 3), "ieee")
    assert dx.dtype == dtype
    torch.testing.assert_close(dx.double(), expected[4], rtol=1e-2,
                               atol=1e-2 * expected[4].abs().max().item())


@needs_extension
def test_results_are_deterministic_and_independent_of_threads():
    x = peaked_maps(13, 4, 5, 5, dtype=torch.float32, seed=11).reshape(13, 4, 25)
    templates = contract_templates(5, 5, torch.float32)
    weight = torch.rand(13, 4)
    threads = torch.get_num_threads()

    def run():
        lse, neg_entropy = cpp_cpu.row_stats(x, templates, TAU, "ieee")
        sums = cpp_cpu.column_sums(x, templates, TAU, lse, "ieee")
        log_q = torch.log(sums / 13)
        return lse, neg_entropy, sums, cpp_cpu.input_grad(x, templates, TAU, lse, neg_entropy,
                                                           log_q, weight, "ieee")

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
def test_non_finite_input_gives_non_finite_statistics(bad):
    x = random_maps(2, 2, 3, 3, seed=1).reshape(2, 2, 9)
    x[1, 0, 4] = bad
    lse, neg_entropy = cpp_cpu.row_stats(x, contract_templates(3, 3, torch.float32), TAU, "ieee")
    assert not torch.isfinite(lse[1, 0]) or not torch.isfinite(neg_entropy[1, 0])
    assert torch.isfinite(lse[0]).all() and torch.isfinite(neg_entropy[0]).all()


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
    lse, neg_entropy = cpp_cpu.row_stats(x, templates, TAU, "ieee")
    with pytest.raises(ValueError, match="log_q must be \\(C, N\\)"):
        cpp_cpu.input_grad(x, templates, TAU, lse, neg_entropy, torch.zeros(2, 5), lse, "ieee")
    with pytest.raises(ValueError, match="per-row statistics must be \\(B, C\\)"):
        cpp_cpu.column_sums(x, templates, TAU, lse.t().contiguous(), "ieee")


@needs_extension
def test_opcheck_schema_and_meta_kernels():
    x = peaked_maps(2, 3, 3, 4, seed=5).reshape(2, 3, 12)
    templates = contract_templates(3, 4, torch.float32)
    lse, neg_entropy = cpp_cpu.row_stats(x, templates, TAU, "ieee")
    log_q = torch.log(cpp_cpu.column_sums(x, templates, TAU, lse, "ieee") / 2)
    cases = {
        "row_stats": (x, templates, TAU, "ieee"),
        "column_sums": (x, templates, TAU, lse, "ieee"),
        "input_grad": (x, templates, TAU, lse, neg_entropy, log_q, torch.ones(2, 3), "ieee"),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.ecloss_fast_C, name).default, args)


# --- through ecloss(backend="cpu") ------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("maps", [random_maps, peaked_maps])
@pytest.mark.parametrize("shape", [(4, 3, 5, 3), (2, 3, 14, 14)])
def test_ecloss_cpu_matches_reference(shape, maps, reduction, estimator):
    x = maps(*shape, dtype=torch.float32, seed=sum(shape)).requires_grad_()
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
    scale = max(expected_dx.norm().item(), _dx_scale(row_weight, n, x.numel()))
    assert (dx.double() - expected_dx).norm().item() <= 1e-5 * scale


@needs_extension
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
def test_gradcheck_float64(estimator):
    x = peaked_maps(3, 2, 3, 3, dtype=torch.float64, seed=2, scale=300.0).requires_grad_()

    def loss(maps):
        return ef.ecloss(maps, backend="cpu", estimator=estimator, reduction="none", tau=1e-2)

    assert torch.autograd.gradcheck(loss, (x,), eps=1e-4, atol=1e-9, rtol=1e-6)


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
    _check_contract_cuda(x, (h, w), marginal, precision)


def _check_contract_cuda(x, size, marginal, precision):
    batch, channels, _ = x.shape
    templates = contract_templates(*size, torch.float32, "cuda")
    weight = torch.rand(batch, channels, dtype=torch.float64, device="cuda") + 0.5
    truth = evaluate_contract(x.double(), templates.double(), weight, marginal)
    def rounded(tensor):  # the kernel's operand rounding; tf32 through torch's own switch
        return tensor.bfloat16().float() if precision == "bf16" else tensor.float()

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        baseline = evaluate_contract(rounded(x), rounded(templates), weight.float(), marginal)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    relative = GPU_RELATIVE[precision]
    log_n = torch.log(torch.tensor(float(templates.shape[0]))).item()
    lse, neg_entropy = cpp_cuda.row_stats(x, templates, TAU, precision)
    _assert_close("lse", lse, truth[0], baseline[0], relative)
    _assert_close("neg_entropy", neg_entropy, truth[1], baseline[1], relative,
                  scale=log_n * batch * channels)
    lse_in, neg_in = truth[0].float(), truth[1].float()
    sums = cpp_cuda.column_sums(x, templates, TAU, lse_in, precision)
    _assert_close("column_sums", sums, truth[2], baseline[2], relative)
    log_q = truth[3].float() if marginal else None
    dx = cpp_cuda.input_grad(x, templates, TAU, lse_in, neg_in, log_q, weight.float(), precision)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    _assert_close("dx", dx, truth[4], baseline[4], relative,
                  scale=_dx_scale(weight.max().item(), templates.shape[0], x.numel()))


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
    relative = GPU_RELATIVE[precision]
    log_n = torch.log(torch.tensor(float(ef.num_templates(14)))).item()
    assert abs(loss.item() - expected.item()) <= relative * max(abs(expected.item()), log_n)
    assert dx.dtype == dtype
    dx_relative = max(relative, 2.0 ** -7 if dtype == torch.bfloat16 else 0.0)
    assert (dx.double() - expected_dx).norm() <= 4 * dx_relative * expected_dx.norm()


@pytest.mark.gpu
def test_cuda_column_sums_are_deterministic():
    x = peaked_maps(130, 3, 7, 7, seed=9).reshape(130, 3, 49).cuda()
    templates = contract_templates(7, 7, torch.float32, "cuda")
    lse, _ = cpp_cuda.row_stats(x, templates, TAU, "tf32")
    first = cpp_cuda.column_sums(x, templates, TAU, lse, "tf32")
    assert torch.equal(first, cpp_cuda.column_sums(x, templates, TAU, lse, "tf32"))
