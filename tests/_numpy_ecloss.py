"""docs/design.md sections 2 and 3 written directly in float64 NumPy, independent of the package."""
import numpy as np


def _templates(h, w, radius=4.0):
    """docs/design.md section 1 by loops, independent of ecloss_fast.make_templates."""
    u, v = np.divmod(np.arange(h * w), w)
    one = np.maximum(1 - np.hypot(u[:, None] - u[None, :], v[:, None] - v[None, :]) / radius, -1)
    rows = list(one)
    for a in range(h * w):
        for b in range(a + 1, h * w):
            rows.append(np.maximum(one[a], one[b]))
    rows.append(-np.ones(h * w))
    return np.stack(rows)


def loss_and_grad(x, tau=1e-3, estimator="uniform", templates=None, upstream=None):
    """Per-channel loss ``(C,)`` and ``d(sum_c upstream[c] loss[c]) / dx`` by the formulas of docs/design.md."""
    x = np.asarray(x, dtype=np.float64)
    b, c, h, w = x.shape
    t = _templates(h, w) if templates is None else np.asarray(templates, np.float64).reshape(-1, h * w)
    n = t.shape[0]
    s = tau * np.einsum("bck,nk->bcn", x.reshape(b, c, -1), t)
    m = s.max(-1, keepdims=True)
    lse = m + np.log(np.exp(s - m).sum(-1, keepdims=True))
    p = np.exp(s - lse)
    if estimator == "uniform":
        log_q = np.full((1, c, n), -np.log(n))
    else:
        log_q = np.log(np.maximum(p.mean(0, keepdims=True), np.finfo(np.float64).tiny))
    kl = np.where(p > 0, p * (s - lse - log_q), 0.0).sum(-1)          # D[b, c]
    loss = -kl.mean(0)
    g = np.ones(c) if upstream is None else np.asarray(upstream, np.float64)
    ds = -(g[None, :, None] / b) * p * (s - lse - log_q - kl[..., None])
    dx = tau * np.einsum("bcn,nk->bck", ds, t).reshape(x.shape)
    return loss, dx
