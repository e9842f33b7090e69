"""Backend ``torch`` (streaming) against the reference: values and gradients."""
import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ecloss_fast as ef
from ecloss_fast.backends import streaming
from ecloss_fast.testing import peaked_maps, random_maps

# Relative tolerance per input dtype: float32 and float64 accumulate in float32 / float64;
# half inputs also accumulate in float32, but their gradient is rounded to the input dtype.
LOSS_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def assert_matches_reference(x, upstream=None, **kwargs):
    """Loss and dx of the torch backend against the float64 reference on the same values.

    Float32 products (``precision="ieee"``) unless asked otherwise: ``precision=None`` gives
    half maps half products (tests/test_api.py), whose rounding is not the point here.
    """
    n = kwargs.get("templates", "full")
    x_ref = x.detach().double().requires_grad_()
    x_fast = x.detach().clone().requires_grad_()
    ref = ef.ecloss(x_ref, backend="reference", **kwargs)
    fast = ef.ecloss(x_fast, backend="torch", **{"precision": "ieee", **kwargs})
    upstream = torch.ones_like(ref) if upstream is None else upstream
    (grad_ref,) = torch.autograd.grad(ref, x_ref, upstream)
    (grad_fast,) = torch.autograd.grad(fast, x_fast, upstream.to(fast.dtype))
    assert fast.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert grad_fast.dtype == x.dtype and grad_fast.shape == x.shape
    h, w = x.shape[-2:]
    count = n.shape[0] if isinstance(n, torch.Tensor) else n if isinstance(n, int) else ef.num_templates(h, w)
    tol = LOSS_TOL[x.dtype]
    # Nearly uniform softmaxes make the loss a small difference of numbers of size log N.
    torch.testing.assert_close(fast.double(), ref, rtol=tol, atol=tol * math.log(count + 1))
    # docs/design.md section 4.4 (Error bounds): on nearly uniform softmaxes the error is
    # bounded relative to the size of the terms (log N per score), not to the result:
    # tau * log N * |g| / B per template.
    term = max(math.log(count + 1), max_abs_score(x, **kwargs))
    size = tau_of(kwargs) * term * upstream.abs().max() / x.shape[0] * math.sqrt(x.numel())
    error = (grad_fast.double() - grad_ref).norm()
    assert error <= GRAD_TOL[x.dtype] * (grad_ref.norm() + size), (error, grad_ref.norm(), size)


def tau_of(kwargs):
    return kwargs.get("tau", 1e-3)


def max_abs_score(x, tau=1e-3, templates="full", **_):
    """``max |s|`` in float64: the size of the terms whose differences make the gradient."""
    h, w = x.shape[-2:]
    if isinstance(templates, torch.Tensor):
        t = templates.double().reshape(templates.shape[0], -1)
    else:
        t = ef.make_templates(h, w, subset=templates if isinstance(templates, int) else None,
                              dtype=torch.float64).reshape(-1, h * w)
    return (tau * x.double().reshape(-1, h * w) @ t.T).abs().max().item()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 4), c=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       peaked=st.booleans(), estimator=st.sampled_from(["uniform", "marginal"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**16))
def test_random_shapes(b, c, h, w, dtype, peaked, estimator, reduction, seed):
    make = peaked_maps if peaked else random_maps
    x = make(b, c, h, w, dtype=dtype, seed=seed)
    upstream = None
    if reduction == "none":
        upstream = torch.randn(c, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert_matches_reference(x, upstream, estimator=estimator, reduction=reduction)


@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
@pytest.mark.parametrize("make", [peaked_maps, random_maps])
def test_full_14x14_set(estimator, make, monkeypatch):
    # Small chunks so the online rescaling runs over many template tiles.
    monkeypatch.setattr(streaming, "_TILE_BYTES", 4096 * 4)
    x = make(2, 3, 14, 14, dtype=torch.float32, seed=7)
    assert_matches_reference(x, estimator=estimator, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
def test_blocks_of_maps(estimator, dtype, monkeypatch):
    # Tiles of one map by 49 templates: every sweep walks four blocks of rows, each with its
    # own online state and its own one-sweep sums, and the column sums add up the blocks.
    monkeypatch.setattr(streaming, "_TILE_BYTES", 3 * 49 * torch.finfo(dtype).bits // 8)
    x = peaked_maps(4, 3, 7, 7, dtype=dtype, seed=5)
    tiles = streaming._tiles(4, 3, 49, ef.num_templates(7), x.element_size())
    assert [maps for maps, _, _ in tiles] == [slice(b, b + 1) for b in range(4)]
    assert all(chunk.stop - chunk.start == 49 for _, _, chunks in tiles for chunk in chunks[:-1])
    assert_matches_reference(x, estimator=estimator, reduction="sum")
    assert_matches_reference(random_maps(4, 3, 7, 7, dtype=dtype, seed=6), estimator=estimator)


@pytest.mark.parametrize("templates", [400, 37, "tensor"])
def test_subsets_and_user_templates(templates):
    x = peaked_maps(3, 2, 6, 5, seed=3)
    if templates == "tensor":
        templates = torch.rand(50, 6, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for estimator in ("uniform", "marginal"):
        assert_matches_reference(x, estimator=estimator, templates=templates)


def test_very_peaked_scores_do_not_overflow(monkeypatch):
    monkeypatch.setattr(streaming, "_TILE_BYTES", 64 * 4)
    x = peaked_maps(2, 2, 4, 4, scale=1e7, seed=5)  # scores of order 1e4
    loss = ef.ecloss(x, backend="torch", reduction="none")
    assert torch.isfinite(loss).all()
    assert_matches_reference(x, estimator="marginal")


@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
def test_gradcheck_float64(estimator):
    x = random_maps(2, 3, 3, 2, dtype=torch.float64, seed=11).requires_grad_()
    fn = functools.partial(ef.ecloss, tau=0.7, estimator=estimator, reduction="none",
                           backend="torch")
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    x = peaked_maps(3, 2, 3, 3, dtype=torch.float64, seed=12, scale=30.0).requires_grad_()
    fn = functools.partial(ef.ecloss, tau=0.05, estimator=estimator, templates=20,
                           backend="torch")
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_deterministic_bitwise():
    x = peaked_maps(3, 4, 7, 7, seed=2).requires_grad_()
    runs = []
    for _ in range(2):
        loss = ef.ecloss(x, backend="torch", estimator="marginal")
        (grad,) = torch.autograd.grad(loss, x)
        runs.append((loss, grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
