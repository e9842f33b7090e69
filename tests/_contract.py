"""The backend contract (ecloss_fast.backends) by einsum, for testing each backend's pieces."""
import torch

from ecloss_fast._templates import template_matrix


def contract_templates(h, w, dtype=torch.float32, device="cpu"):
    return template_matrix(h, w, 4.0, None, torch.device(device), dtype)


def evaluate_contract(x, templates, row_weight, marginal, tau=1e-3):
    """SPEC sections 2-3 at the arguments' dtype (materialises B x C x N).

    Returns ``lse``, ``neg_entropy``, ``column_sums``, ``log_q`` (``None`` if uniform), ``dx``.
    """
    scores = tau * torch.einsum("bck,nk->bcn", x, templates)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None])
    neg_entropy = (p * (scores - lse[..., None])).sum(-1)
    sums = p.sum(0)
    coefficient = scores - lse[..., None] - neg_entropy[..., None]
    log_q = None
    if marginal:
        log_q = torch.log((sums / x.shape[0]).clamp_min(torch.finfo(x.dtype).tiny))
        coefficient = coefficient - log_q + (p * log_q).sum(-1, keepdim=True)
    dx = tau * row_weight[..., None] * torch.einsum("bcn,nk->bck", p * coefficient, templates)
    return lse, neg_entropy, sums, log_q, dx
