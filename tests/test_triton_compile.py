"""Every configuration the backend picks by default fits an H100: compiled for sm_90 on the CPU.

``python -m bench.kernels`` compiles each launch exactly as Triton's runtime JIT would
(its binder's specialisation: ``tt.divisibility = 16`` on aligned pointers and on integer
arguments that are multiples of 16; see that module) for ``GPUTarget("cuda", 90, 32)``, and
reads the cubin with ``cuobjdump`` and the PTX with ``ptxas -v``. For every kernel (the
training sweeps in both forms, fused and split, whichever ``configs.FUSED`` picks), operand
kind and ``K`` in 196 and 784, the configuration ``configs.default`` picks at the paper's
``B*C = 32,768`` rows must have:

* no register spills: ``STACK`` 0 in ``cuobjdump --dump-resource-usage`` (spills live in
  the stack frame, not in ``LOCAL``) and no spill stores in ``ptxas -v``;
* shared memory at most 227 KB (the H100's per-block limit) and at least one block per SM;
* the matrix instructions, ``wgmma`` or ``mma`` in the PTX, except for ``"ieee"``, which
  Triton runs on the FMA units by design.

The check is shown to bite: one configuration known to spill (a 128-row ``input_grad``
with a prior, bf16) is compiled too and must be reported as spilling.

The compilations run in one fresh Python process without ``TRITON_INTERPRET``: a kernel
module imported under ``TRITON_INTERPRET=1`` holds interpreted functions, which do not
compile.
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

ROOT = Path(__file__).resolve().parents[1]
H100_SHARED_BYTES = 227 * 1024
KNOWN_SPILLER = "input_grad_prior:196:float32:bf16:128x64w8s2"


def fit_problems(record: dict) -> list[str]:
    """Why the compiled configuration of ``record`` does not fit an H100 (empty: it fits)."""
    if "error" in record:
        return [f"did not compile: {record['error']}"]
    problems = []
    if record["spill_bytes"] or record["spill_stores"]:
        problems.append(f"spills: {record['spill_bytes']} B of stack, "
                        f"{record['spill_stores']} B of spill stores")
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
    path = tmp_path_factory.mktemp("kernels") / "kernels.json"
    environment = {name: value for name, value in os.environ.items()
                   if name != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "bench.kernels", "--defaults-only",
                           "--config", KNOWN_SPILLER, "--json", str(path)],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1800)
    if not path.exists():
        pytest.fail(f"bench.kernels exited with {done.returncode}:\n{done.stderr[-4000:]}")
    records = json.loads(path.read_text())
    return [r for r in records if r["default"]], [r for r in records if not r["default"]]


def test_every_kernel_operand_kind_and_k_has_a_default(report):
    defaults, _ = report
    picked = {(r["kernel"], r["prior"], r["K"], r["input"], r["operands"]) for r in defaults}
    assert len(picked) == len(defaults), "two defaults for one launch"
    # 7 kernels (input_grad with and without a prior, the training routes' fused and split
    # forms) x 5 routes x 2 K.
    assert len(picked) == 70, sorted(picked)


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
