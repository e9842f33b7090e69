"""calibrate_tau against the scores themselves, materialised in float64 and their std taken."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ecloss_fast as ef
from ecloss_fast.testing import peaked_maps, random_maps


def brute_force_tau(x, templates, spread=1.0, normalize=False):
    """``spread / mean_{b,c} std_t(<x[b,c], T[t]>)`` with every score in a float64 tensor."""
    rows = x.double().flatten(2)
    if normalize:
        norms = rows.norm(dim=-1, keepdim=True)
        rows = torch.where(norms > 0, rows / norms, 0.0)
    scores = torch.einsum("bck,nk->bcn", rows, templates.double().flatten(1))
    return spread / scores.std(dim=-1, unbiased=False).mean().item()


# float32 scores accumulate in float32 from float32 templates: a few ulps of the mean std.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-11}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make_maps", [random_maps, peaked_maps])
@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (2, 3, 5, 6), (1, 1, 1, 2)])
def test_full_set_matches_brute_force(dtype, make_maps, shape):
    x = make_maps(*shape, dtype=dtype, seed=3)
    expected = brute_force_tau(x, ef.make_templates(*shape[2:], dtype=torch.float64))
    assert ef.calibrate_tau(x) == pytest.approx(expected, rel=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subset_radius_and_spread(dtype):
    x = peaked_maps(4, 3, 6, 6, dtype=dtype, seed=5, radius=2.5)
    for k in (1226 // 3, 17, 2):
        templates = ef.make_templates(6, 6, radius=2.5, subset=k, dtype=torch.float64)
        expected = brute_force_tau(x, templates, spread=3.5)
        got = ef.calibrate_tau(x, radius=2.5, templates=k, spread=3.5)
        assert got == pytest.approx(expected, rel=TOLERANCE[dtype]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_templates(dtype):
    generator = torch.Generator().manual_seed(8)
    x = random_maps(3, 4, 5, 4, dtype=dtype, seed=9)
    templates = torch.randn(11, 5, 4, generator=generator, dtype=torch.float64).requires_grad_()
    expected = brute_force_tau(x, templates.detach())
    assert ef.calibrate_tau(x, templates=templates.to(dtype)) == pytest.approx(
        expected, rel=TOLERANCE[dtype])
    assert templates.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_divides_each_map_by_its_norm(dtype):
    x = random_maps(3, 4, 7, 7, dtype=dtype, seed=11, scale=50.0)
    x[0, 1] = 0  # a dead map: xh = 0, a std of 0 that still counts in the mean
    x[2, 3] *= 1e-6
    expected = brute_force_tau(x, ef.make_templates(7, dtype=torch.float64), normalize=True)
    got = ef.calibrate_tau(x, normalize=True)
    assert got == pytest.approx(expected, rel=TOLERANCE[dtype])
    # Without normalising, the map scaled by 1e-6 and the large scale change tau.
    assert ef.calibrate_tau(x) != pytest.approx(got, rel=0.5)


def test_large_mean_small_spread_keeps_its_digits():
    # Scores with a mean far above their spread over templates: x^T G x - (mu . x)^2
    # in float32 per map would cancel to rounding noise; the float64 reference does not.
    noise = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(1))
    templates = 100 + 1e-3 * noise
    x = random_maps(2, 3, 4, 4, seed=2)
    expected = brute_force_tau(x, templates)
    assert ef.calibrate_tau(x, templates=templates) == pytest.approx(expected, rel=1e-5)


def test_half_precision_and_autocast():
    x = peaked_maps(2, 3, 7, 7, seed=4)
    expected = brute_force_tau(x.bfloat16(), ef.make_templates(7, dtype=torch.float64))
    assert ef.calibrate_tau(x.bfloat16()) == pytest.approx(expected, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ef.calibrate_tau(x) == pytest.approx(ef.calibrate_tau(x), rel=0)
    assert ef.calibrate_tau(x) == pytest.approx(
        brute_force_tau(x, ef.make_templates(7, dtype=torch.float64)), rel=1e-5)


def test_dead_input_raises():
    with pytest.raises(ValueError, match="every map is dead"):
        ef.calibrate_tau(torch.zeros(2, 3, 7, 7))
    with pytest.raises(ValueError, match="every map is dead"):
        ef.calibrate_tau(torch.zeros(2, 3, 7, 7), normalize=True)
    # One template: every map's scores are constant over the set.
    with pytest.raises(ValueError, match="constant over the templates"):
        ef.calibrate_tau(random_maps(2, 3, 4, 4), templates=1)
    x = random_maps(2, 3, 4, 4)
    x[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        ef.calibrate_tau(x)


@pytest.mark.parametrize("make_input, kwargs, error, words", [
    (lambda: [[1.0]], {}, TypeError, "x must be a torch.Tensor"),
    (lambda: torch.rand(2, 3, 4), {}, ValueError, "(B, C, H, W)"),
    (lambda: torch.ones(2, 3, 4, 4, dtype=torch.int64), {}, TypeError, "torch.int64"),
    (lambda: torch.rand(0, 3, 4, 4), {}, ValueError, "must not be empty"),
    (lambda: torch.rand(2, 3, 4, 4), dict(radius=0.0), ValueError, "radius"),
    (lambda: torch.rand(2, 3, 4, 4), dict(spread=-1.0), ValueError, "spread"),
    (lambda: torch.rand(2, 3, 4, 4), dict(spread="wide"), TypeError, "spread"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates="most"), ValueError, "templates"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates=0), ValueError, "subset size k"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates=200), ValueError, "num_templates(4, 4) = 137"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates=True), TypeError, "templates"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates=torch.rand(5, 4, 5)), ValueError, "H x W"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates=torch.rand(5, 16)), ValueError, "(N, H, W)"),
    (lambda: torch.rand(2, 3, 4, 4), dict(normalize=1), TypeError, "normalize"),
    (lambda: torch.rand(2, 3, 4, 4), dict(process_group="WORLD"), TypeError, "process_group"),
])
def test_bad_arguments(make_input, kwargs, error, words):
    with pytest.raises(error) as info:
        ef.calibrate_tau(make_input(), **kwargs)
    assert words in str(info.value)


# ---------------------------------------------------------------- process groups


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, x, cuts, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local = x[cuts[rank]:cuts[rank + 1]]
        results[rank] = ef.calibrate_tau(local, templates=50, process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_two_processes_calibrate_on_the_global_batch():
    # Unequal local batches (1 and 4 images): the mean is over the 5 x 3 maps, not of the
    # two local means.
    x = peaked_maps(5, 3, 6, 5, seed=13, dtype=torch.float64)
    x[0] *= 7  # so that a mean of local means would differ from the global mean
    expected = brute_force_tau(x, ef.make_templates(6, 5, subset=50, dtype=torch.float64))
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), x, (0, 1, 5), results), nprocs=2, join=True)
    assert results[0] == results[1]
    assert results[0] == pytest.approx(expected, rel=1e-11)
    assert ef.calibrate_tau(x[:1], templates=50) != pytest.approx(expected, rel=1e-2)
