"""Every launch configuration of every Triton kernel fits an H100: compiled for sm_90 on the CPU.

For each kernel, operand kind and configuration of ``ecloss_fast.triton_kernels.configs``
(Hopper table) at the paper's ``K = 196``, ``triton.compile`` builds the kernel for
``GPUTarget("cuda", 90, 32)`` (no GPU needed; Triton's bundled ``ptxas`` assembles it), and
the test checks:

* shared memory at most 227 KB (the H100's per-block limit);
* no register spills: ``cuobjdump --dump-resource-usage`` on the cubin reports no local
  memory (spilled registers live there; the kernels have no local arrays);
* the matrix instructions: ``wgmma`` or ``mma`` in the PTX, except for ``"ieee"``, which
  Triton runs on the FMA units by design.

The ``ASTSource(fn, signature, constexprs)`` form with string signatures and a
``constexprs`` dict keyed by argument name is the triton >= 3.3 API (3.6..3.9 here);
older versions are skipped with that reason. Under ``TRITON_INTERPRET=1`` at import time
the kernels are interpreted functions and cannot be compiled: skipped too.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")

from ecloss_fast.backends.triton_fused import _chunks  # noqa: E402
from ecloss_fast.triton_kernels import configs  # noqa: E402

H100_SHARED_BYTES = 227 * 1024
K = 196  # 14x14 maps, the paper's setting: chunks 128 + 64 + 16


def _compile_api():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    import inspect
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip("this triton's ASTSource has no `constexprs` argument (triton < 3.3)")
    return ASTSource, GPUTarget, JITFunction


def _kernel_and_signature(kernel: str, operands: str, config: configs.LaunchConfig,
                          has_prior: bool):
    import triton.language as tl

    from ecloss_fast.triton_kernels import column_sums, input_grad, row_prior, row_stats

    element = {"bf16": "*fp32", "tf32": "*fp32", "ieee": "*fp32", "fp64": "*fp64"}[operands]
    templates = "*bf16" if operands == "bf16" else element
    acc = "*fp64" if operands == "fp64" else "*fp32"
    k0, k1, k2 = _chunks(K)
    constexprs = dict(TAU=1e-3, K=K, K0=k0, K1=k1, K2=k2, OPERANDS=operands,
                      ACC=tl.float64 if operands == "fp64" else tl.float32,
                      BLOCK_N=config.block_n)
    if kernel == "row_stats":
        fn = row_stats.row_stats_kernel
        signature = dict(x_ptr=element, templates_ptr=templates, lse_ptr=acc,
                         neg_entropy_ptr=acc, M="i32", N="i32")
        constexprs["BLOCK_M"] = config.block_m
    elif kernel == "row_prior":
        fn = row_prior.row_prior_kernel
        signature = dict(x_ptr=element, templates_ptr=templates, lse_ptr=acc, log_q_ptr=acc,
                         out_ptr=acc, B="i32", C="i32", N="i32")
        constexprs["BLOCK_M"] = config.block_m
    elif kernel == "column_sums":
        fn = column_sums.column_sums_kernel
        signature = dict(x_ptr=element, templates_ptr=templates, lse_ptr=acc,
                         partial_ptr=acc, B="i32", C="i32", N="i32", tiles_per_program="i32")
        # The paper's batch: B = 64 maps of a channel per tile.
        block_b = min(64, config.block_m)
        constexprs.update(CHANNELS=config.block_m // block_b, BLOCK_B=block_b)
    else:
        fn = input_grad.input_grad_kernel
        signature = dict(x_ptr=element, templates_ptr=templates, lse_ptr=acc,
                         neg_entropy_ptr=acc, log_q_ptr=acc, prior_ptr=acc,
                         row_weight_ptr=acc, dx_ptr=element, B="i32", C="i32", N="i32")
        constexprs.update(BLOCK_M=config.block_m, HAS_PRIOR=has_prior)
    signature.update({name: "constexpr" for name in constexprs})
    return fn, signature, constexprs


def _cases():
    """All candidates of the two kernels that set the pace (``row_stats``, uniform
    ``input_grad``); the default bf16 and tf32 configuration of the others, whose code is
    the same plus one load (``row_prior``, ``column_sums``, ``input_grad`` with a prior).
    That keeps this test near 20 compilations (about 4 s each on one core)."""
    for kernel in configs.KERNELS:
        for has_prior in ((False, True) if kernel == "input_grad" else (False,)):
            every = kernel == "row_stats" or (kernel == "input_grad" and not has_prior)
            for operands in configs.OPERAND_KINDS if every else ("bf16", "tf32"):
                table = configs.HOPPER[(kernel, operands)]
                for config in table if every else table[:1]:
                    key = (kernel, operands, config, has_prior)
                    yield pytest.param(*key, id=f"{kernel}-{operands}-{config.block_m}x"
                                           f"{config.block_n}w{config.num_warps}s"
                                           f"{config.num_stages}{'-prior' if has_prior else ''}")


def _local_memory_bytes(cubin: bytes) -> int:
    from triton import knobs

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                                check=True, capture_output=True, text=True).stdout
    return sum(int(value) for value in re.findall(r"LOCAL:(\d+)", report))


@pytest.mark.parametrize("kernel, operands, config, has_prior", list(_cases()))
def test_config_fits_h100(kernel, operands, config, has_prior):
    ASTSource, GPUTarget, JITFunction = _compile_api()
    fn, signature, constexprs = _kernel_and_signature(kernel, operands, config, has_prior)
    if not isinstance(fn, JITFunction):
        pytest.skip("TRITON_INTERPRET=1 was set when triton was imported: nothing compiles")
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=config.num_warps,
                                           num_stages=config.num_stages))
    assert compiled.metadata.shared <= H100_SHARED_BYTES, compiled.metadata.shared
    assert _local_memory_bytes(compiled.asm["cubin"]) == 0, "registers spill to local memory"
    if operands != "ieee":
        assert re.search(r"\b(wgmma|mma)\.", compiled.asm["ptx"]), "no matrix instruction"
