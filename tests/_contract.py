"""The backend contract (docs/design.md section 9) by einsum, for testing each backend's pieces."""
import math
from typing import NamedTuple, Optional

import torch

from ecloss_fast._templates import template_matrix


class Contract(NamedTuple):
    """What the contract functions return, evaluated directly (``log_q`` is ``None`` if uniform)."""
    row_max: torch.Tensor
    log_sum: torch.Tensor
    neg_entropy: torch.Tensor
    column_sums: torch.Tensor
    log_q: Optional[torch.Tensor]
    dx: torch.Tensor
    neg_entropy_grad: torch.Tensor


def contract_templates(h, w, dtype=torch.float32, device="cpu"):
    return template_matrix(h, w, 4.0, None, torch.device(device), dtype)


def evaluate_contract(x, templates, row_weight, marginal, tau=1e-3, prior=None) -> Contract:
    """docs/design.md sections 2-3 and 9 at the arguments' dtype (materialises B x C x N).

    ``dx`` is ``input_grad``'s: with a ``(C, N)`` ``prior``,
    ``ds = p (w log p - prior - D)``, ``D = sum_t p (w log p - prior) / sum_t p``; without
    one, ``ds = w p (log r - sum_t p log r)`` with ``log r = log p - log_q`` for
    ``marginal`` (the prior ``w log_q``, row by row) and ``log p`` otherwise.
    """
    scores = tau * torch.einsum("bck,nk->bcn", x, templates)
    row_max = scores.amax(-1)
    shifted = scores - row_max[..., None]
    log_sum = torch.logsumexp(shifted, dim=-1)
    log_p = shifted - log_sum[..., None]
    p = log_p.exp()
    neg_entropy = (p * log_p).sum(-1)
    sums = p.sum(0)
    log_q = None
    if marginal:
        log_q = torch.log((sums / x.shape[0]).clamp_min(torch.finfo(x.dtype).tiny))
    if prior is not None:
        terms = row_weight[..., None] * log_p - prior
        offset = (p * terms).sum(-1, keepdim=True) / p.sum(-1, keepdim=True)
        grad_scores = p * (terms - offset)
    else:
        log_ratio = log_p - log_q if marginal else log_p
        coefficient = log_ratio - (p * log_ratio).sum(-1, keepdim=True)
        grad_scores = row_weight[..., None] * p * coefficient
    dx = tau * torch.einsum("bcn,nk->bck", grad_scores, templates)
    neg_entropy_grad = tau * torch.einsum("bcn,nk->bck", p * (log_p - neg_entropy[..., None]),
                                          templates)
    return Contract(row_max, log_sum, neg_entropy, sums, log_q, dx, neg_entropy_grad)


def dx_scale(row_weight, num_templates, numel, tau=1e-3):
    """Size of the terms whose difference dx is, in norm: tau * row_weight * log N per entry."""
    return tau * row_weight * math.log(num_templates) * math.sqrt(numel)


def marginal_prior(column_sums, channel_weight):
    """The prior of the marginal estimator's ``input_grad``, ``w_c log max(pbar, tiny)``, with
    ``pbar`` the column sums over their own mass, as ``ecloss_fast._ops`` forms it."""
    pbar = column_sums / column_sums.sum(-1, keepdim=True)
    return channel_weight[:, None] * pbar.clamp_min(torch.finfo(pbar.dtype).tiny).log()


def prior_dx(x, templates, row_weight, prior, tau=1e-3):
    """``dx`` of the backend contract for a general ``prior (C, N)``, at the arguments' dtype:
    ``tau sum_k p_k (w log p_k - prior_k - D) T_k``, ``D = sum_t p_t (w log p_t - prior_t)``."""
    log_p = torch.log_softmax(tau * torch.einsum("bck,nk->bcn", x, templates), dim=-1)
    z = row_weight[..., None] * log_p - prior
    p = log_p.exp()
    grad = p * (z - (p * z).sum(-1, keepdim=True))
    return tau * torch.einsum("bcn,nk->bck", grad, templates)
