"""The cuda backend's one-sweep kernels against float64 evaluations of the backend contract.

``row_stats_with_grad`` (statistics and ``neg_entropy_grad`` from one sweep) and
``input_grad`` with a prior (``D`` and ``dx`` from one sweep). Both fall back to the
two-sweep kernels where the fused kernel would hold fewer blocks per SM
(csrc/cuda_ops.cpp, ``runs_fused``): the small grids here run fused, the large grid
test runs whichever the GPU picks for bf16 at K = 196. Every test needs a CUDA device.
"""
from __future__ import annotations

import math

import pytest
import torch

from ecloss_fast._precision import PRECISIONS
from ecloss_fast.backends import cpp_cuda
from ecloss_fast.testing import peaked_maps, random_maps
from _contract import contract_templates, dx_scale, evaluate_contract, marginal_prior, prior_dx
from _tolerance import PRECISION_RELATIVE, assert_close, rounded, tf32_products

TAU = 1e-3
SHAPES = [(3, 5, 4, 6), (2, 3, 14, 14), (70, 2, 7, 7)]


def _check_row_stats_with_grad(x, size, precision, truth_rows=None):
    """``row_stats_with_grad`` on ``x (B, C, K)`` against float64 (on its first
    ``truth_rows`` batch entries, all by default) and against ``row_stats``/``input_grad``."""
    batch, channels, _ = x.shape
    templates = contract_templates(*size, torch.float32, x.device)
    row_max, log_sum, neg_entropy, grad = cpp_cuda.row_stats_with_grad(x, templates, TAU,
                                                                      precision)
    assert grad.dtype == torch.float32 and grad.shape == x.shape
    for statistic in (row_max, log_sum, neg_entropy):
        assert statistic.dtype == torch.float32 and statistic.shape == (batch, channels)

    part = slice(0, truth_rows or batch)
    unit_weight = torch.ones(x[part].shape[:2], dtype=torch.float64, device=x.device)
    truth = evaluate_contract(x[part].double(), templates.double(), unit_weight, False)
    with tf32_products(precision == "tf32"):
        baseline = evaluate_contract(rounded(x[part], precision),
                                     rounded(templates, precision), unit_weight.float(), False)
    relative = PRECISION_RELATIVE[precision]
    log_n = math.log(templates.shape[0])
    rows = unit_weight.numel()
    assert_close("row_max", row_max[part], truth.row_max, baseline.row_max, relative)
    assert_close("log_sum", log_sum[part], truth.log_sum, baseline.log_sum, relative,
                  scale=log_n * rows)
    assert_close("neg_entropy", neg_entropy[part], truth.neg_entropy, baseline.neg_entropy,
                  relative, scale=log_n * rows)
    assert_close("neg_entropy_grad", grad[part], truth.neg_entropy_grad,
                  baseline.neg_entropy_grad, relative,
                  scale=dx_scale(1.0, templates.shape[0], x[part].numel()))

    # The same scores as row_stats: the same maxima (a max is exact); the sums to rounding.
    expected_max, expected_log_sum, expected_neg_entropy = cpp_cuda.row_stats(
        x, templates, TAU, precision)
    assert torch.equal(row_max, expected_max)
    torch.testing.assert_close(log_sum, expected_log_sum, rtol=0, atol=1e-5 * log_n)
    torch.testing.assert_close(neg_entropy, expected_neg_entropy, rtol=0, atol=1e-5 * log_n)
    # The uniform estimator's dx is row_weight * neg_entropy_grad: input_grad's, w = 1.
    expected_grad = cpp_cuda.input_grad(x.float(), templates, TAU, expected_max,
                                        expected_log_sum, expected_neg_entropy, None,
                                        torch.ones_like(expected_max), precision)
    assert_close("neg_entropy_grad against input_grad", grad, expected_grad.double(),
                  expected_grad, relative,
                  scale=dx_scale(1.0, templates.shape[0], x.numel()))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("maps", [random_maps, peaked_maps])
@pytest.mark.parametrize("shape", SHAPES)
def test_row_stats_with_grad_matches_float64(shape, maps, precision):
    assert cpp_cuda.availability() is None, cpp_cuda.availability()
    b, c, h, w = shape
    x = maps(b, c, h, w, seed=b + c).reshape(b, c, h * w).cuda()
    _check_row_stats_with_grad(x, (h, w), precision)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_stats_with_grad_of_half_maps(dtype):
    x = peaked_maps(4, 6, 14, 14, dtype=dtype, seed=5).reshape(4, 6, 196).cuda()
    _check_row_stats_with_grad(x, (14, 14), "bf16" if dtype == torch.bfloat16 else "tf32")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_row_stats_with_grad_of_a_large_grid(precision):
    # 20,000 rows at K = 196: 313 row blocks, more than one per SM of any current GPU, where
    # the bf16 kernel may take the two-sweep route; float64 truth on the first 2 batches.
    x = peaked_maps(100, 200, 14, 14, seed=6).reshape(100, 200, 196).cuda()
    _check_row_stats_with_grad(x, (14, 14), precision, truth_rows=2)


def _check_prior_input_grad(x, size, precision, prior, channel_weight):
    batch, channels, _ = x.shape
    templates = contract_templates(*size, torch.float32, x.device)
    weight = channel_weight.expand(batch, channels)
    row_max, log_sum, neg_entropy = cpp_cuda.row_stats(x, templates, TAU, precision)
    dx = cpp_cuda.input_grad(x, templates, TAU, row_max, log_sum, neg_entropy, prior.float(),
                             weight.float().contiguous(), precision)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    truth = prior_dx(x.double(), templates.double(), weight, prior)
    with tf32_products(precision == "tf32"):
        baseline = prior_dx(rounded(x, precision), rounded(templates, precision),
                             weight.float(), prior.float())
    size_of_terms = TAU * (prior.abs().max().item() + math.log(templates.shape[0])) * math.sqrt(
        x.numel()) * weight.abs().max().item()
    assert_close("dx", dx, truth, baseline, PRECISION_RELATIVE[precision], scale=size_of_terms)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("maps", [random_maps, peaked_maps])
@pytest.mark.parametrize("shape", SHAPES)
def test_input_grad_with_a_marginal_prior_matches_float64(shape, maps, precision):
    b, c, h, w = shape
    x = maps(b, c, h, w, seed=b * c).reshape(b, c, h * w).cuda()
    templates = contract_templates(h, w, torch.float64, "cuda")
    generator = torch.Generator().manual_seed(b)
    channel_weight = (torch.rand(c, generator=generator, dtype=torch.float64) + 0.5).cuda()
    sums = evaluate_contract(x.double(), templates, channel_weight.expand(b, c), True).column_sums
    _check_prior_input_grad(x, (h, w), precision, marginal_prior(sums, channel_weight),
                            channel_weight)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("maps", [random_maps, peaked_maps])
def test_input_grad_with_a_general_prior_matches_float64(maps, precision):
    # Any (C, N) prior, as the channel-diversity term passes one; weights of both signs.
    b, c, h, w = 5, 3, 14, 14
    x = maps(b, c, h, w, seed=11).reshape(b, c, h * w).cuda()
    generator = torch.Generator().manual_seed(11)
    channel_weight = (torch.rand(c, generator=generator, dtype=torch.float64) - 0.5).cuda()
    count = contract_templates(h, w).shape[0]
    prior = torch.randn(c, count, generator=generator, dtype=torch.float64).cuda()
    _check_prior_input_grad(x, (h, w), precision, prior, channel_weight)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_input_grad_with_a_prior_of_half_maps(dtype):
    b, c = 4, 6
    x = peaked_maps(b, c, 14, 14, dtype=dtype, seed=8).reshape(b, c, 196).cuda()
    templates = contract_templates(14, 14, torch.float64, "cuda")
    channel_weight = torch.full((c,), 0.25, dtype=torch.float64, device="cuda")
    sums = evaluate_contract(x.double(), templates, channel_weight.expand(b, c), True).column_sums
    _check_prior_input_grad(x, (14, 14), "bf16" if dtype == torch.bfloat16 else "tf32",
                            marginal_prior(sums, channel_weight), channel_weight)
