"""Fused backends of ECLoss and the contract each one implements.

Every backend except ``reference`` is a module in this package with the same
module-level functions; the dispatcher (``ecloss_fast._dispatch``) imports it lazily, the
custom ops (``ecloss_fast._ops``) call it, and the autograd glue composes them. Shapes:
``B`` feature maps per channel, ``C`` channels, ``K = H*W`` pixels, ``N`` templates.

``availability() -> str | None``
    ``None`` when the backend can run here, else a sentence saying why not and how to
    get it (for example which command builds the extension).
``supports(device: torch.device) -> bool``
    Whether the backend runs tensors on that device.
``row_stats(x, templates, tau, precision) -> (row_max, log_sum, neg_entropy)``
    ``x`` is ``(B, C, K)`` contiguous in the input dtype (float16, bfloat16, float32 or
    float64); ``templates`` is ``(N, K)`` contiguous, unit-scaled, in the accumulation
    dtype (float64 for float64 input, else float32). The scores
    ``s[b,c,t] = tau * sum_k x[b,c,k] * templates[t,k]`` are rounded to the accumulation
    dtype the way every sweep of the backend rounds them (the same product routine and
    order of accumulation per element, then one multiply by ``tau``, in natural units).
    Returns, each ``(B, C)`` in the accumulation dtype, from one online-softmax sweep::

        row_max     = max_t s[b,c,t]
        log_sum     = log sum_t exp(s - row_max)                       (>= 0)
        neg_entropy = sum_t p (s - row_max) - log_sum,   p = exp((s - row_max) - log_sum)

    The log-partition ``row_max + log_sum`` is never rounded into one number: at float32
    scores near 1e7 its ulp exceeds ``log_sum``, and ``p`` formed from it would not sum to
    1. Backends that use ``exp2`` take ``exp2((s - row_max) * log2(e))``, with the shift
    formed from the rounded score and the rounded maximum (never contracted into one FMA
    with the multiply by ``tau``).
``column_sums(x, templates, tau, row_max, log_sum, precision) -> (C, N)``
    ``sum_b p[b,c,t]`` with ``p = exp((s - row_max) - log_sum)`` from bitwise the scores of
    ``row_stats``; accumulation dtype, in a fixed reduction order (deterministic).
``input_grad(x, templates, tau, row_max, log_sum, neg_entropy, log_q, row_weight, precision) -> dx``
    ``log_q`` is ``(C, N)`` (the marginal estimator's ``log max(pbar, tiny)``) or ``None``
    (uniform: the prior cancels); ``row_weight`` is ``(B, C)`` in the accumulation dtype.
    With the same ``p`` as above, returns ``dx`` of ``x``'s shape and dtype::

        E[b,c]    = neg_entropy[b,c] + log_sum[b,c]            (= sum_t p (s - row_max))
        r[b,c]    = sum_t p[b,c,t] * log_q[c,t]                       (0 when uniform)
        dx[b,c,:] = tau * row_weight[b,c] * sum_k p[b,c,k]
                      * ((s[b,c,k] - row_max[b,c]) - E[b,c] - log_q[c,k] + r[b,c])
                      * templates[k,:]

    The grouping is free: ``torch`` and ``triton`` weight a template by
    ``p ((log p - log_q) - D)`` with ``D = E - log_sum - r = sum_t p (log p - log_q)``
    computed over the recomputed mass ``sum_t p``, where only terms within ``log B`` of
    each other cancel; ``E`` and ``r`` apart are of the size of the entropies, and their
    float32 difference put 7e-6 of relative error into ``dx`` on peaked maps (torch
    backend), against 8e-7 grouped so, as float32 autograd.

``precision`` is already resolved to ``"ieee"``, ``"tf32"`` or ``"bf16"`` (SPEC section 4).
No function may allocate anything of size ``B x C x N``.
"""
