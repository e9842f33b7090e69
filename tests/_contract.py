"""The backend contract (ecloss_fast.backends) by einsum, for testing each backend's pieces."""
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


def contract_templates(h, w, dtype=torch.float32, device="cpu"):
    return template_matrix(h, w, 4.0, None, torch.device(device), dtype)


def evaluate_contract(x, templates, row_weight, marginal, tau=1e-3) -> Contract:
    """SPEC sections 2-3 at the arguments' dtype (materialises B x C x N)."""
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
        log_ratio = log_p - log_q
    else:
        log_ratio = log_p
    coefficient = log_ratio - (p * log_ratio).sum(-1, keepdim=True)
    dx = tau * row_weight[..., None] * torch.einsum("bcn,nk->bck", p * coefficient, templates)
    return Contract(row_max, log_sum, neg_entropy, sums, log_q, dx)
