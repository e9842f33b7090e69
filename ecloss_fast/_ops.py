"""The ``torch.library`` custom ops that every fused backend runs behind.

``ecloss_fast::channel_loss`` runs the forward sweeps of one backend and returns the
per-channel loss with the per-row statistics that its backward needs (and, when asked,
the diagnostics of docs/design.md section 8.4); ``ecloss_fast::input_grad`` is that
backward, and ``ecloss_fast::input_grad_from_scores`` the backward of the kept-scores route
(the forward's scores reused; section 9). They are opaque to ``torch.compile``, which keeps
them whole (no graph break, no retracing of kernels), and the templates are looked up
inside them so a compiled graph never rebuilds them.
"""
from __future__ import annotations

import inspect
import math
import typing
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from ecloss_fast._dispatch import (BackendUnavailableError, backend_module, choose_backend,
                                   resolve_backend)
from ecloss_fast._dtypes import accumulation_dtype
from ecloss_fast._math import covariance_factor
from ecloss_fast._precision import resolve_precision
from ecloss_fast._templates import count_for_pixels, template_matrix

__all__ = ["channel_loss", "input_grad", "register_process_group", "accumulation_dtype",
           "DIAGNOSTICS", "LossInputs", "LossOutputs", "channel_loss_outputs",
           "input_grad_from_scores"]

# The names of the diagnostics vector, in its order (docs/design.md section 8.4).
DIAGNOSTICS = ("mi_over_log_n", "max_p", "score_std")

_PROCESS_GROUPS: dict[str, object] = {}


def register_process_group(group) -> str:
    """A name under which the ops find ``group`` (custom ops take no ProcessGroup)."""
    name = group.group_name if group is not dist.group.WORLD else "WORLD"
    _PROCESS_GROUPS[name] = group
    return name


class LossInputs(NamedTuple):
    """The arguments of ``ecloss_fast::channel_loss``, in the order of its schema."""
    x: torch.Tensor
    templates: Optional[torch.Tensor]  # (N, H*W) in the accumulation dtype; None: built-in set
    radius: float
    subset: int  # k of the built-in set, 0 for all of it
    tau: float
    marginal: bool
    diversity: float
    diagnostics: bool
    precision: str  # "" is the API's precision=None, resolved inside the op
    backend: str
    group: str  # a name of register_process_group, "" for none
    with_grad: bool


class LossOutputs(NamedTuple):
    """What ``ecloss_fast::channel_loss`` returns, in its order (its docstring says what each is)."""
    loss: torch.Tensor  # (C,)
    row_max: torch.Tensor  # (B, C)
    log_sum: torch.Tensor  # (B, C)
    neg_entropy: torch.Tensor  # (B, C)
    pbar: torch.Tensor  # (C, N) or empty
    map_weight: torch.Tensor  # 0-d
    summary: torch.Tensor  # (len(DIAGNOSTICS),) or empty
    neg_entropy_grad: torch.Tensor  # (B, C, K) or empty
    scores: torch.Tensor  # (B, C, N) on the kept-scores route, else empty


def _schema(inputs: type, outputs: type) -> str:
    """The schema of an op taking the fields of the NamedTuple ``inputs`` and returning those
    of ``outputs`` (tensors), as ``torch.library.infer_schema`` reads it from a signature."""
    def prototype():
        pass

    prototype.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
         for name, annotation in typing.get_type_hints(inputs).items()],
        return_annotation=tuple[(torch.Tensor,) * len(outputs._fields)])
    return torch.library.infer_schema(prototype, mutates_args=())


def channel_loss_outputs(inputs: LossInputs) -> LossOutputs:
    """``ecloss_fast::channel_loss`` of ``inputs``, its outputs by name."""
    return LossOutputs(*torch.ops.ecloss_fast.channel_loss(*inputs))


def _templates_for(x, templates, radius, subset):
    if templates is not None:
        return templates
    height, width = x.shape[-2:]
    return template_matrix(height, width, radius, subset if subset > 0 else None,
                           x.device, accumulation_dtype(x.dtype))


def _num_templates(x, templates, subset):
    if templates is not None:
        return templates.shape[0]
    return subset if subset > 0 else count_for_pixels(x.shape[-2] * x.shape[-1])


@torch.library.custom_op("ecloss_fast::channel_loss", mutates_args=(),
                         schema=_schema(LossInputs, LossOutputs))
def channel_loss(*inputs) -> tuple[torch.Tensor, ...]:
    """``LossOutputs`` ``(loss[c], row_max[b,c], log_sum[b,c], neg_entropy[b,c], pbar[c,t],
    map_weight, summary, neg_entropy_grad[b,c,k])`` of the ``LossInputs`` ``inputs``.

    The loss of docs/design.md sections 2 and 8.1,
    ``loss[c] = -MI[c] - diversity * KL(pbar[c] || mean_c pbar[c])``, with the per-row
    statistics of the backend contract (docs/design.md section 9) that its backward needs. ``templates`` is
    ``(N, H*W)`` in the accumulation dtype, or ``None`` for the built-in set (``subset = 0``
    for all of it). ``pbar`` is the batch marginal (global under the process group named
    ``group``) when the marginal estimator or the diversity term needs it, else empty.
    ``map_weight`` (0-d) weights each feature map's term: ``1 / B``, or
    ``world_size / B_global`` under the process group, so that the mean of the processes'
    losses is the loss of the global batch for any split of it. ``summary`` is the vector
    of ``DIAGNOSTICS`` when ``diagnostics`` asks for it, else empty; its per-map means
    carry the same weights, so their mean over the processes is the global batch's.
    ``neg_entropy_grad`` is the backend's ``row_stats_with_grad`` output when ``with_grad``
    asks for it (the uniform estimator without diversity, ``x`` needing a gradient): the
    backward is then a scaling of it, with no sweep of its own. Else it is empty.
    ``scores`` are the ``(B, C, N)`` scores on the kept-scores route (``_keeps_scores``;
    docs/design.md section 9), which the backward reuses, else empty.
    Everything stays a tensor: no host synchronisation.
    """
    inputs = LossInputs(*inputs)
    with torch.autocast(inputs.x.device.type, enabled=False):  # accumulation dtype, not autocast's
        return tuple(_channel_loss(inputs))


def _global_batch(local_sums, batch, group, like):
    """Batch size and column sums over the group (one all-reduce), and the map weight."""
    count = torch.full((1,), float(batch), dtype=like.dtype, device=like.device)
    if not group:
        return local_sums, count[0], count[0].reciprocal()
    process_group = _PROCESS_GROUPS[group]
    packed = count if local_sums is None else torch.cat([local_sums.flatten(), count])
    dist.all_reduce(packed, group=process_group)
    totals = None if local_sums is None else packed[:-1].view_as(local_sums)
    return totals, packed[-1], dist.get_world_size(process_group) / packed[-1]


def _cpu_kernels(tensor):
    """The ``cpu`` backend's module where ``tensor`` is on the CPU and the extension is
    built, else ``None``: its ``log_floored`` and ``weighted_log_sums`` take the marginal's
    logarithms in one pass each (C=64, N=19,307, 2 threads, AMD EPYC Zen 4: 0.19 and 0.46 ms
    where torch's clamp, log and vecdot took 0.74 and 0.92; a marginal step ~2 ms faster,
    bench/NOTES.md "The marginal's logarithms")."""
    if tensor.device.type != "cpu" or tensor.dtype not in (torch.float32, torch.float64):
        return None
    try:
        module = backend_module("cpu")
    except BackendUnavailableError:
        return None
    return module if module.availability() is None else None


def _log_floored(probabilities, scale=None):
    """``scale[c] log max(q, tiny)`` (``scale=None``: the log), finite, so that a term with
    ``q = 0`` contributes 0 (section 4). One new tensor (the log taken in place): a
    ``(C, N)`` copy fewer at the peak."""
    if (kernels := _cpu_kernels(probabilities)) is not None:
        return kernels.log_floored(probabilities.contiguous(), scale)
    log = probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log_()
    return log if scale is None else log.mul_(scale[:, None])


# Columns per block of _sum_log_floored: about 1 MiB of float32 per block.
_COLUMN_BLOCK_ELEMENTS = 1 << 18


def _sum_log_floored(weights, probabilities):
    """``sum_t weights[c,t] log max(q[c,t], tiny)`` per row ``c``, a block of columns at a
    time, so that the ``(C, N)`` log-probabilities never exist whole beside the column sums
    and ``pbar``: the marginal forward's peak holds two ``(C, N)`` tensors, not three. On
    the CPU, one pass of ``weighted_log_sums`` (no block of logarithms at all)."""
    if (kernels := _cpu_kernels(probabilities)) is not None:
        return kernels.weighted_log_sums(weights.contiguous(), probabilities.contiguous())
    width = max(1, _COLUMN_BLOCK_ELEMENTS // max(1, probabilities.shape[0]))
    total = weights.new_zeros(weights.shape[:-1])
    for start in range(0, probabilities.shape[-1], width):
        block = slice(start, start + width)
        total += torch.linalg.vecdot(weights[:, block], _log_floored(probabilities[:, block]))
    return total


def _log_ratio_to_mean(pbar):
    """``L[c,t] = log max(pbar, tiny) - log max(pbb, tiny)``, ``pbb = mean_c pbar``; and ``pbb``.

    Taken as the log of the ratio: near a uniform softmax ``L`` is of size 1e-3 while the two
    logarithms are of size ``log N``, whose float32 difference would be 20 times less exact.
    The floored ratio is finite: ``pbb`` is at most 1 and ``pbar`` at most ``C pbb``.
    """
    tiny = torch.finfo(pbar.dtype).tiny
    mean = pbar.mean(0).clamp_min(tiny)
    return (pbar.clamp_min(tiny) / mean).log(), mean


def _channel_diversity(pbar):
    """``Div[c] = KL(pbar[c] || pbb) = sum_t pbar[c,t] L[c,t]`` (docs/design.md section 8.1)."""
    return torch.linalg.vecdot(pbar, _log_ratio_to_mean(pbar)[0])


def _diversity_prior(pbar, upstream):
    """``F[c,t] = g[c] L[c,t] - v[t] / C``, ``v[t] = sum_c g[c] pbar[c,t] / pbb[t]``, up to a
    constant over ``t``.

    The gradient of ``-sum_c g[c] Div[c]`` by the scores is ``-(1/B) p (F - E_p F)`` per map,
    so a constant added to ``F`` changes nothing. With ``e = (pbar - pbb) / pbb``, which sums
    to 0 over ``c``, ``v[t] / C = mean(g) + sum_c (g[c] - mean(g)) e[c,t] / C`` exactly: the
    constant ``mean(g)`` is dropped, and what is left is formed from ``e`` (of size 1e-3
    near a uniform softmax, where ``g L`` is too) instead of ratios near 1 whose sum over
    ``C`` channels would cancel to it. (A column with ``pbb < tiny`` has ``p = 0`` in every
    map, so the constant it leaves does not matter.)
    """
    log_ratio, mean = _log_ratio_to_mean(pbar)
    excess = (pbar - mean) / mean
    spread = torch.linalg.vecdot((upstream - upstream.mean())[:, None], excess, dim=0)  # (N,)
    return upstream[:, None] * log_ratio - spread / pbar.shape[0]


def _diagnostics(inputs, rows, information, log_sum, map_weight):
    """``DIAGNOSTICS`` as one vector: the mean MI over ``log N``, the mean largest ``p`` (it is
    ``exp(-log_sum)``: the row statistics hold it) and the mean std of the scores over the
    templates through their covariance factor (one ``K x K`` product of the rows)."""
    x, templates, subset = inputs.x, inputs.templates, inputs.subset
    height, width = x.shape[-2:]
    factor = covariance_factor(templates, height, width, inputs.radius, subset or None,
                               x.device, log_sum.dtype)
    std = torch.linalg.vector_norm(rows.to(log_sum.dtype) @ factor.T, dim=-1)  # (B, C)
    per_map = torch.stack([torch.exp(-log_sum), inputs.tau * std]).sum(1).mean(-1) * map_weight
    num_templates = _num_templates(x, templates, subset)
    return torch.cat([(information.mean() / math.log(num_templates))[None], per_map])


def _keeps_scores(module, batch: int, channels: int, pixels: int) -> bool:
    """The kept-scores route (docs/design.md section 9): the backend provides
    ``row_stats_with_scores`` and ``input_grad_from_scores``, and there are no more rows than
    pixels, so the ``(B, C, N)`` scores are no larger than the templates."""
    return hasattr(module, "input_grad_from_scores") and batch * channels <= pixels


def _column_sums_of_scores(scores, row_max, log_sum):
    """The contract's ``column_sums`` from kept scores: ``sum_b p[b,c,t]`` in batch order."""
    return (scores - row_max[..., None]).sub_(log_sum[..., None]).exp_().sum(0)


def _channel_loss(inputs: LossInputs) -> LossOutputs:
    x, tau, diversity = inputs.x, inputs.tau, inputs.diversity
    precision = resolve_precision(inputs.precision, x.dtype)
    templates = _templates_for(x, inputs.templates, inputs.radius, inputs.subset)
    batch, channels = x.shape[:2]
    rows = x.reshape(batch, channels, -1).contiguous()
    needs_marginal = inputs.marginal or diversity > 0
    # The backward resolves the same route to the same backend (choose_backend keeps its
    # verdicts): the statistics saved here assume this backend's scores.
    module = backend_module(choose_backend(inputs.backend, rows, templates, tau, precision,
                                           needs_marginal))
    kept_scores = rows.new_empty(0, dtype=templates.dtype)
    neg_entropy_grad = rows.new_empty(0, dtype=templates.dtype)
    if _keeps_scores(module, batch, channels, rows.shape[-1]):
        row_max, log_sum, neg_entropy, kept_scores = module.row_stats_with_scores(
            rows, templates, tau, precision)
    elif inputs.with_grad and not needs_marginal:
        row_max, log_sum, neg_entropy, neg_entropy_grad = module.row_stats_with_grad(
            rows, templates, tau, precision)
    else:
        row_max, log_sum, neg_entropy = module.row_stats(rows, templates, tau, precision)
    local_sums = None
    if needs_marginal and kept_scores.numel() > 0:
        local_sums = _column_sums_of_scores(kept_scores, row_max, log_sum)
    elif needs_marginal:
        local_sums = module.column_sums(rows, templates, tau, row_max, log_sum, precision)
    totals, count, map_weight = _global_batch(local_sums, batch, inputs.group, neg_entropy)
    pbar = neg_entropy.new_empty(0)
    if needs_marginal:
        # The p of the column sums sum to 1 only to a few ulps over N terms: pbar is taken
        # over its own mass (B in exact arithmetic).
        pbar = totals / totals.sum(-1, keepdim=True)
    if inputs.marginal:
        # sum_b D[b] = sum_b neg_entropy[b] - sum_t (sum_b p[b,t]) log pbar[t], every p of
        # the column sums formed as in row_stats. An excess mass d of the local sums would
        # move the second term by d log N: they too are taken over their mass, and the two
        # terms of a batch of identical maps cancel to the rounding of the entropies.
        mass = local_sums.sum(-1) / batch
        divergence = neg_entropy.sum(0) - _sum_log_floored(local_sums, pbar) / mass
    else:
        divergence = (neg_entropy + math.log(templates.shape[0])).sum(0)
    information = divergence * map_weight
    loss = -information
    if diversity > 0:
        loss = loss - diversity * _channel_diversity(pbar)
    summary = (_diagnostics(inputs, rows, information, log_sum, map_weight)
               if inputs.diagnostics else neg_entropy.new_empty(0))
    return LossOutputs(loss, row_max, log_sum, neg_entropy, pbar, map_weight, summary,
                       neg_entropy_grad, kept_scores)


@channel_loss.register_fake
def _(*inputs):
    inputs = LossInputs(*inputs)
    x = inputs.x
    batch, channels = x.shape[:2]
    dtype = accumulation_dtype(x.dtype)
    n = _num_templates(x, inputs.templates, inputs.subset)
    stats = x.new_empty((batch, channels), dtype=dtype)
    needs_marginal = inputs.marginal or inputs.diversity > 0
    pixels = x.shape[-2] * x.shape[-1]
    # A backend with the kept-scores pair has no warm_up (docs/design.md section 9), so
    # resolve_backend names the backend that choose_backend runs on this route.
    module = backend_module(resolve_backend(inputs.backend, x.device, x.dtype, pixels))
    kept = _keeps_scores(module, batch, channels, pixels)
    fused = inputs.with_grad and not needs_marginal and not kept
    return tuple(LossOutputs(
        loss=x.new_empty((channels,), dtype=dtype), row_max=stats,
        log_sum=torch.empty_like(stats), neg_entropy=torch.empty_like(stats),
        pbar=x.new_empty((channels, n) if needs_marginal else (0,), dtype=dtype),
        map_weight=x.new_empty((), dtype=dtype),
        summary=x.new_empty((len(DIAGNOSTICS) if inputs.diagnostics else 0,), dtype=dtype),
        neg_entropy_grad=x.new_empty((batch, channels, pixels) if fused else (0,), dtype=dtype),
        scores=x.new_empty((batch, channels, n) if kept else (0,), dtype=dtype)))


def _backward_route(x, templates, radius, subset, tau, prior, precision, backend):
    """What both backward ops resolve: the precision, the templates, ``x`` as ``(B, C, K)``
    rows, and the backend module that the forward ran."""
    precision = resolve_precision(precision, x.dtype)
    templates = _templates_for(x, templates, radius, subset)
    batch, channels = x.shape[:2]
    rows = x.reshape(batch, channels, -1).contiguous()
    module = backend_module(choose_backend(backend, rows, templates, tau, precision,
                                           prior is not None))
    return precision, templates, rows, module


@torch.library.custom_op("ecloss_fast::input_grad", mutates_args=())
def input_grad(x: torch.Tensor, templates: Optional[torch.Tensor], radius: float, subset: int,
               tau: float, row_max: torch.Tensor, log_sum: torch.Tensor,
               neg_entropy: torch.Tensor, prior: Optional[torch.Tensor],
               row_weight: torch.Tensor, precision: str, backend: str) -> torch.Tensor:
    """``dx`` of docs/design.md sections 3 and 8.1 for the row weights ``-g[c] * map_weight``
    and the ``(C, N)`` prior of the backend contract (``None``: uniform, no diversity)."""
    precision, templates, rows, module = _backward_route(x, templates, radius, subset, tau,
                                                         prior, precision, backend)
    with torch.autocast(x.device.type, enabled=False):
        grad = module.input_grad(rows, templates, tau, row_max, log_sum, neg_entropy, prior,
                                 row_weight, precision)
    return grad.view(x.shape)


@input_grad.register_fake
def _(x, templates, radius, subset, tau, row_max, log_sum, neg_entropy, prior, row_weight,
      precision, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("ecloss_fast::input_grad_from_scores", mutates_args=())
def input_grad_from_scores(x: torch.Tensor, templates: Optional[torch.Tensor], radius: float,
                           subset: int, tau: float, row_max: torch.Tensor,
                           log_sum: torch.Tensor, neg_entropy: torch.Tensor,
                           prior: Optional[torch.Tensor], row_weight: torch.Tensor,
                           precision: str, backend: str, scores: torch.Tensor) -> torch.Tensor:
    """``input_grad`` on the kept-scores route: from the forward's ``(B, C, N)`` scores
    (docs/design.md section 9). An op of its own, so that ``input_grad``'s schema, which
    compiled graphs cached by ``torch.compile`` call, stays as it was."""
    precision, templates, _, module = _backward_route(x, templates, radius, subset, tau, prior,
                                                      precision, backend)
    with torch.autocast(x.device.type, enabled=False):
        grad = module.input_grad_from_scores(scores, templates, tau, row_max, log_sum,
                                             neg_entropy, prior, row_weight, precision)
    return grad.to(x.dtype).view(x.shape)


@input_grad_from_scores.register_fake
def _(x, templates, radius, subset, tau, row_max, log_sum, neg_entropy, prior, row_weight,
      precision, backend, scores):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    inputs, output = LossInputs(*inputs), LossOutputs(*output)
    ctx.save_for_backward(inputs.x, inputs.templates, output.row_max, output.log_sum,
                          output.neg_entropy, output.pbar, output.map_weight,
                          output.neg_entropy_grad, output.scores)
    ctx.inputs = inputs._replace(x=None, templates=None)  # the tensors are saved above
    # Only the loss carries a gradient: no zeros the size of pbar (C x N), neg_entropy_grad
    # (B x C x K) or the scores (B x C x N) for the outputs the backward ignores.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused_grads):
    """The backend contract's prior (docs/design.md section 9) for upstream ``g = grad_loss``:
    ``w_c log pbar`` (marginal) plus ``diversity * map_weight * F`` (``_diversity_prior``),
    or ``None`` for the uniform estimator without diversity; that one needs no sweep when
    the forward ran ``row_stats_with_grad``: ``dx = row_weight * neg_entropy_grad``."""
    if grad_loss is None:  # the loss is not in the graph being differentiated
        return (None,) * len(LossInputs._fields)
    (x, templates, row_max, log_sum, neg_entropy, pbar, map_weight, neg_entropy_grad,
     kept_scores) = ctx.saved_tensors
    inputs = ctx.inputs
    no_grads = (None,) * (len(LossInputs._fields) - 1)  # only x gets a gradient
    upstream = grad_loss.to(row_max.dtype)
    channel_weight = upstream * -map_weight
    prior = _log_floored(pbar, channel_weight) if inputs.marginal else None
    if inputs.diversity > 0:
        term = (inputs.diversity * map_weight) * _diversity_prior(pbar, upstream)
        prior = term if prior is None else prior + term
    row_weight = channel_weight.expand_as(row_max).contiguous()
    if prior is None and neg_entropy_grad.numel() > 0:
        grad_x = (row_weight[..., None] * neg_entropy_grad).view(x.shape).to(x.dtype)
        return grad_x, *no_grads
    arguments = (x, templates, inputs.radius, inputs.subset, inputs.tau, row_max, log_sum,
                 neg_entropy, prior, row_weight, inputs.precision, inputs.backend)
    if kept_scores.numel() > 0:
        grad_x = torch.ops.ecloss_fast.input_grad_from_scores(*arguments, kept_scores)
    else:
        grad_x = torch.ops.ecloss_fast.input_grad(*arguments)
    return grad_x, *no_grads


channel_loss.register_autograd(_backward, setup_context=_setup_context)
