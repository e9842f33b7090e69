"""Every configuration the backend picks by default fits an H100: compiled for sm_90 on the CPU.

``python -m bench.kernels`` compiles each launch exactly as Triton's runtime JIT would
(its binder's specialisation: ``tt.divisibility = 16`` on aligned pointers and on integer
arguments that are multiples of 16; see that module) for ``GPUTarget("cuda", 90, 32)``, and
reads the cubin with ``cuobjdump`` and the PTX with ``ptxas -v``. For every launch (the
training sweeps in both forms, fused and split, whichever ``configs.FUSED`` picks), route
(every input dtype and precision a loss call can take to the kernels, ``bench.kernels.ROUTES``)
and ``K`` in 196 and 784 (every form at both: the sliced and the chunked ``input_grad``),
the configuration ``configs.default`` picks at the paper's
``B*C = 32,768`` rows must have:

* no register spills in the template sweep: where ``cuobjdump --dump-resource-usage``
  reports a stack (spills live in the stack frame, not in ``LOCAL``) or ``ptxas -v`` spill
  stores, no local store or load may lie inside a loop of the SASS. A spill outside every
  loop costs one store and one load per thread and program, nothing per template tile:
  bench/NOTES.md lists each such default, with its version;
* shared memory at most 227 KB (the H100's per-block limit) and at least one block per SM;
* the matrix instructions, ``wgmma`` or ``mma`` in the PTX, except for ``"ieee"``, which
  Triton runs on the FMA units by design.

The check is shown to bite: one configuration known to spill inside the sweep
(``input_grad`` with a prior, bf16, ``K = 784`` with ``dx`` whole) is compiled too and must
be reported as spilling.

The compilations run in a fresh Python process without ``TRITON_INTERPRET`` (a kernel
module imported under ``TRITON_INTERPRET=1`` holds interpreted functions, which do not
compile), with one compiling process per core. bench/gpu_check.sh runs this file on the GPU
machine's triton (its ``kernels`` stage), with ``ECLOSS_KERNEL_REPORT`` naming the file that
keeps the records (else a temporary one).
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from bench.kernels import KERNELS, ROUTES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H100_SHARED_BYTES = 227 * 1024
# dx whole at K = 784 (392 float32 values per row): spills inside the sweep under 3.6 and 3.8.
KNOWN_SPILLER = "input_grad_prior:784:float32:bf16:64x32w4s2"


def fit_problems(record: dict) -> list[str]:
    """Why the compiled configuration of ``record`` does not fit an H100 (empty: it fits)."""
    if "error" in record:
        return [f"did not compile: {record['error']}"]
    problems = []
    if record["spills_in_loops"]:
        problems.append(f"spills: {record['spill_bytes']} B of stack, "
                        f"{record['spill_stores']} B of spill stores, "
                        f"{record['spills_in_loops']} local accesses in the template sweep")
    if record["local_bytes"]:
        problems.append(f"uses {record['local_bytes']} B of local memory")
    if record["shared_bytes"] > H100_SHARED_BYTES:
        problems.append(f"{record['shared_bytes']} B of shared memory > 227 KB")
    if record["blocks_per_sm"] < 1:
        problems.append("no block fits on an SM")
    if record["operands"] != "ieee" and not record["matrix_instruction"]:
        problems.append("no matrix instruction")
    return problems


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``python -m bench.kernels --defaults-only`` plus the known spiller, in a fresh process."""
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip("this triton's ASTSource has no `constexprs` argument (triton < 3.3)")
    path = Path(os.environ.get("ECLOSS_KERNEL_REPORT")
                or tmp_path_factory.mktemp("kernels") / "kernels.json")
    environment = {name: value for name, value in os.environ.items()
                   if name != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "bench.kernels", "--defaults-only",
                           "--jobs", str(os.cpu_count()), "--config", KNOWN_SPILLER,
                           "--json", str(path)],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1800)
    if not path.exists():
        pytest.fail(f"bench.kernels exited with {done.returncode}:\n{done.stderr[-4000:]}")
    records = json.loads(path.read_text())
    return [r for r in records if r["default"]], [r for r in records if not r["default"]]


def test_every_kernel_operand_kind_and_k_has_a_default(report):
    defaults, _ = report
    picked = {(r["kernel"], r["K"], r["input"], r["precision"]) for r in defaults}
    assert len(picked) == len(defaults), "two defaults for one launch"
    # 11 launches (input_grad with and without a prior, the training routes' fused and split
    # forms, the chunked input_grad's two kernels) x 11 routes (input dtype and precision)
    # x 2 K.
    assert len(picked) == len(KERNELS) * len(ROUTES) * 2 == 242, sorted(picked)


def test_default_configs_fit_h100(report):
    defaults, _ = report
    failures = {f"{r['kernel']} K={r['K']} {r['input']} {r['operands']} {r['config']}":
                fit_problems(r) for r in defaults}
    failures = {case: problems for case, problems in failures.items() if problems}
    assert not failures, json.dumps(failures, indent=1)


def test_default_row_tiles_are_128_at_the_paper_setting(report):
    """The forward sweeps take 128-row tiles at ``B*C = 32,768``, ``K = 196``, bf16/tf32."""
    defaults, _ = report
    for r in defaults:
        if r["kernel"] in ("row_stats", "column_sums") and r["K"] == 196 \
                and r["operands"] in ("bf16", "tf32"):
            assert r["config"]["block_m"] == 128, r


def test_spill_check_catches_a_spilling_config(report):
    _, probes = report
    assert len(probes) == 1 and "error" not in probes[0], probes
    assert any("spills" in problem for problem in fit_problems(probes[0])), probes[0]


# bench/precompile.py compiles the GPU check's kernels in other processes, before the stages
# run; it helps only if the runtime JIT of a later process finds them in Triton's cache. Here
# the JIT runs (JITFunction.warmup: bind, specialise, compile, no launch) with a stand-in for
# the CUDA driver that only names the device, the stream and the sm_90 target.
_JIT_FINDS_PRECOMPILED = """
import os, sys, tempfile
cache = tempfile.mkdtemp()
os.environ["TRITON_CACHE_DIR"] = cache
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from bench import gpu_plan, kernels

target = GPUTarget("cuda", 90, 32)

def launch(pixels):
    with kernels.recorded_launches() as recorded:
        gpu_plan._explicit((5, 3, pixels), torch.float32, "ieee", False)
    return recorded[0]

class Driver:
    def get_current_device(self): return 0
    def get_current_stream(self, device): return 0
    def get_current_target(self): return target
    def get_active_torch_device(self): return torch.device("cpu")
    def is_active(self): return True

kernel, grid, args, kwargs = launch(35)
kernels.compile_like_runtime(kernel, args, kwargs, target)  # what bench.precompile does
precompiled = len(os.listdir(cache))
driver.set_active(Driver())
kernel.warmup(*args, grid=grid, **kwargs)
found = len(os.listdir(cache))
kernel, grid, args, kwargs = launch(48)  # not precompiled: the JIT compiles it
kernel.warmup(*args, grid=grid, **kwargs)
print(precompiled, found, len(os.listdir(cache)))
"""


def test_the_jit_loads_what_the_precompile_compiled():
    environment = {name: value for name, value in os.environ.items()
                   if name != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _JIT_FINDS_PRECOMPILED], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    precompiled, after_jit, after_control = map(int, done.stdout.split())
    assert precompiled == after_jit == 1 and after_control == 2, done.stdout
