"""Triton kernels of ECLoss, one per file, and how to run them in Triton's interpreter.

``row_stats``, ``column_sums``, ``row_prior``, ``input_grad``, ``score_grad`` and
``template_product`` (the chunked backward) each hold one ``@triton.jit`` kernel; ``_tiles`` holds the helpers they share and ``configs`` the launch
configurations. The launchers live in ``ecloss_fast.backends.triton_fused``;
``interpreter.run_interpreted`` runs a kernel in Triton's interpreter (CPU tensors, tests)
whatever ``TRITON_INTERPRET`` was when ``triton`` was imported.
"""
from ecloss_fast.triton_kernels.interpreter import run_interpreted

__all__ = ["run_interpreted"]
