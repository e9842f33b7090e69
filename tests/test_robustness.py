"""Numerics at every score magnitude, for every backend that runs on the CPU.

A diverging training run or a careless caller reaches float32 scores of 1e7 and more,
where one ulp of a score is about 1: every ``p`` that enters a sum must then come from
the same rounded scores and the same normaliser (docs/design.md section 4). Checked here
against independent float64 evaluations:

* the loss stays in its range (``[-log N, 0]`` uniform, ``[-log min(N, B), 0]`` marginal)
  up to the rounding of numbers of size ``log N``, is finite with a finite gradient, and
  equals the float64 loss within a tolerance that scales with the scores' own rounding;
* ``dx`` on peaked maps is within 1e-5 of float64 (float32, ``precision="ieee"``);
* ``torch.compile(fullgraph=True, dynamic=True)`` equals eager over two batch sizes.

The ``triton`` backend runs in Triton's interpreter here (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ecloss_fast as ef
from ecloss_fast import _dispatch
from ecloss_fast.backends import cpp_cpu
from ecloss_fast.testing import peaked_maps
from _numpy_ecloss import loss_and_grad

TAU = 1e-3
MAP_KINDS = ("constant", "template", "identical", "random", "dead")
# A loss is a difference of entropies of size log N, each rounded: allow this many ulps.
ROUNDING_ULPS = 8


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_backends():
    names = ["reference", "torch"]
    if "cpu" in ef.available_backends():
        names.append("cpu")
    if _triton_importable():
        names.append("triton")
    return names


CPU_BACKENDS = _cpu_backends()
# The cpu backend's instruction-set paths below the best (which "cpu" runs), as "cpu@path".
OTHER_CPU_PATHS = ([f"cpu@{path}" for path in cpp_cpu.isa_paths()[:-1]]
                   if "cpu" in CPU_BACKENDS else [])
FUSED_CPU_BACKENDS = [name for name in CPU_BACKENDS if name != "reference"]


@contextlib.contextmanager
def runnable(backend):
    """The backend's name for ``ecloss``, made runnable: ``cpu@path`` is the cpu backend on
    that instruction-set path (``ECLOSS_FAST_CPU_ISA``; conftest restores the environment);
    ``triton`` runs CPU tensors in Triton's interpreter, as the dispatcher requires."""
    name, _, path = backend.partition("@")
    if path:
        os.environ[cpp_cpu.ISA_VARIABLE] = path
    if name != "triton":
        yield name
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _dispatch._load.cache_clear()
    try:
        yield name
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
        _dispatch._load.cache_clear()


def make_maps(kind, batch, channels, height, width, magnitude, seed):
    """float64 post-ReLU maps of one kind, scaled so that the largest ``|score|`` is ``magnitude``.

    ``constant``: one value per channel everywhere; ``template``: each map one template
    (clamped at 0) times a random scale; ``identical``: one random map repeated over the
    batch; ``random``: ``|N(0, 1)|``; ``dead``: random with about half the maps all zero.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    shape = (batch, channels, height, width)
    templates = ef.make_templates(height, width, dtype=f64)
    if kind == "constant":
        x = (torch.rand(1, channels, 1, 1, generator=g, dtype=f64) + 0.5).expand(shape)
    elif kind == "template":
        pick = torch.randint(0, templates.shape[0] - 1, (batch, channels), generator=g)
        x = templates[pick].clamp_min(0) * (torch.rand(batch, channels, 1, 1, generator=g,
                                                       dtype=f64) + 0.5)
    elif kind == "identical":
        x = torch.rand(1, channels, height, width, generator=g, dtype=f64).expand(shape)
    elif kind == "random":
        x = torch.randn(shape, generator=g, dtype=f64).abs()
    else:
        alive = torch.rand(batch, channels, 1, 1, generator=g) < 0.5
        x = torch.randn(shape, generator=g, dtype=f64).abs() * alive
    largest = (TAU * torch.einsum("bchw,nhw->bcn", x, templates)).abs().max()
    return (x * (magnitude / largest) if largest > 0 else x).contiguous()


def accumulation(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rounding_allowance(dtype, num_templates):
    """A few ulps of ``log N``: the rounding of the entropies that a loss is the difference of."""
    return ROUNDING_ULPS * torch.finfo(accumulation(dtype)).eps * math.log(num_templates)


def score_error(x):
    """A bound on the rounding of float32 (float64) scores: ``(K + 1) eps tau max_row sum|x|``.

    The templates lie in ``[-1, 1]``, so a score's terms sum to at most ``tau sum_k |x_k|``.
    """
    eps = torch.finfo(accumulation(x.dtype)).eps
    pixels = x.shape[-2] * x.shape[-1]
    largest_row = x.double().abs().flatten(2).sum(-1).max().item()
    return (pixels + 1) * eps * TAU * largest_row


@pytest.mark.parametrize("backend", CPU_BACKENDS + OTHER_CPU_PATHS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(MAP_KINDS), exponent=st.floats(-6.0, 8.0),
       batch=st.integers(1, 8), channels=st.integers(1, 3), height=st.integers(1, 4),
       width=st.integers(2, 4), estimator=st.sampled_from(["uniform", "marginal"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
# Where a float32 log-partition rounded once, or scores rounded differently per sweep,
# gave marginal losses out of range by 1e-4 .. 2 (one of each kind of map).
@example(kind="constant", exponent=8.0, batch=1, channels=2, height=3, width=3,
         estimator="marginal", dtype=torch.float32, seed=0)
@example(kind="template", exponent=8.0, batch=8, channels=2, height=3, width=3,
         estimator="marginal", dtype=torch.float32, seed=1)
@example(kind="identical", exponent=4.0, batch=8, channels=2, height=3, width=3,
         estimator="marginal", dtype=torch.float32, seed=2)
@example(kind="random", exponent=7.0, batch=8, channels=3, height=4, width=4,
         estimator="marginal", dtype=torch.float32, seed=3)
# Where the forward's sum_t colsum log pbar, plainly summed in float64 vector lanes, gave
# -1.2e-14 (12 ulps of the sum; compensated since).
@example(kind="dead", exponent=0.0, batch=1, channels=1, height=4, width=4,
         estimator="marginal", dtype=torch.float64, seed=1)
def test_loss_in_range_finite_and_exact_at_every_magnitude(backend, kind, exponent, batch,
                                                           channels, height, width,
                                                           estimator, dtype, seed):
    x = make_maps(kind, batch, channels, height, width, 10.0 ** exponent, seed).to(dtype)
    num_templates = ef.num_templates(height, width)
    leaf = x.clone().requires_grad_()
    with runnable(backend) as name:
        loss = ef.ecloss(leaf, tau=TAU, estimator=estimator, reduction="none",
                         backend=name, precision="ieee")
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    want, _ = loss_and_grad(x.double().numpy(), TAU, estimator)
    loss = loss.detach().double()

    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(grad).all()
    rounding = rounding_allowance(dtype, num_templates)
    lowest = -math.log(num_templates if estimator == "uniform" else min(num_templates, batch))
    assert loss.max().item() <= rounding, (loss, rounding)
    assert loss.min().item() >= lowest - rounding, (loss, lowest, rounding)
    # A score error e moves the loss by at most 2 e (log N + 1) (the weights of dloss/ds
    # are p times log-ratios bounded by log N or log B + 1).
    allowed = rounding + 4 * (math.log(num_templates) + 1) * score_error(x)
    error = (loss - torch.from_numpy(want)).abs().max().item()
    assert error <= allowed, (error, allowed)


@pytest.mark.parametrize("backend", CPU_BACKENDS + OTHER_CPU_PATHS)
def test_issue_examples_huge_scores_give_zero_information(backend):
    """Maps that carry no information about the batch: the marginal loss is exactly 0."""
    templates = ef.make_templates(7)
    cases = [torch.full((4, 1, 7, 7), 2e9),                       # scores near 1e8
             templates[1000].clamp_min(0)[None, None] * 1e9,      # B = 1
             peaked_maps(1, 1, 7, 7, seed=3).expand(8, 3, -1, -1) * 1e5]
    rounding = rounding_allowance(torch.float32, templates.shape[0])
    with runnable(backend) as name:
        for x in cases:
            loss = ef.ecloss(x, estimator="marginal", backend=name, reduction="none")
            assert loss.abs().max().item() <= rounding, (x.shape, loss)


@pytest.mark.parametrize("backend", CPU_BACKENDS + OTHER_CPU_PATHS)
@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
@pytest.mark.parametrize("tau", [1e-3, 4.0])
@pytest.mark.parametrize("kind", ["random", "template"])
def test_finite_up_to_the_overflow_bound_and_not_finite_beyond(backend, estimator, tau, kind):
    """docs/design.md section 4.1: finite loss and gradient while ``max(1, 2 tau) sum_k |x|``
    fits float32, in range to rounding; past the bound a non-finite loss, never a finite one."""
    largest = torch.finfo(torch.float32).max
    x = make_maps(kind, 4, 3, 5, 5, 1.0, seed=5)
    sums = x.abs().flatten(2).sum(-1)  # (B, C)
    bound = largest / (max(1.0, 2 * tau) * sums.max().item())
    num_templates = ef.num_templates(5)
    lowest = -math.log(num_templates if estimator == "uniform" else min(num_templates, 4))
    rounding = rounding_allowance(torch.float32, num_templates)
    with runnable(backend) as name:
        for fraction in (0.9, 1e-3):
            leaf = (x * (fraction * bound)).float().requires_grad_()
            loss = ef.ecloss(leaf, tau=tau, estimator=estimator, reduction="none",
                             backend=name, precision="ieee")
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (fraction, loss)
            assert lowest - rounding <= loss.min().item() <= loss.max().item() <= rounding
        # Past the bound for the largest map (only): its channel's loss is not finite.
        beyond = (x * (4 * bound)).float()
        assert torch.isfinite(beyond).all()
        loss = ef.ecloss(beyond, tau=tau, estimator=estimator, reduction="none", backend=name,
                         precision="ieee")
        channel = sums.max(0).values.argmax()
        assert not torch.isfinite(loss[channel]), loss


@pytest.mark.parametrize("backend", CPU_BACKENDS + OTHER_CPU_PATHS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(MAP_KINDS), exponent=st.floats(-6.0, 8.0),
       batch=st.integers(1, 6), channels=st.integers(1, 4), height=st.integers(1, 4),
       width=st.integers(2, 4), estimator=st.sampled_from(["uniform", "marginal"]),
       diversity=st.floats(0.1, 4.0), seed=st.integers(0, 2**16))
@example(kind="constant", exponent=8.0, batch=1, channels=3, height=3, width=3,
         estimator="uniform", diversity=2.0, seed=0)
@example(kind="template", exponent=8.0, batch=6, channels=4, height=3, width=3,
         estimator="marginal", diversity=1.0, seed=1)
def test_diversity_in_range_finite_and_exact_at_every_magnitude(backend, kind, exponent, batch,
                                                                channels, height, width,
                                                                estimator, diversity, seed):
    """``-lambda Div[c]`` lies in ``[-lambda log C, 0]`` (``pbb >= pbar[c] / C``), on top of
    the estimator's range; float32 against the float64 reference, whose diversity term
    tests/test_extensions.py checks against its definition."""
    x = make_maps(kind, batch, channels, height, width, 10.0 ** exponent, seed).float()
    num_templates = ef.num_templates(height, width)
    leaf = x.clone().requires_grad_()
    with runnable(backend) as name:
        loss = ef.ecloss(leaf, tau=TAU, estimator=estimator, reduction="none",
                         backend=name, precision="ieee", diversity=diversity)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    want = ef.ecloss(x.double(), tau=TAU, estimator=estimator, reduction="none",
                     backend="reference", diversity=diversity)
    loss = loss.detach().double()
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(grad).all()
    rounding = (1 + diversity) * rounding_allowance(torch.float32, num_templates * channels)
    information = math.log(num_templates if estimator == "uniform" else min(num_templates, batch))
    lowest = -information - diversity * math.log(channels)
    assert loss.max().item() <= rounding, (loss, rounding)
    assert loss.min().item() >= lowest - rounding, (loss, lowest, rounding)
    allowed = rounding + 4 * (1 + diversity) * (math.log(num_templates) + 1) * score_error(x)
    error = (loss - want).abs().max().item()
    assert error <= allowed, (error, allowed)


DX_SHAPES = [(4, 3, 7, 7), (3, 2, 5, 5), (6, 2, 4, 6), (2, 2, 14, 14)]


@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS + OTHER_CPU_PATHS)
def test_dx_of_peaked_maps_within_1e5_of_float64(backend, estimator):
    """docs/design.md section 4's bound, float32 ``ieee``, on maps built from templates."""
    worst = 0.0
    for shape in DX_SHAPES:
        if backend == "triton" and shape[2] == 14:
            shape = (2, 1, 14, 14)  # 19,307 templates: the interpreter runs in Python
        for seed in range(2):
            x = peaked_maps(*shape, seed=seed)
            upstream = torch.linspace(0.5, 2.0, shape[1], dtype=torch.float64)
            truth64 = x.double().requires_grad_()
            want = ef.ecloss(truth64, tau=TAU, estimator=estimator, reduction="none",
                             backend="reference")
            (want_grad,) = torch.autograd.grad(want, truth64, upstream)
            leaf = x.clone().requires_grad_()
            with runnable(backend) as name:
                loss = ef.ecloss(leaf, tau=TAU, estimator=estimator, reduction="none",
                                 backend=name, precision="ieee")
                (grad,) = torch.autograd.grad(loss, leaf, upstream.float())
            error = ((grad.double() - want_grad).norm() / want_grad.norm()).item()
            worst = max(worst, error)
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("backend", [
    # The reference builds its templates inside the graph: about 45 s of compilation.
    pytest.param(name, marks=pytest.mark.slow) if name == "reference" else name
    for name in CPU_BACKENDS])
def test_compile_dynamic_fullgraph_equals_eager(backend):
    """Both estimators, through the Module (its float attributes) and the function (a float
    argument): under ``dynamic=True`` both reach ``ecloss`` as SymFloats."""
    uniform = ef.ECLoss(backend=backend, precision="ieee")

    def losses(maps, tau):
        marginal = ef.ecloss(maps, tau=tau, estimator="marginal", backend=backend,
                             precision="ieee", reduction="none")
        return uniform(maps), marginal

    torch._dynamo.reset()
    compiled = torch.compile(losses, fullgraph=True, dynamic=True)
    upstream = torch.tensor([0.5, 1.0, 2.0])
    with runnable(backend):
        for batch in (2, 3):
            x = peaked_maps(batch, 3, 4, 5, seed=batch)
            results = []
            for fn in (losses, compiled):
                leaf = x.clone().requires_grad_()
                first, second = fn(leaf, 2e-3)
                (grad,) = torch.autograd.grad(first + (second * upstream).sum(), leaf)
                results.append((first, second, grad))
            for eager, compiled_result in zip(*results):
                torch.testing.assert_close(compiled_result, eager)
    torch._dynamo.reset()
