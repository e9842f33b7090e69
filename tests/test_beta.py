"""``ef.GradientRatioBeta`` (the automatic ECLoss weight) and ``ef.flush_subnormals``."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import ecloss_fast as ef

RATIO = 0.3


class _Toy(torch.nn.Module):
    """A conv whose post-ReLU 7x7 maps feed ECLoss, and a linear classifier on them."""

    def __init__(self, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1).double()
        self.head = torch.nn.Linear(6 * 7 * 7, 4).double()
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator,
                                            dtype=torch.float64) * 0.3)

    def forward(self, images):
        maps = F.relu(self.conv(images))
        return maps, self.head(maps.flatten(1))


def _batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(5, 3, 7, 7, generator=generator, dtype=torch.float64)
    return images, torch.randint(0, 4, (5,), generator=generator)


def _losses(model, seed: int):
    maps, logits = model(_batch(seed)[0])
    ce = F.cross_entropy(logits, _batch(seed)[1])
    return ce, ef.ecloss(maps, tau=0.05, templates=60, backend="reference"), maps


def _ratio_by_backward(model, seed: int, beta: float, parameter) -> float:
    """``|beta * dECL/dz| / |dCE/dz|`` from two ``.backward()`` passes of the total loss:
    ``grad(ce + beta * ecl) - grad(ce) = beta * grad(ecl)``."""
    grads = []
    for weight in (0.0, beta):
        model.zero_grad()
        ce, ecl, _ = _losses(model, seed)
        (ce + weight * ecl).backward()
        grads.append(parameter.grad.clone())
    return ((grads[1] - grads[0]).norm() / grads[0].norm()).item()


def _exact():
    """No smoothing, growth limit or cap: one measurement lands on the target."""
    return ef.GradientRatioBeta(RATIO, every=1, ema=0.0, max_growth=math.inf,
                                max_value=math.inf)


def test_one_unsmoothed_measurement_meets_the_ratio_at_a_parameter():
    model = _Toy(seed=0)
    auto = _exact()
    ce, ecl, _ = _losses(model, seed=1)
    beta = auto.step(ce, ecl, at=model.conv.weight)
    assert beta != 1e-5 and auto.measurements == 1 and auto.steps == 1
    assert _ratio_by_backward(model, 1, beta, model.conv.weight) == pytest.approx(RATIO, rel=1e-9)
    # The ratio the previous beta (the paper's 1e-5) achieved, measured independently.
    assert auto.measured_ratio == pytest.approx(
        _ratio_by_backward(model, 1, 1e-5, model.conv.weight), rel=1e-9)


def test_norms_at_a_tensor_and_over_several_parameters():
    model = _Toy(seed=2)
    ce, ecl, maps = _losses(model, seed=3)
    ce_maps, ecl_maps = ef.GradientRatioBeta.gradient_norms(ce, ecl, at=maps)
    (g_ce,) = torch.autograd.grad(ce, maps, retain_graph=True)
    (g_ecl,) = torch.autograd.grad(ecl, maps, retain_graph=True)
    assert (ce_maps, ecl_maps) == pytest.approx((g_ce.norm().item(), g_ecl.norm().item()),
                                                rel=1e-12)
    # ECLoss does not reach the classifier's weights: only the conv's count for it.
    parameters = [model.conv.weight, model.conv.bias, model.head.weight]
    ce_all, ecl_all = ef.GradientRatioBeta.gradient_norms(ce, ecl, at=parameters)
    expected_ce = torch.cat([g.flatten() for g in torch.autograd.grad(ce, parameters,
                                                                      retain_graph=True)])
    expected_ecl = torch.cat([g.flatten() for g in torch.autograd.grad(
        ecl, parameters[:2], retain_graph=True)])
    assert ce_all == pytest.approx(expected_ce.norm().item(), rel=1e-12)
    assert ecl_all == pytest.approx(expected_ecl.norm().item(), rel=1e-12)


def test_default_rule_converges_to_the_ratio():
    """Growth-limited and smoothed, repeated measurements at one point reach the target."""
    model = _Toy(seed=4)
    auto = ef.GradientRatioBeta(RATIO, every=1, max_value=math.inf)
    for _ in range(400):
        ce, ecl, _ = _losses(model, seed=5)
        beta = auto.step(ce, ecl, at=model.conv.weight)
    assert _ratio_by_backward(model, 5, beta, model.conv.weight) == pytest.approx(RATIO, rel=1e-9)


def test_measures_every_few_steps():
    model = _Toy(seed=6)
    auto = ef.GradientRatioBeta(RATIO, every=3)
    values = []
    for step in range(7):
        ce, ecl, _ = _losses(model, seed=step)
        values.append(auto.step(ce, ecl, at=model.conv.weight))
    assert auto.steps == 7 and auto.measurements == 3  # steps 0, 3 and 6
    changed = [i for i in range(7) if values[i] != (values[i - 1] if i else 1e-5)]
    assert changed == [0, 3, 6]


def _train(auto, model, optimizer, steps):
    betas = []
    for _ in range(steps):
        step = auto.steps
        ce, ecl, _ = _losses(model, seed=100 + step)
        beta = auto.step(ce, ecl, at=model.conv.weight)
        optimizer.zero_grad()
        (ce + beta * ecl).backward()
        optimizer.step()
        betas.append(beta)
    return betas


def _fresh():
    model = _Toy(seed=7)
    return (ef.GradientRatioBeta(RATIO, every=3, max_growth=8.0, max_value=1e3), model,
            torch.optim.SGD(model.parameters(), lr=0.05))


def test_state_dict_round_trip_resumes_identically():
    straight = _fresh()
    expected = _train(*straight, steps=14)

    first = _fresh()
    betas = _train(*first, steps=8)  # stops between two measurements (8 % 3 != 0)
    buffer = io.BytesIO()
    torch.save({"beta": first[0].state_dict(), "model": first[1].state_dict(),
                "optimizer": first[2].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _fresh()
    resumed[0].load_state_dict(saved["beta"])
    resumed[1].load_state_dict(saved["model"])
    resumed[2].load_state_dict(saved["optimizer"])
    betas += _train(*resumed, steps=6)

    assert betas == expected  # bitwise
    assert resumed[0].state_dict() == straight[0].state_dict()
    for a, b in zip(resumed[1].parameters(), straight[1].parameters()):
        assert torch.equal(a, b)


def test_growth_limit_smoothing_fast_decrease_and_cap():
    auto = ef.GradientRatioBeta(0.5, initial=1e-5, ema=0.75, max_growth=4.0, max_value=1e5)
    # Target 0.5 * 8 / 1e-3 = 4000, far above: beta grows by max_growth only.
    assert auto.observe(8.0, 1e-3)
    assert auto.value == pytest.approx(4e-5, rel=1e-12)
    assert auto.measured_ratio == pytest.approx(1e-5 * 1e-3 / 8.0, rel=1e-12)
    # Close below the target 0.5 * 8 / 5e-4 = 8000: a geometric moving average.
    auto.log_beta = math.log(6000.0)
    auto.observe(8.0, 5e-4)
    assert auto.value == pytest.approx(6000 ** 0.75 * 8000 ** 0.25, rel=1e-12)
    # Target 0.5 * 8 / 0.1 = 40, below half of beta: taken at once.
    auto.observe(8.0, 0.1)
    assert auto.value == pytest.approx(40.0, rel=1e-12)
    # Target 0.5 * 8 / 1e-9 = 4e9: growth 4x per measurement, then the cap.
    values = []
    for _ in range(10):
        auto.observe(8.0, 1e-9)
        values.append(auto.value)
    assert values[:5] == pytest.approx([160.0, 640.0, 2560.0, 10240.0, 40960.0], rel=1e-12)
    assert values[5:] == pytest.approx([1e5] * 5, rel=1e-12)
    assert auto.measurements == 13


@pytest.mark.parametrize("norms", [(0.0, 1.0), (1.0, 0.0), (math.nan, 1.0), (1.0, math.inf)])
def test_unusable_measurements_change_nothing(norms):
    auto = ef.GradientRatioBeta(0.5)
    auto.observe(8.0, 1e-3)
    before = auto.state_dict()
    assert not auto.observe(*norms)
    assert auto.state_dict() == before


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(ratio=0.0), ValueError, "ratio"),
    (dict(ratio=-1.0), ValueError, "ratio"),
    (dict(ratio=math.nan), ValueError, "ratio"),
    (dict(ratio=math.inf), ValueError, "ratio"),
    (dict(ratio="0.25"), TypeError, "ratio"),
    (dict(every=0), ValueError, "every"),
    (dict(every=2.0), TypeError, "every"),
    (dict(every=True), TypeError, "every"),
    (dict(initial=0.0), ValueError, "initial"),
    (dict(ema=1.0), ValueError, "ema"),
    (dict(ema=-0.1), ValueError, "ema"),
    (dict(ema=None), TypeError, "ema"),
    (dict(max_growth=1.0), ValueError, "max_growth"),
    (dict(max_value=0.0), ValueError, "max_value"),
    (dict(initial=10.0, max_value=1.0), ValueError, "initial"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ef.GradientRatioBeta(**kwargs)


def test_bad_step_arguments_and_state():
    model = _Toy(seed=8)
    auto = ef.GradientRatioBeta()
    ce, ecl, maps = _losses(model, seed=9)
    with pytest.raises(TypeError, match="at must be"):
        auto.step(ce, ecl, at="conv.weight")
    with pytest.raises(TypeError, match="at must be"):
        auto.step(ce, ecl, at=[])
    with pytest.raises(ValueError, match="ecloss must be a scalar"):
        auto.step(ce, ef.ecloss(maps, templates=60, reduction="none"), at=maps)
    with pytest.raises(TypeError, match="classification_loss must be a scalar"):
        auto.step(1.0, ecl, at=maps)
    with pytest.raises(ValueError, match="classification_loss does not require grad"):
        auto.step(ce.detach(), ecl, at=maps)
    with pytest.raises(ValueError, match="ecloss does not depend on at"):
        auto.step(ce, ecl, at=model.head.weight)
    assert auto.steps == 0 and auto.measurements == 0  # a failed step counts nothing
    with pytest.raises(ValueError, match="missing steps"):
        auto.load_state_dict({"log_beta": 0.0, "measured_ratio": 1.0, "measurements": 1})


def _kept_fraction(values: torch.Tensor) -> float:
    """The fraction of subnormal ``values`` that survive a multiplication by one, run by
    PyTorch's intra-op threads (an element-wise op over millions of elements is split)."""
    return (values * 1.0 != 0).double().mean().item()


def test_flush_subnormals_reaches_every_intra_op_thread():
    torch.set_num_threads(2)  # the isolation fixture restores the count
    subnormals = torch.full((1 << 22,), 1e-39)
    assert _kept_fraction(subnormals) == 1.0
    with ef.flush_subnormals() as supported:
        if not supported:
            pytest.skip("this CPU cannot flush subnormals (torch.set_flush_denormal)")
        assert _kept_fraction(subnormals) == 0.0
        with ef.flush_subnormals(False):
            assert _kept_fraction(subnormals) == 1.0
        assert _kept_fraction(subnormals) == 0.0  # the inner block restored the outer one
    assert _kept_fraction(subnormals) == 1.0
    with pytest.raises(TypeError, match="enabled"):
        with ef.flush_subnormals("yes"):
            pass
