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
``row_stats(x, templates, tau, precision) -> (lse, neg_entropy)``
    ``x`` is ``(B, C, K)`` contiguous in the input dtype (float16, bfloat16, float32 or
    float64); ``templates`` is ``(N, K)`` contiguous, unit-scaled, in the accumulation
    dtype (float64 for float64 input, else float32). With
    ``s[b,c,t] = tau * sum_k x[b,c,k] * templates[t,k]``, returns ``lse = log sum_t exp s``
    and ``neg_entropy = sum_t p (s - lse)`` (``p = exp(s - lse)``), both ``(B, C)`` in the
    accumulation dtype. One sweep over the templates, online softmax.
``column_sums(x, templates, tau, lse, precision) -> (C, N)``
    ``sum_b p[b,c,t]``, accumulation dtype, in a fixed reduction order (deterministic).
``input_grad(x, templates, tau, lse, neg_entropy, log_q, row_weight, precision) -> dx``
    ``log_q`` is ``(C, N)`` (the marginal estimator's ``log max(pbar, tiny)``) or ``None``
    (uniform: the prior cancels); ``row_weight`` is ``(B, C)`` in the accumulation dtype.
    Returns ``dx`` of ``x``'s shape and dtype::

        r[b,c]    = sum_t p[b,c,t] * log_q[c,t]                       (0 when uniform)
        dx[b,c,:] = tau * row_weight[b,c] * sum_k p[b,c,k]
                      * (s[b,c,k] - lse[b,c] - neg_entropy[b,c] - log_q[c,k] + r[b,c])
                      * templates[k,:]

``precision`` is already resolved to ``"ieee"``, ``"tf32"`` or ``"bf16"`` (SPEC section 4).
No function may allocate anything of size ``B x C x N``.
"""
