"""``python -m ecloss_fast``, the report for bug reports, says what this installation runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ecloss_fast as ef
from ecloss_fast import _dispatch
from ecloss_fast.__main__ import report
from ecloss_fast.backends import cpp_cpu

ROOT = Path(__file__).resolve().parents[1]
# setup.py's default when TORCH_CUDA_ARCH_LIST is not set at build time.
DEFAULT_ARCHITECTURES = "8.0;9.0"


def _fields(text: str) -> dict:
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines())


def _run_info(**environment) -> dict:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "ecloss_fast"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**env, **environment})
    assert done.returncode == 0, done.stderr
    return _fields(done.stdout)


def _why_unavailable(name: str) -> str | None:
    """The reason the public API gives when the backend is asked for by name."""
    try:
        _dispatch.backend_module(name)
    except ef.BackendUnavailableError as error:
        return str(error).split(": ", 1)[1]
    return None


def test_versions_and_every_backend():
    fields = _run_info()
    assert fields["ecloss-fast"] == ef.__version__
    assert fields["torch"] == torch.__version__
    try:
        import triton
    except ImportError:
        assert fields["triton"] == "not installed"
    else:
        assert fields["triton"] == triton.__version__
    assert fields["CUDA"].startswith(torch.version.cuda or "none (torch is a CPU build)")
    # This process has no TRITON_INTERPRET either (conftest restores the environment).
    os.environ.pop("TRITON_INTERPRET", None)
    _dispatch._load.cache_clear()
    try:
        for name in _dispatch.BACKENDS:
            why_not = None if name == "reference" else _why_unavailable(name)
            assert fields[f"backend {name}"] == (why_not or "available"), name
            assert (why_not is None) == (name in ef.available_backends())
    finally:
        _dispatch._load.cache_clear()


def test_interpreter_makes_triton_available():
    pytest.importorskip("triton")
    assert _run_info(TRITON_INTERPRET="1")["backend triton"] == "available"


@pytest.mark.parametrize("setting, resolved", [("highest", "ieee"), ("high", "tf32"),
                                               ("medium", "bf16")])
def test_precision_none_follows_the_matmul_setting_for_float32_only(setting, resolved):
    torch.set_float32_matmul_precision(setting)  # conftest puts the setting back
    fields = _fields(report())
    assert fields["precision=None, float32"] == resolved
    # Half-precision maps multiply in their own type whatever the float32 setting.
    assert fields["precision=None, bfloat16"] == "bf16"
    assert fields["precision=None, float16"] == "fp16"
    assert fields["float32 matmul precision"] == repr(setting)


def test_extension_lists_the_architectures_it_was_built_for():
    fields = _run_info()
    if cpp_cpu.extension_error is not None:
        assert fields["extension"] == cpp_cpu.extension_error
        return
    if not torch._C._dispatch_has_kernel_for_dispatch_key("ecloss_fast_C::row_stats", "CUDA"):
        assert fields["extension"].endswith("the C++ CPU kernels only, no CUDA kernels")
        return
    asked = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHITECTURES
    expected = ", ".join(f"sm_{arch.split('+')[0].replace('.', '')}"
                         for arch in re.split(r"[;\s]+", asked.strip()))
    assert f"CUDA kernels for {expected};" in fields["extension"], fields["extension"]


@pytest.mark.skipif(cpp_cpu.extension_error is not None, reason="the C++ extension is not built")
def test_cpu_backend_path_in_use_and_the_paths_this_cpu_has():
    paths = cpp_cpu.isa_paths()
    fields = _run_info(ECLOSS_FAST_CPU_ISA="")
    assert fields["cpu backend path"] == (f"{paths[-1]} (the best this CPU has); this CPU "
                                          f"has: {', '.join(paths)}")
    fields = _run_info(ECLOSS_FAST_CPU_ISA="baseline")
    assert fields["cpu backend path"] == (f"baseline (set by ECLOSS_FAST_CPU_ISA=baseline); "
                                          f"this CPU has: {', '.join(paths)}")
    fields = _run_info(ECLOSS_FAST_CPU_ISA="sse9")
    assert fields["cpu backend path"].startswith(
        "ECLOSS_FAST_CPU_ISA='sse9' is not an instruction-set path")
