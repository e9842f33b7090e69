"""Fused backends of ECLoss and the contract each one implements.

Every backend except ``reference`` is a module in this package with the same
module-level functions; the dispatcher (``ecloss_fast._dispatch``) imports it lazily, the
custom ops (``ecloss_fast._ops``) call it, and the autograd glue composes them. Imports run
one way: the API, the ops, the dispatcher, the backends, the kernels; a backend imports
neither the ops nor the dispatcher. Shapes:
``B`` feature maps per channel, ``C`` channels, ``K = H*W`` pixels, ``N`` templates.

``availability() -> str | None``
    ``None`` when the backend can run here, else a sentence saying why not and how to
    get it (for example which command builds the extension).
``supports(device: torch.device, dtype: torch.dtype, pixels: int) -> bool``
    Whether the backend takes maps of that device, input dtype and size ``K = pixels``;
    ``TAKES`` (a module string) says which in words, for the error that a backend named
    explicitly raises on other maps. ``backend="auto"`` passes over it for them.
``warm_up(x, templates, tau, precision, prior: bool) -> None`` (optional)
    For a backend that builds or loads code at run time: make ready, without computing a
    loss, everything loss calls on maps like ``x`` run, forward and backward (with a prior
    when ``prior``: the marginal estimator or the diversity term), and raise what their
    first call would raise. ``backend="auto"`` runs it once per route and process before
    the route's first call, and takes the next backend for routes it fails.
``launch_class(device, dtype, rows, pixels, precision) -> hashable`` (optional)
    What else decides which code a call runs (Triton: the row tiles for ``rows = B*C``):
    calls with equal classes share ``warm_up``'s verdict.
``build_problem() -> str | None`` (optional)
    Why an installed build of the backend does not fit this process (the extension was
    built against another torch), else ``None``; ``auto`` warns it once when it passes
    over the backend, instead of running another one silently.
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
``row_stats_with_grad(x, templates, tau, precision) -> (row_max, log_sum, neg_entropy, neg_entropy_grad)``
    ``row_stats`` and, from the same sweep of exponentials, the gradient of each row's
    ``neg_entropy`` by its map, ``(B, C, K)`` in the accumulation dtype::

        neg_entropy_grad[b,c,:] = tau * sum_k p_k ((s_k - row_max) - E) templates[k,:]
                                = tau * (V - (a / l) U) / l,    E = neg_entropy + log_sum

    with ``l = sum e^(s-m)``, ``a = sum e^(s-m) (s-m)``, ``U = sum e^(s-m) T[t]`` and
    ``V = sum e^(s-m) (s-m) T[t]`` over the templates, ``m`` the running maximum: when it
    rises from ``m`` to ``m'`` the sums rescale by ``e^(m-m')`` and ``V`` and ``a`` gain
    ``(m-m')`` times ``U`` and ``l``. Shifted by the maximum, the best template contributes
    nothing to ``V`` or ``a``, so a peaked row does not cancel. The uniform estimator's
    ``dx`` is then ``row_weight * neg_entropy_grad``: training costs one sweep of
    exponentials and one template stream where ``row_stats`` + ``input_grad`` take two.
    Its scores are bitwise ``row_stats``' (the same product routine); its statistics equal
    ``row_stats``' to rounding.
``column_sums(x, templates, tau, row_max, log_sum, precision) -> (C, N)``
    ``sum_b p[b,c,t]`` with ``p = exp((s - row_max) - log_sum)`` from bitwise the scores of
    ``row_stats``; accumulation dtype, in a fixed reduction order (deterministic).
``input_grad(x, templates, tau, row_max, log_sum, neg_entropy, prior, row_weight, precision) -> dx``
    ``prior`` is ``(C, N)`` in the accumulation dtype or ``None``; ``row_weight`` ``w`` is
    ``(B, C)`` in the accumulation dtype, the same for every ``b`` of a channel
    (``w[b,c] = -g[c] * map_weight`` for the upstream gradient ``g``). With
    ``log p = (s - row_max) - log_sum`` and ``p = exp(log p)`` from bitwise the forward's
    scores, returns ``dx`` of ``x``'s shape and dtype::

        prior None: ds[b,c,k] = w p_k ((s_k - row_max) - E),   E = neg_entropy + log_sum
        prior:      ds[b,c,k] = p_k (w log p_k - prior[c,k] - D[b,c]),
                    D[b,c]    = sum_t p_t (w log p_t - prior[c,t]) / sum_t p_t
        dx[b,c,:] = tau * sum_k ds[b,c,k] * templates[k,:]

    ``D`` is taken over the recomputed mass ``sum_t p`` (1 in exact arithmetic), so that a
    row's weights sum to 0 to rounding. With a prior, ``D`` and ``dx`` come from one sweep:
    ``dx = tau * (Z - (D - c) U)`` with ``U = sum p T[t]``, ``Z = sum p (z - c) T[t]``,
    ``z = w log p - prior``, about a reference ``c`` that follows the running mean of ``z``
    (after a block, ``c' = c + sum p (z - c) / sum p`` and ``Z += (c - c') U``), so that
    nothing large cancels at the end (the one-sweep form; a backend may keep two sweeps
    where its kernels run faster so, e.g. the Triton and CUDA ones where the second
    accumulator costs occupancy). The prior ``ecloss_fast._ops`` passes, for ``mw = map_weight``:
    ``w_c log max(pbar, tiny)`` (marginal estimator) plus ``diversity * mw * F`` (the
    channel-diversity term, docs/design.md section 8.1), or ``None`` (uniform, no
    diversity); the marginal case is the earlier ``w p ((log p - log q) - KL(p || q))``.

``precision`` is already resolved to ``"ieee"``, ``"tf32"``, ``"bf16"`` or ``"fp16"`` (the
resolution of ``precision=None`` for float16 maps: products of float16 operands; a backend
without them says in its docstring what it runs instead), docs/design.md section 4.
No function may allocate anything of size ``B x C x N``.
"""
