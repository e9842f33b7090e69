"""Beyond the paper (docs/design.md section 8): ``diversity``, ``normalize`` and the diagnostics.

Every backend against a float64 evaluation written here from section 8's definitions, by
materialised scores and plain autograd (the templates built by loops, tests/_numpy_ecloss):

    pbar[c] = mean_b p[b,c],  pbb = mean_c pbar[c],  Div[c] = KL(pbar[c] || pbb)
    loss[c] = -MI[c] - lambda * Div[c],       xh = x / max(||x||, eps) with normalize

with the loss and ``dx`` for every reduction and a random upstream gradient, on random
(nearly uniform softmax) and peaked maps, both estimators. The ``triton`` backend runs in
Triton's interpreter; ``cpu`` is the C++ extension. Two gloo processes against one:
tests/test_distributed.py (its cases include ``diversity``).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import ecloss_fast as ef
from ecloss_fast.backends import streaming
from ecloss_fast.testing import peaked_maps, random_maps
from _numpy_ecloss import _templates
from test_robustness import runnable

FUSED = ("torch", "triton", "cpu")
REDUCTIONS = ("mean", "sum", "none")
MAPS = {"peaked": peaked_maps, "random": random_maps}


def definition(x, tau, estimator="uniform", diversity=0.0, normalize=False, eps=None):
    """``(loss[c], MI[c], p, scores)`` of section 8 in float64 from ``x (B, C, H, W)``."""
    b, c, h, w = x.shape
    rows = x.double().reshape(b, c, h * w)
    if normalize:
        floor = torch.finfo(x.dtype if eps is None else eps).tiny
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(floor)
    templates = torch.from_numpy(_templates(h, w))
    scores = tau * rows @ templates.T
    log_p = torch.log_softmax(scores, -1)
    p = log_p.exp()
    pbar = p.mean(0)
    log_q = pbar.log() if estimator == "marginal" else -math.log(templates.shape[0])
    information = (p * (log_p - log_q)).sum(-1).mean(0)
    pbb = pbar.mean(0)
    diversity_term = (pbar * (pbar.log() - pbb.log())).sum(-1)
    return -information - diversity * diversity_term, information, p, scores


def reduce(per_channel, reduction):
    return {"mean": per_channel.mean, "sum": per_channel.sum}.get(reduction, lambda: per_channel)()


def upstream_for(loss, seed):
    """A random upstream gradient of ``loss``'s shape (signs of both kinds)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(loss.shape, generator=g, dtype=torch.float64) + 0.5


def run(backend, x, upstream, **kwargs):
    """``(loss, dx, diagnostics)`` of ``ECLoss(**kwargs)(x)`` on ``backend``, float64 results."""
    leaf = x.clone().requires_grad_()
    criterion = ef.ECLoss(backend=backend, **kwargs)
    with runnable(backend):
        loss = criterion(leaf)
        (grad,) = torch.autograd.grad(loss, leaf, upstream.to(loss.dtype))
    return (loss.detach().double(), grad.double(),
            {name: value.item() for name, value in criterion.last_diagnostics.items()})


def gradient_size(x, tau, upstream, diversity, num_templates, scores):
    """The size of the terms a gradient is a difference of, as docs/design.md section 4
    bounds it on nearly uniform softmaxes: ``tau (log N + max|s|) |g| (1 + lambda) / B``
    per template weight, over ``sqrt(numel)`` entries."""
    term = math.log(num_templates) + scores.abs().max().item()
    return (tau * term * upstream.abs().max().item() * (1 + diversity) / x.shape[0]
            * math.sqrt(x.numel()))


def check_against_definition(backend, x, tau, estimator, reduction, seed, diversity=0.0,
                             normalize=False):
    x64 = x.double().requires_grad_()
    per_channel, _, _, scores = definition(x64, tau, estimator, diversity, normalize,
                                           eps=x.dtype)
    want = reduce(per_channel, reduction)
    upstream = upstream_for(want, seed)
    (want_grad,) = torch.autograd.grad(want, x64, upstream)
    loss, grad, _ = run(backend, x, upstream, tau=tau, estimator=estimator, reduction=reduction,
                        diversity=diversity, normalize=normalize, precision="ieee")
    exact = backend == "reference" and x.dtype == torch.float64
    tolerance = 1e-12 if exact else 1e-5
    size = math.log(scores.shape[-1]) * (1 + diversity) * per_channel.numel()
    assert (loss - want.detach()).abs().max().item() <= tolerance * max(
        want.detach().abs().max().item(), size), (loss, want)
    size = gradient_size(x, tau, upstream, diversity, scores.shape[-1], scores)
    error = (grad - want_grad).norm().item()
    assert error <= tolerance * (want_grad.norm().item() + size), (error, want_grad.norm(), size)


# ---- diversity ------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
@pytest.mark.parametrize("maps", MAPS)
@pytest.mark.parametrize("backend", ("reference",) + FUSED)
def test_diversity_matches_the_definition(backend, maps, estimator, reduction):
    x = MAPS[maps](4, 3, 4, 5, seed=len(maps) + len(estimator))
    check_against_definition(backend, x, 1e-3, estimator, reduction, seed=len(reduction),
                             diversity=0.8)


def test_reference_diversity_is_the_definition_in_float64():
    x = peaked_maps(3, 4, 3, 4, seed=5, dtype=torch.float64)
    for estimator in ("uniform", "marginal"):
        for reduction in REDUCTIONS:
            check_against_definition("reference", x, 2e-3, estimator, reduction, seed=3,
                                     diversity=1.7)


@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
def test_diversity_gradcheck_float64(estimator):
    x = random_maps(3, 3, 3, 2, dtype=torch.float64, seed=11).requires_grad_()
    fn = functools.partial(ef.ecloss, tau=0.7, estimator=estimator, reduction="none",
                           backend="torch", diversity=1.3)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    x = peaked_maps(3, 2, 3, 3, dtype=torch.float64, seed=12, scale=30.0).requires_grad_()
    fn = functools.partial(ef.ecloss, tau=0.05, estimator=estimator, templates=20,
                           backend="torch", diversity=0.4, reduction="sum")
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_diversity_rewards_channels_that_differ():
    """``Div = 0`` for identical channels, so the loss is the paper's; channels peaking at
    different templates lower it by ``lambda * Div`` with ``Div > 0``."""
    same = peaked_maps(4, 1, 4, 4, seed=2).expand(4, 3, 4, 4).contiguous()
    plain = ef.ecloss(same, reduction="none", backend="torch")
    torch.testing.assert_close(ef.ecloss(same, reduction="none", backend="torch", diversity=5.0),
                               plain, rtol=0, atol=1e-6)
    apart = peaked_maps(4, 3, 4, 4, seed=2)
    gain = (ef.ecloss(apart, reduction="none", backend="torch")
            - ef.ecloss(apart, reduction="none", backend="torch", diversity=2.0))
    assert (gain > 1e-3).all(), gain


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
def test_diversity_zero_is_the_plain_loss_bitwise(backend):
    x = peaked_maps(3, 2, 4, 4, seed=8)
    for estimator in ("uniform", "marginal"):
        upstream = torch.tensor([0.5, -1.5])
        runs = []
        for options in ({}, {"diversity": 0.0}, {"diversity": 0, "normalize": False}):
            leaf = x.clone().requires_grad_()
            with runnable(backend):
                loss = ef.ecloss(leaf, estimator=estimator, reduction="none", backend=backend,
                                 **options)
                (grad,) = torch.autograd.grad(loss, leaf, upstream)
            runs.append((loss, grad))
        for loss, grad in runs[1:]:
            assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_diversity_zero_adds_no_sweep(monkeypatch):
    """Uniform training sweeps the scores once (row_stats_with_grad: the backward only scales
    its gradient); diversity adds the column sums forward and one prior sweep backward."""
    names = ("row_stats", "row_stats_with_grad", "column_sums", "input_grad")
    calls = dict.fromkeys(names, 0)

    def counted(name, function):
        def call(*args):
            calls[name] += 1
            return function(*args)
        return call

    for name in names:
        monkeypatch.setattr(streaming, name, counted(name, getattr(streaming, name)))
    x = peaked_maps(2, 2, 4, 4, seed=1).requires_grad_()
    ef.ecloss(x, backend="torch", diversity=0.0).backward()
    assert calls == {"row_stats": 0, "row_stats_with_grad": 1, "column_sums": 0, "input_grad": 0}
    calls.update(dict.fromkeys(names, 0))
    ef.ecloss(x, backend="torch", diversity=0.5).backward()
    assert calls == {"row_stats": 1, "row_stats_with_grad": 0, "column_sums": 1, "input_grad": 1}
    calls.update(dict.fromkeys(names, 0))
    with torch.no_grad():
        ef.ecloss(x, backend="torch")
    assert calls == {"row_stats": 1, "row_stats_with_grad": 0, "column_sums": 0, "input_grad": 0}


# ---- normalize ------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
@pytest.mark.parametrize("maps", MAPS)
@pytest.mark.parametrize("backend", ("reference",) + FUSED)
def test_normalize_matches_the_definition(backend, maps, estimator, reduction):
    x = MAPS[maps](4, 3, 4, 5, seed=7 + len(maps))
    check_against_definition(backend, x, 8.0, estimator, reduction, seed=len(reduction),
                             normalize=True, diversity=0.5 if reduction == "none" else 0.0)


def test_normalize_gradcheck_float64():
    x = random_maps(3, 2, 3, 3, dtype=torch.float64, seed=4).requires_grad_()
    for estimator in ("uniform", "marginal"):
        fn = functools.partial(ef.ecloss, tau=3.0, estimator=estimator, reduction="none",
                               backend="torch", normalize=True, diversity=0.6)
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_normalize_removes_amplitude():
    x = peaked_maps(3, 2, 4, 4, seed=3)
    scaled = x * torch.tensor([0.01, 50.0])[None, :, None, None]
    torch.testing.assert_close(ef.ecloss(scaled, tau=5.0, normalize=True, reduction="none"),
                               ef.ecloss(x, tau=5.0, normalize=True, reduction="none"))


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
def test_normalize_dead_map_is_uniform_with_zero_gradient(backend):
    x = peaked_maps(3, 2, 4, 4, seed=6)
    x[1, 0] = 0.0
    x[2, 1] = 1e-45  # subnormal: below the floor, held constant too
    upstream = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, grad, diagnostics = run(backend, x, upstream, tau=6.0, normalize=True,
                                  reduction="none", estimator="marginal", diversity=0.3)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert grad[1, 0].abs().max() == 0 and grad[2, 1].abs().max() == 0
    assert grad[0].abs().max() > 0
    # The dead map counts with a uniform softmax: as a zero map, scored unnormalised.
    alive = x.clone()
    alive[2, 1] = 0.0
    want, _, p, _ = definition(alive.double(), 6.0, "marginal", 0.3, normalize=True)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(p[1, 0], torch.full_like(p[1, 0], 1 / p.shape[-1]))


# ---- diagnostics ----------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("maps", MAPS)
@pytest.mark.parametrize("backend", ("reference",) + FUSED)
def test_diagnostics_match_their_definitions(backend, maps, normalize):
    x = MAPS[maps](4, 3, 4, 5, seed=13)
    tau = 6.0 if normalize else 1e-3
    for estimator, reduction in (("uniform", "mean"), ("marginal", "none"), ("marginal", "sum")):
        _, information, p, scores = definition(x, tau, estimator, normalize=normalize)
        want = {"mi_over_log_n": information.mean().item() / math.log(scores.shape[-1]),
                "max_p": p.amax(-1).mean().item(),
                "score_std": scores.std(-1, correction=0).mean().item()}
        loss, _, got = run(backend, x, torch.ones(()) if reduction != "none" else torch.ones(3),
                           tau=tau, estimator=estimator, reduction=reduction,
                           diversity=0.4, normalize=normalize, precision="ieee")
        assert set(got) == set(want)
        for name, value in want.items():
            # MI near a uniform softmax is a difference of entropies of size log N.
            scale = 1.0 if name == "mi_over_log_n" else abs(value)
            assert abs(got[name] - value) <= 1e-5 * scale, (name, got[name], value)


def test_diagnostics_are_detached_tensors_and_follow_the_last_call():
    criterion = ef.ECLoss(estimator="marginal", backend="torch")
    assert criterion.last_diagnostics == {}
    x = peaked_maps(2, 3, 4, 4, seed=1).requires_grad_()
    criterion(x)
    first = dict(criterion.last_diagnostics)
    assert all(v.dim() == 0 and not v.requires_grad and v.dtype == torch.float32
               for v in first.values())
    criterion(random_maps(2, 3, 4, 4, seed=2))
    assert criterion.last_diagnostics["max_p"] < first["max_p"]  # a flatter softmax


def test_diversity_normalize_and_diagnostics_under_torch_compile():
    """``fullgraph=True, dynamic=True`` over two batch sizes: loss, gradient and diagnostics
    as in eager mode (the normalisation is traced; the diagnostics come out of the op)."""
    criterion = ef.ECLoss(estimator="marginal", backend="torch", diversity=0.5, normalize=True,
                          tau=4.0, reduction="none")
    upstream = torch.tensor([0.5, -1.0, 2.0])
    torch._dynamo.reset()
    compiled = torch.compile(criterion, fullgraph=True, dynamic=True)
    try:
        for batch in (2, 3):
            x = peaked_maps(batch, 3, 4, 4, seed=batch)
            results = []
            for fn in (criterion, compiled):
                leaf = x.clone().requires_grad_()
                loss = fn(leaf)
                (grad,) = torch.autograd.grad(loss, leaf, upstream)
                results.append((loss, grad, dict(criterion.last_diagnostics)))
            (loss, grad, eager), (compiled_loss, compiled_grad, diagnostics) = results
            torch.testing.assert_close(compiled_loss, loss)
            torch.testing.assert_close(compiled_grad, grad)
            assert diagnostics.keys() == eager.keys()
            for name, value in eager.items():
                torch.testing.assert_close(diagnostics[name], value)
    finally:
        torch._dynamo.reset()
