"""The Triton backend against an independent float64 evaluation of docs/design.md sections 2-3.

On the CPU every kernel runs in Triton's interpreter: ``ecloss_fast.triton_kernels.
run_interpreted`` interprets a kernel whatever ``TRITON_INTERPRET`` was when ``triton``
was imported (see that module), so these tests do not depend on the order in which pytest
imports modules, and CPU tensors always take the interpreted path. The tests through
``ecloss(backend="triton")`` set ``TRITON_INTERPRET=1`` (the backend's availability rule
for CPU tensors) and clear the dispatcher's cache around it.

Tolerances (docs/design.md section 4): relative error at most 1e-5 (ieee), 3e-3 (tf32) or 3e-2
(bf16) of the result, or, where the result is itself a small difference of larger terms
(near-uniform softmaxes, the ``B = 1`` marginal gradient, which is exactly 0), at most a
few times the error of PyTorch's own float32 evaluation with the same operand rounding.
GPU tests (``@pytest.mark.gpu``) repeat the comparisons on CUDA for every precision.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import ecloss_fast as ef  # noqa: E402
from ecloss_fast import _dispatch  # noqa: E402
from ecloss_fast.backends import triton_fused  # noqa: E402

from ecloss_fast.testing import peaked_maps, random_maps  # noqa: E402
from _contract import contract_templates, evaluate_contract  # noqa: E402
from _gpu_cases import (GPU_AUTO_DTYPES, GPU_AUTO_TAU, GPU_CASES,  # noqa: E402
                        GPU_ECLOSS_CASE, GPU_PRECISIONS, PRIORS, TAU)
from _tolerance import (BASELINE_MARGIN, PRECISION_RELATIVE, assert_close,  # noqa: E402
                        rounded)


def _check(name, got, truth, baseline, precision, scale=0.0, margin=BASELINE_MARGIN):
    """``assert_close`` at the section 4.4 bound of ``precision``; a bfloat16 result also
    carries its own rounding (relative ``2^-8``)."""
    relative = max(PRECISION_RELATIVE[precision], 2.0 ** -8 if got.dtype == torch.bfloat16 else 0.0)
    assert_close(name, got, truth, baseline, relative, scale, margin)


def _compare(x, templates, precision, prior_kind, seed=0, margin=BASELINE_MARGIN):
    """Run the three contract functions on ``x (B, C, K)`` and check them all, within
    ``margin`` times the float32 baseline's error where that is more than the bound.

    ``prior_kind``: ``"uniform"`` (no prior), ``"marginal"`` (``w_c log pbar`` from the
    kernel's own column sums, as the op passes it) or ``"general"`` (that plus a random
    ``(C, N)`` term of the same size, as the diversity term adds one).
    """
    batch, channels, _ = x.shape
    generator = torch.Generator().manual_seed(seed)
    # The contract's row weight is the same for every map of a channel.
    row_weight = (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
                  ).expand(batch, channels).to(x.device)
    marginal = prior_kind != "uniform"
    truth = evaluate_contract(x.double(), templates.double(), row_weight, marginal)

    row_max, log_sum, neg_entropy = triton_fused.row_stats(x, templates, TAU, precision)
    for stat in (row_max, log_sum, neg_entropy):
        assert stat.dtype == torch.float32 and stat.shape == (batch, channels)
    baseline = evaluate_contract(rounded(x, precision), rounded(templates, precision),
                                 row_weight.float(), marginal)
    _check("row_max", row_max, truth.row_max, baseline.row_max, precision, margin=margin)
    _check("log_sum", log_sum, truth.log_sum, baseline.log_sum, precision, margin=margin)
    _check("neg_entropy", neg_entropy, truth.neg_entropy, baseline.neg_entropy, precision,
           margin=margin)
    prior = None
    if marginal:
        sums = triton_fused.column_sums(x, templates, TAU, row_max, log_sum, precision)
        assert sums.shape == (channels, templates.shape[0]) and sums.dtype == torch.float32
        _check("column_sums", sums, truth.column_sums, baseline.column_sums, precision,
               margin=margin)
        log_q = torch.log((sums / batch).clamp_min(torch.finfo(torch.float32).tiny))
        prior = row_weight[0, :, None].float() * log_q
        if prior_kind == "general":
            prior = prior + row_weight[0, :, None].float() * torch.randn(
                prior.shape, generator=generator).to(x.device)
        truth = evaluate_contract(x.double(), templates.double(), row_weight, marginal,
                                  prior=prior.double())
        baseline = evaluate_contract(rounded(x, precision), rounded(templates, precision),
                                     row_weight.float(), marginal, prior=prior)
    dx = triton_fused.input_grad(x, templates, TAU, row_max, log_sum, neg_entropy, prior,
                                 row_weight.float().contiguous(), precision)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    # With B = 1 the marginal gradient is exactly 0: measure it on the scale of section 4's
    # near-uniform rule, log N times the size of tau * row_weight * sum_k p_k T_k.
    p = torch.softmax(TAU * torch.einsum("bck,nk->bcn", x.double(), templates.double()), -1)
    scale = (math.log(templates.shape[0]) * TAU * row_weight[..., None]
             * torch.einsum("bcn,nk->bck", p, templates.double().abs())).norm().item()
    _check("dx", dx, truth.dx, baseline.dx, precision, scale if batch == 1 else 0.0, margin)


# (height, width, B, C): K and N multiples of no block; rectangular maps; B = 1.
SMALL_SHAPES = [(3, 5, 2, 3), (3, 5, 1, 2), (7, 7, 3, 2)]


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("maps", [peaked_maps, random_maps], ids=["peaked", "random"])
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_float64_float32_input(shape, maps, prior):
    h, w, b, c = shape
    x = maps(b, c, h, w, seed=sum(shape)).reshape(b, c, h * w)
    _compare(x, contract_templates(h, w), "ieee", prior)


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_kernels_match_float64_bfloat16(precision, prior):
    """bfloat16 maps; and bfloat16 products (emulated in the interpreter, see ``_tiles``)."""
    x = peaked_maps(3, 2, 7, 7, seed=5).reshape(3, 2, 49)
    x = x.to(torch.bfloat16) if precision == "ieee" else x
    _compare(x, contract_templates(7, 7), precision, prior)


@pytest.mark.parametrize("prior", PRIORS)
def test_kernels_match_float64_float16_products(prior):
    """float16 maps with float16 products (``precision=None``'s resolution for them; emulated
    in the interpreter): the bfloat16 bound, the float32 gradient weights of ``_tiles``."""
    x = peaked_maps(3, 2, 7, 7, seed=6).reshape(3, 2, 49).half()
    _compare(x, contract_templates(7, 7), "fp16", prior)


def test_kernels_match_float64_14x14():
    """The paper's maps: 19,307 templates, B x C tiny (the interpreter runs in Python)."""
    x = peaked_maps(2, 1, 14, 14, seed=3).reshape(2, 1, 196)
    _compare(x, contract_templates(14, 14), "ieee", "general")


# (input dtype, precision) of the training sweeps' own tests: float32 at full precision,
# bfloat16 maps with bfloat16 products, float16 products (float32 gradient weights), float64.
TRAINING_ROUTES = [(torch.float32, "ieee"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"),
                   (torch.float64, "ieee")]
TRAINING_SHAPES = [(3, 5, 2, 3), (7, 7, 3, 2)]  # gradient kept whole; in two slices (ragged)
FLOAT64_RTOL = 1e-10


@pytest.fixture(params=["fused", "split", "chunked"])
def route(request, monkeypatch):
    """The training routes' forms (``configs.FUSED``), the split one also with its
    ``input_grad`` chunked (``configs.CHUNKED``): the interpreter takes the fused sweeps at
    these shapes unless told otherwise."""
    if request.param == "split":
        monkeypatch.setattr(triton_fused, "_fused", lambda *args: False)
    if request.param == "chunked":
        monkeypatch.setattr(triton_fused, "_chunked", lambda *args: True)
    return request.param


def _row_weight(channels, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
            ).expand(batch, channels)


@pytest.mark.parametrize("dtype, precision", TRAINING_ROUTES,
                         ids=[f"{str(d)[6:]}-{p}" for d, p in TRAINING_ROUTES])
@pytest.mark.parametrize("maps", [peaked_maps, random_maps], ids=["peaked", "random"])
@pytest.mark.parametrize("shape", TRAINING_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_row_stats_with_grad_matches_float64(route, shape, maps, dtype, precision):
    """All four outputs against the float64 contract; the statistics bitwise row_stats'."""
    h, w, b, c = shape
    x = maps(b, c, h, w, seed=sum(shape) + 20, dtype=dtype).reshape(b, c, h * w)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    templates = contract_templates(h, w, dtype=accumulation)
    ones = torch.ones(b, c, dtype=torch.float64)
    truth = evaluate_contract(x.double(), templates.double(), ones, marginal=False)

    *stats, grad = triton_fused.row_stats_with_grad(x, templates, TAU, precision)
    for got, inference in zip(stats, triton_fused.row_stats(x, templates, TAU, precision)):
        assert got.dtype == accumulation and got.shape == (b, c)
        assert torch.equal(got, inference)
    assert grad.dtype == accumulation and grad.shape == (b, c, h * w)
    names = ("row_max", "log_sum", "neg_entropy", "neg_entropy_grad")
    expected = (truth.row_max, truth.log_sum, truth.neg_entropy, truth.neg_entropy_grad)
    if dtype == torch.float64:
        for name, got, want in zip(names, (*stats, grad), expected):
            error = ((got - want).norm() / want.norm()).item()
            assert error <= FLOAT64_RTOL, f"{name}: relative error {error:.3g}"
        return
    baseline = evaluate_contract(rounded(x, precision), rounded(templates, precision),
                                 ones.float(), marginal=False)
    baselines = (baseline.row_max, baseline.log_sum, baseline.neg_entropy,
                 baseline.neg_entropy_grad)
    for name, got, want, base in zip(names, (*stats, grad), expected, baselines):
        _check(name, got, want, base, precision)


@pytest.mark.parametrize("prior_kind", ["uniform", "marginal", "general"])
@pytest.mark.parametrize("maps", [peaked_maps, random_maps], ids=["peaked", "random"])
def test_float64_input_grad_matches_float64(route, maps, prior_kind):
    """float64 maps: ``input_grad`` (the one-sweep prior path included) to float64 rounding."""
    b, c, h, w = 3, 2, 7, 7
    x = maps(b, c, h, w, seed=31, dtype=torch.float64).reshape(b, c, h * w)
    templates = contract_templates(h, w, dtype=torch.float64)
    row_weight = _row_weight(c, b, seed=32)
    row_max, log_sum, neg_entropy = triton_fused.row_stats(x, templates, TAU, "ieee")
    prior = None
    if prior_kind != "uniform":
        sums = triton_fused.column_sums(x, templates, TAU, row_max, log_sum, "ieee")
        prior = row_weight[0, :, None] * torch.log(sums / b)
        if prior_kind == "general":
            prior = prior + row_weight[0, :, None] * torch.randn(
                prior.shape, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
    truth = evaluate_contract(x, templates, row_weight, prior_kind != "uniform", prior=prior)
    dx = triton_fused.input_grad(x, templates, TAU, row_max, log_sum, neg_entropy, prior,
                                 row_weight.contiguous(), "ieee")
    assert dx.dtype == torch.float64
    error = ((dx - truth.dx).norm() / truth.dx.norm()).item()
    assert error <= FLOAT64_RTOL, f"dx: relative error {error:.3g}"


@pytest.mark.parametrize("dtype, precision", TRAINING_ROUTES[:2],
                         ids=[f"{str(d)[6:]}-{p}" for d, p in TRAINING_ROUTES[:2]])
def test_input_grad_prior_follows_a_best_template_found_late(route, dtype, precision):
    """The one-sweep prior gradient moves its reference ``c`` as the sweep goes: maps
    peaked on templates of later tiles (after flat first tiles), with a prior large enough
    that a stale reference would leave its error in ``dx``."""
    h, w, b, c = 7, 7, 2, 2
    templates = contract_templates(h, w)
    count = templates.shape[0]
    from ecloss_fast.triton_kernels import configs

    tile = configs.interpreter("input_grad_prior", b * c, count, h * w).block_n
    assert count > 2 * tile
    picks = torch.tensor([[count - 2, tile + 3], [2 * tile + 1, count - tile // 2]])
    x = (templates[picks].clamp_min(0) * (4e4 / (h * w))
         + 0.05 * torch.rand(b, c, h * w, generator=torch.Generator().manual_seed(41))
         ).to(dtype)
    row_weight = _row_weight(c, b, seed=42)
    prior = 3.0 * torch.randn(c, count, generator=torch.Generator().manual_seed(43))
    truth = evaluate_contract(x.double(), templates.double(), row_weight, True,
                              prior=prior.double())
    baseline = evaluate_contract(rounded(x, precision), rounded(templates, precision),
                                 row_weight.float(), True, prior=prior)
    row_max, log_sum, neg_entropy = triton_fused.row_stats(x, templates, TAU, precision)
    dx = triton_fused.input_grad(x, templates, TAU, row_max, log_sum, neg_entropy, prior,
                                 row_weight.float().contiguous(), precision)
    _check("dx", dx, truth.dx, baseline.dx, precision)


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("maps", [peaked_maps, random_maps], ids=["peaked", "random"])
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunked_input_grad_matches_float64(monkeypatch, shape, maps, prior):
    """The chunked ``input_grad`` (``score_grad`` then ``template_product``, chunks of two
    template tiles in two splits each, the last chunk partial) at the small shapes."""
    monkeypatch.setattr(triton_fused, "_chunked", lambda *args: True)
    h, w, b, c = shape
    x = maps(b, c, h, w, seed=sum(shape) + 50).reshape(b, c, h * w)
    _compare(x, contract_templates(h, w), "ieee", prior)


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("dtype, precision", [(torch.float32, "bf16"), (torch.float16, "fp16")],
                         ids=["bf16", "fp16"])
def test_chunked_input_grad_half_products(monkeypatch, dtype, precision, prior):
    """The chunked form's weights meet the templates as in ``input_grad_kernel``: bfloat16
    weights for bfloat16 products, float32 weights (TF32) for float16 templates."""
    monkeypatch.setattr(triton_fused, "_chunked", lambda *args: True)
    x = peaked_maps(3, 2, 7, 7, seed=8).reshape(3, 2, 49).to(dtype)
    _compare(x, contract_templates(7, 7), precision, prior)


def test_28x28_class_runs_the_chunked_backward(monkeypatch):
    """Maps of more than 256 pixels (16x17: K = 272, the 28x28 class) take the chunked
    ``input_grad`` unasked (``configs.CHUNKED``), in the backward with a prior and in the
    training route's split form, and match float64."""
    calls = []
    real = triton_fused._chunked_template_sums
    monkeypatch.setattr(triton_fused, "_chunked_template_sums",
                        lambda *args: calls.append(args[5] is not None) or real(*args))
    h, w, b, c = 16, 17, 2, 1
    templates = contract_templates(h, w)
    x = peaked_maps(b, c, h, w, seed=9).reshape(b, c, h * w)
    _compare(x, templates, "ieee", "general")
    assert calls == [True]
    *stats, grad = triton_fused.row_stats_with_grad(x, templates, TAU, "ieee")
    assert calls == [True, False]
    truth = evaluate_contract(x.double(), templates.double(), torch.ones(b, c, dtype=torch.float64),
                              marginal=False)
    baseline = evaluate_contract(x, templates, torch.ones(b, c), marginal=False)
    _check("neg_entropy_grad", grad, truth.neg_entropy_grad, baseline.neg_entropy_grad, "ieee")


def test_float64_input_accumulates_in_float64():
    x = peaked_maps(2, 2, 3, 5, seed=9, dtype=torch.float64).reshape(2, 2, 15)
    templates = contract_templates(3, 5, dtype=torch.float64)
    row_max, log_sum, neg_entropy = triton_fused.row_stats(x, templates, TAU, "ieee")
    truth = evaluate_contract(x, templates, torch.ones(2, 2, dtype=torch.float64), marginal=False)
    assert row_max.dtype == log_sum.dtype == neg_entropy.dtype == torch.float64
    torch.testing.assert_close(row_max, truth.row_max, rtol=1e-13, atol=0)
    torch.testing.assert_close(log_sum, truth.log_sum, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(neg_entropy, truth.neg_entropy, rtol=1e-10, atol=1e-14)


def test_column_sums_are_deterministic():
    x = random_maps(3, 3, 3, 5, seed=1).reshape(3, 3, 15)
    templates = contract_templates(3, 5)
    row_max, log_sum, _ = triton_fused.row_stats(x, templates, TAU, "ieee")
    first = triton_fused.column_sums(x, templates, TAU, row_max, log_sum, "ieee")
    assert torch.equal(first, triton_fused.column_sums(x, templates, TAU, row_max, log_sum, "ieee"))


def test_non_finite_input_gives_non_finite_statistics():
    x = peaked_maps(1, 2, 3, 5, seed=2).reshape(1, 2, 15)
    x[0, 0, 3] = float("nan")
    x[0, 1, 4] = float("inf")
    row_max, log_sum, neg_entropy = triton_fused.row_stats(x, contract_templates(3, 5), TAU, "ieee")
    for row in range(2):
        assert not torch.isfinite(neg_entropy[0, row])
        assert not (torch.isfinite(row_max[0, row]) and torch.isfinite(log_sum[0, row]))


@pytest.mark.parametrize("k, chunks", [(196, (128, 64, 16)), (49, (64, 0, 0)), (15, (16, 0, 0)),
                                       (240, (128, 64, 64)), (256, (256, 0, 0)),
                                       (100, (64, 32, 16))])
def test_k_chunks_cover_k_with_little_padding(k, chunks):
    assert triton_fused._chunks(k) == chunks
    assert k <= sum(chunks) < k + 64


def test_matrix_unit_configs_share_one_instruction_shape():
    """Every sweep must recompute bitwise the scores of row_stats: for the matrix-unit
    operand kinds, one block_n and 16 rows per warp in every kernel and candidate (one
    wgmma shape on Hopper; see triton_kernels.configs)."""
    from ecloss_fast.triton_kernels import configs

    for table in (configs.HOPPER, configs.AMPERE):
        for kind in ("bf16", "fp16", "tf32"):
            for k in configs.K_CLASSES:
                # template_product forms no scores: a plain product, not bound.
                tiles = [config for kernel in configs.KERNELS if kernel != "template_product"
                         for config in table[(kernel, kind, k)]]
                assert len({config.block_n for config in tiles}) == 1, (kind, k, tiles)
                assert all(config.block_m == 16 * config.num_warps for config in tiles), tiles


def test_default_configs_are_keyed_by_k_and_rows():
    """128-row forward tiles at the paper's B*C = 32,768 rows on 132 SMs, the small tile
    when the rows would leave SMs idle, a table for every kernel at K = 784, a clear error
    past K = 1024."""
    from ecloss_fast.triton_kernels import configs

    for kind in ("bf16", "tf32"):
        for kernel in ("row_stats", "column_sums", "row_prior", "input_grad"):
            assert configs.default(kernel, kind, (9, 0), 32_768, 132, 196).block_m == 128
        assert configs.default("row_stats", kind, (9, 0), 4_096, 132, 196).block_m == 64
    for kernel in configs.KERNELS:
        for kind in configs.OPERAND_KINDS:
            for capability in ((8, 0), (9, 0)):
                assert configs.candidates(kernel, kind, capability, 784)
    with pytest.raises(ValueError, match="at most 1024 pixels"):
        configs.candidates("row_stats", "bf16", (9, 0), 1025)


def test_every_training_route_has_a_form():
    """``configs.FUSED`` says fused or split for both training routes, every operand kind
    and K class (Hopper and Ampere alike), and the fused form has its tiles."""
    from ecloss_fast.triton_kernels import configs

    for route, kernel in (("row_stats_grad", "row_stats_grad"),
                          ("input_grad_prior", "input_grad_prior_fused")):
        for kind in configs.OPERAND_KINDS:
            for k in (196, 784):
                assert isinstance(configs.fused(route, kind, k), bool)
                assert configs.candidates(kernel, kind, (8, 0), k)
    assert not configs.fused("row_stats_grad", "bf16", 196)  # its slices would cost 2x


def test_interpreter_tiles_exercise_padding_and_dx_slices():
    """The shapes above run a ragged last template tile (prepared rows past N) and, above
    K = 32, a sliced dx with a ragged last slice; 3x5 keeps dx whole."""
    from ecloss_fast.triton_kernels import configs

    for h, w, b, c in SMALL_SHAPES:
        count = ef.num_templates(h, w)
        config = configs.interpreter("input_grad", b * c, count, h * w)
        assert count % config.block_n, (h, w, config)
        assert (config.dx_columns == 0) == (h * w <= 32), (h, w, config)
        if config.dx_columns:
            assert h * w % config.dx_columns, (h, w, config)


def test_interpreted_launch_leaves_triton_language_as_it_was():
    """Triton's interpreter (3.8) patches triton.language and does not undo it; run_interpreted
    does, on the releases below ``interpreter.LEAKING_BELOW`` (a later triton.compile in the
    process would otherwise build with its patches). On a later release this fails if its
    interpreter still leaks: ``LEAKING_BELOW`` is then to be raised."""
    from ecloss_fast.triton_kernels import interpreter

    before = interpreter.language_names()
    x = random_maps(1, 2, 3, 5, seed=4).reshape(1, 2, 15)
    triton_fused.row_stats(x, contract_templates(3, 5), TAU, "ieee")
    for namespace, names in before:
        current = vars(namespace)
        changed = [name for name, value in names.items() if current.get(name) is not value]
        assert not changed, (namespace, changed)


def test_column_sums_keep_their_mass_at_huge_scores():
    """At scores near 1e8 (ulp 8) a recomputed score or normaliser that is rounded unlike
    row_stats' moves each p by a factor up to e^8: the column sums of every channel must
    still add up to B."""
    # Constant maps: templates of equal sums tie for the maximum, so log_sum = log(ties).
    x = torch.tensor([2e9, 7e8, 3e9]).repeat(4, 1)[..., None].expand(4, 3, 15).contiguous()
    templates = contract_templates(3, 5)
    row_max, log_sum, _ = triton_fused.row_stats(x, templates, TAU, "ieee")
    sums = triton_fused.column_sums(x, templates, TAU, row_max, log_sum, "ieee")
    torch.testing.assert_close(sums.sum(-1), torch.full((3,), 4.0), rtol=1e-6, atol=0)


def test_availability_and_dtypes():
    from ecloss_fast.triton_kernels import configs

    cuda = torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert triton_fused.supports(cuda, dtype, 1024) is True
        assert triton_fused.supports(cuda, dtype, 1025) is False  # beyond configs.K_CLASSES
    assert not triton_fused.supports(cuda, torch.int32, 196)
    assert max(configs.K_CLASSES) == 1024
    with pytest.raises(ValueError, match="precision"):
        triton_fused.row_stats(torch.ones(1, 1, 15), contract_templates(3, 5), TAU, "fp8")


@pytest.fixture
def interpret(monkeypatch):
    """``TRITON_INTERPRET=1`` so that the dispatcher offers ``triton`` for CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _dispatch._load.cache_clear()
    yield
    monkeypatch.undo()
    _dispatch._load.cache_clear()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
def test_ecloss_matches_reference(interpret, estimator, reduction):
    assert triton_fused.availability() is None
    assert triton_fused.supports(torch.device("cpu"), torch.float32, 15)
    x = peaked_maps(3, 2, 3, 5, seed=11)
    results = {}
    for backend in ("reference", "triton"):
        leaf = x.clone().requires_grad_(True)
        loss = ef.ecloss(leaf, tau=TAU, estimator=estimator, reduction=reduction,
                         backend=backend, precision="ieee")
        upstream = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
        (loss * upstream).sum().backward()
        results[backend] = (loss.detach(), leaf.grad)
    loss, grad = results["triton"]
    truth_loss, truth_grad = results["reference"]
    # The marginal loss is H(pbar) - mean H(p), a difference of values of size log N.
    size = math.log(ef.num_templates(3, 5))
    torch.testing.assert_close(loss.double(), truth_loss.double(), rtol=1e-5, atol=1e-5 * size)
    assert (grad.double() - truth_grad.double()).norm() <= 1e-4 * truth_grad.double().norm()


# ---- GPU: the same comparisons compiled, every precision (bench/gpu_check.sh runs them; its
# plan compiles the kernels of tests/_gpu_cases.py first), and auto's warm-up ----

@pytest.mark.gpu
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("dtype, precision", GPU_PRECISIONS,
                         ids=[f"{str(d)[6:]}-{p}" for d, p in GPU_PRECISIONS])
@pytest.mark.parametrize("maps", [peaked_maps, random_maps], ids=["peaked", "random"])
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_kernels_match_float64(shape, maps, dtype, precision, prior):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    h, w, b, c = shape
    x = maps(b, c, h, w, seed=sum(shape), dtype=dtype).reshape(b, c, h * w).cuda()
    templates = contract_templates(h, w, device="cuda")
    margin = BASELINE_MARGIN
    if precision in ("tf32", "fp16"):
        # The float32 baseline cannot round like TF32 (fp16: the dx product's weights);
        # section 4's bound alone decides.
        margin = 3e-3 / 1e-7 * (1 if maps is random_maps else 0)
    _compare(x, templates, precision, prior, margin=margin)


@pytest.mark.gpu
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
def test_gpu_ecloss_matches_reference(estimator):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    h, w, b, c = GPU_ECLOSS_CASE
    x = peaked_maps(b, c, h, w, seed=1).cuda()
    grads = {}
    for backend in ("reference", "triton"):
        leaf = x.clone().requires_grad_(True)
        loss = ef.ecloss(leaf, tau=TAU, estimator=estimator, backend=backend, precision="ieee")
        loss.backward()
        grads[backend] = (loss.detach().double(), leaf.grad.double())
    assert math.isclose(grads["triton"][0].item(), grads["reference"][0].item(),
                        rel_tol=1e-5, abs_tol=1e-6)
    error = (grads["triton"][1] - grads["reference"][1]).norm()
    assert error <= 1e-4 * grads["reference"][1].norm()


def _compiled_kernels() -> int:
    """Compiled variants of every Triton kernel of the backend, over all devices."""
    from ecloss_fast.triton_kernels import column_sums, input_grad, row_prior, row_stats

    kernels = (row_stats.row_stats_kernel, column_sums.column_sums_kernel,
               row_prior.row_prior_kernel, input_grad.input_grad_kernel)
    return sum(len(caches[0]) for kernel in kernels
               for caches in getattr(kernel, "device_caches", {}).values())


@pytest.mark.gpu
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
@pytest.mark.parametrize("dtype", GPU_AUTO_DTYPES, ids=lambda d: str(d)[6:])
def test_gpu_auto_warm_up_compiles_every_kernel_the_loss_launches(dtype, estimator):
    """``auto``'s warm-up compiles and loads every kernel that the route's loss calls then
    launch, forward and backward: the calls compile nothing more. A ``tau`` that no other
    test uses (a compile-time constant) keeps this process's Triton from holding them
    already (the GPU check's precompile may have them on disk: loading counts too)."""
    from ecloss_fast._templates import template_matrix

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tau = GPU_AUTO_TAU
    x = peaked_maps(4, 8, 14, 14, seed=2, dtype=dtype).cuda()
    templates = template_matrix(14, 14, 4.0, None, x.device, torch.float32)
    _dispatch._VERDICTS.clear()
    before = _compiled_kernels()
    chosen = _dispatch.choose_backend("auto", x.reshape(4, 8, 196), templates, tau,
                                      _dispatch.resolve_precision("", dtype),
                                      estimator == "marginal")
    assert chosen == "triton"
    warmed = _compiled_kernels()
    assert warmed > before
    leaf = x.clone().requires_grad_()
    ef.ecloss(leaf, tau=tau, estimator=estimator).backward()
    torch.cuda.synchronize()
    assert _compiled_kernels() == warmed and torch.isfinite(leaf.grad).all()


@pytest.mark.gpu
def test_gpu_auto_falls_back_when_a_kernel_does_not_fit(monkeypatch):
    """A configuration that asks for more shared memory than the GPU has (8 pipeline stages):
    the warm-up's real ``OutOfResources`` sends the route, forward and backward, to the next
    backend, with one warning; the loss is the torch backend's to the precision's bound."""
    import dataclasses

    from ecloss_fast.triton_kernels import configs

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    default = configs.default

    def too_big(kernel, *args):
        config = default(kernel, *args)
        return dataclasses.replace(config, num_stages=8) if kernel == "column_sums" else config

    monkeypatch.setattr(configs, "default", too_big)
    _dispatch._VERDICTS.clear()
    x = peaked_maps(4, 8, 14, 14, seed=3).cuda()
    try:
        with pytest.warns(RuntimeWarning, match="'triton' failed: OutOfResources"):
            loss, grad = _loss_and_grad_of(x, "auto")
    finally:
        _dispatch._VERDICTS.clear()
    truth_loss, truth_grad = _loss_and_grad_of(x, "torch")
    assert math.isclose(loss.item(), truth_loss.item(), rel_tol=1e-5, abs_tol=1e-6)
    assert (grad - truth_grad).norm() <= 1e-4 * truth_grad.norm()


def _loss_and_grad_of(x, backend):
    leaf = x.clone().requires_grad_()
    loss = ef.ecloss(leaf, tau=TAU, estimator="marginal", backend=backend, precision="ieee")
    loss.backward()
    return loss.detach().double(), leaf.grad.double()
