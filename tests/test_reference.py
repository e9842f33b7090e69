"""The reference backend against an independent float64 NumPy evaluation of docs/design.md
sections 2 (The loss) and 3 (The gradient)."""
import numpy as np
import pytest
import torch

import ecloss_fast as ef
from ecloss_fast.testing import peaked_maps, random_maps
from _numpy_ecloss import loss_and_grad


@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
@pytest.mark.parametrize("make, shape, tau", [
    (random_maps, (3, 2, 2, 3), 0.3), (peaked_maps, (4, 3, 3, 3), 1e-3), (random_maps, (1, 2, 3, 2), 2.0),
])
def test_reference_matches_numpy(estimator, make, shape, tau):
    x = make(*shape, dtype=torch.float64, seed=sum(shape)).requires_grad_()
    upstream = torch.randn(shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss = ef.ecloss(x, tau=tau, estimator=estimator, reduction="none", backend="reference")
    (grad,) = torch.autograd.grad(loss, x, upstream)
    want_loss, want_grad = loss_and_grad(x.detach().numpy(), tau, estimator, upstream=upstream.numpy())
    np.testing.assert_allclose(loss.detach().numpy(), want_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-14 * np.abs(want_grad).max())


def test_loss_bounds_and_known_values():
    # A constant-score row has p uniform: MI = 0 under the uniform prior.
    x = torch.zeros(2, 3, 3, 3, dtype=torch.float64)
    assert ef.ecloss(x, backend="reference").item() == 0.0
    # One-hot templates and a huge one-hot map put all mass on one template: loss = -log N.
    eye = torch.eye(4, dtype=torch.float64).view(4, 2, 2)
    x = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    x[:, :, 1, 0] = 1e6
    loss = ef.ecloss(x, templates=eye, backend="reference", reduction="none")
    np.testing.assert_allclose(loss.numpy(), -np.log(4), rtol=1e-12)
    x = peaked_maps(2, 2, 3, 3, dtype=torch.float64, scale=1e6, noise=0.0)
    loss = ef.ecloss(x, backend="reference", reduction="none")
    assert torch.all(loss >= -np.log(ef.num_templates(3)) - 1e-12) and torch.all(loss <= 0)
    # Marginal: identical maps over the batch carry no information about the batch: MI = 0.
    same = x[:1].expand(4, -1, -1, -1)
    assert ef.ecloss(same, backend="reference", estimator="marginal").abs().item() < 1e-12
