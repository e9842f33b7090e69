"""Fused backends of ECLoss, one module each, with the same functions: the backend contract
of docs/design.md section 9 (which is the only statement of it).

``streaming`` is backend ``"torch"``, ``triton_fused`` ``"triton"``, ``cpp_cpu`` ``"cpu"``
and ``cpp_cuda`` ``"cuda"``; ``reference`` is the ground truth in plain autograd, which
materialises the scores and implements no contract. The dispatcher
(``ecloss_fast._dispatch``) imports a backend when it is first asked for, and the custom
ops (``ecloss_fast._ops``) call it; a backend imports neither.
"""
