"""Every launch configuration of every Triton kernel fits an H100: compiled for sm_90 on the CPU.

For each kernel, operand kind and configuration of ``ecloss_fast.triton_kernels.configs``
(Hopper table) at the paper's ``K = 196``, ``triton.compile`` builds the kernel for
``GPUTarget("cuda", 90, 32)`` (no GPU needed; Triton's bundled ``ptxas`` assembles it), and
the test checks:

* shared memory at most 227 KB (the H100's per-block limit);
* no local memory: ``cuobjdump --dump-resource-usage`` on the cubin reports ``LOCAL:0``
  (the kernels have no local arrays). Register spills are not counted there but in the
  stack frame (``STACK``), and are not asserted: several of these configurations spill
  (``ptxas -v``, triton 3.8: ``row_prior`` and most ``input_grad`` ones, up to 5.6 KB of
  spill stores);
* the matrix instructions: ``wgmma`` or ``mma`` in the PTX, except for ``"ieee"``, which
  Triton runs on the FMA units by design.

The compilations run in one fresh Python process (this file run as a script), without
``TRITON_INTERPRET``: a process that ran interpreted kernels has Triton's language modules
patched by the interpreter (see tests/conftest.py), and a kernel module imported under
``TRITON_INTERPRET=1`` holds interpreted functions, which do not compile. The
``ASTSource(fn, signature, constexprs)`` form with string signatures and a ``constexprs``
dict keyed by argument name is the triton >= 3.3 API (3.6..3.9 here); older versions are
skipped with that reason.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from ecloss_fast.backends.triton_fused import _chunks  # noqa: E402
from ecloss_fast.triton_kernels import configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H100_SHARED_BYTES = 227 * 1024
K = 196  # 14x14 maps, the paper's setting: chunks 128 + 64 + 16


def _kernel_and_signature(kernel: str, operands: str, config: configs.LaunchConfig,
                          has_prior: bool):
    """The kernel, its signature and constexprs, read off its own parameters: the maps
    (``x_ptr``, ``dx_ptr``) in the input dtype, ``templates_ptr`` in the operand dtype, every
    other pointer in the accumulation dtype, every other runtime argument ``i32``."""
    import triton.language as tl

    from ecloss_fast.triton_kernels import column_sums, input_grad, row_prior, row_stats

    element = {"bf16": "*fp32", "tf32": "*fp32", "ieee": "*fp32", "fp64": "*fp64"}[operands]
    pointers = {"x_ptr": element, "dx_ptr": element,
                "templates_ptr": "*bf16" if operands == "bf16" else element}
    acc = "*fp64" if operands == "fp64" else "*fp32"
    k0, k1, k2 = _chunks(K)
    # The paper's batch: B = 64 maps of a channel per column_sums tile.
    block_b = min(64, config.block_m)
    constants = dict(TAU=1e-3, K=K, K0=k0, K1=k1, K2=k2, OPERANDS=operands,
                     ACC=tl.float64 if operands == "fp64" else tl.float32, INTERPRETED=False,
                     BLOCK_M=config.block_m, BLOCK_N=config.block_n, HAS_PRIOR=has_prior,
                     CHANNELS=config.block_m // block_b, BLOCK_B=block_b)
    fn = {"row_stats": row_stats.row_stats_kernel, "row_prior": row_prior.row_prior_kernel,
          "column_sums": column_sums.column_sums_kernel,
          "input_grad": input_grad.input_grad_kernel}[kernel]
    signature, constexprs = {}, {}
    for parameter in fn.params:
        name = parameter.name
        if parameter.is_constexpr:
            if name not in constants:
                raise KeyError(f"{kernel}_kernel has a constexpr {name} this test does not set")
            signature[name], constexprs[name] = "constexpr", constants[name]
        else:
            signature[name] = pointers.get(name, acc) if name.endswith("_ptr") else "i32"
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


def _compile(kernel: str, operands: str, config: configs.LaunchConfig, has_prior: bool) -> dict:
    """What the test checks of one compiled kernel (run in the compiling process)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs = _kernel_and_signature(kernel, operands, config, has_prior)
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=config.num_warps,
                                           num_stages=config.num_stages))
    return dict(shared=compiled.metadata.shared,
                local=_local_memory_bytes(compiled.asm["cubin"]),
                matrix_instruction=bool(re.search(r"\b(wgmma|mma)\.", compiled.asm["ptx"])))


def _compile_cases(cases: dict) -> dict:
    """``{case id: _compile's result, or {"error": traceback}}`` for ``{case id: params}``."""
    results = {}
    for case_id, params in cases.items():
        try:
            results[case_id] = _compile(params["kernel"], params["operands"],
                                        configs.LaunchConfig(**params["config"]),
                                        params["has_prior"])
        except Exception:  # noqa: BLE001: reported per case, as that case's failure
            results[case_id] = {"error": traceback.format_exc()}
    return results


def _compile_in_fresh_process(cases: dict) -> dict:
    """``_compile_cases`` in a new Python process, which has never run an interpreted kernel."""
    environment = {name: value for name, value in os.environ.items()
                   if name != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, __file__], input=json.dumps(cases), cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        pytest.fail(f"the compiling process exited with {done.returncode}:\n"
                    f"{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def compiled(request):
    """The selected cases of this module, all compiled in one fresh process."""
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip("this triton's ASTSource has no `constexprs` argument (triton < 3.3)")
    cases = {item.callspec.id: {**item.callspec.params,
                                "config": dataclasses.asdict(item.callspec.params["config"])}
             for item in request.session.items
             if item.module is request.module and item.originalname == "test_config_fits_h100"}
    return _compile_in_fresh_process(cases)


@pytest.mark.parametrize("kernel, operands, config, has_prior", list(_cases()))
def test_config_fits_h100(compiled, request, kernel, operands, config, has_prior):
    result = compiled[request.node.callspec.id]
    assert "error" not in result, result.get("error")
    assert result["shared"] <= H100_SHARED_BYTES, result["shared"]
    assert result["local"] == 0, "the kernel uses local memory"
    if operands != "ieee":
        assert result["matrix_instruction"], "no matrix instruction"


if __name__ == "__main__":
    print(json.dumps(_compile_cases(json.load(sys.stdin))))
