"""``python -m ecloss_fast``, the report for bug reports, says what this installation runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
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
    best_is_baseline = paths == ["baseline"]  # a CPU without AVX2+FMA
    assert fields["auto on the CPU"].startswith("torch ('cpu' passed over") == best_is_baseline
    assert (fields["auto on the CPU"] == "cpu") != best_is_baseline
    fields = _run_info(ECLOSS_FAST_CPU_ISA="baseline")
    assert fields["cpu backend path"] == (f"baseline (set by ECLOSS_FAST_CPU_ISA=baseline); "
                                          f"this CPU has: {', '.join(paths)}")
    assert fields["auto on the CPU"].startswith("torch ('cpu' passed over: its kernels run the "
                                                "baseline instruction-set path")
    fields = _run_info(ECLOSS_FAST_CPU_ISA="sse9")
    assert fields["cpu backend path"].startswith(
        "ECLOSS_FAST_CPU_ISA='sse9' is not an instruction-set path")


def _extension_path() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("ecloss_fast._C")
    return None if spec is None else spec.origin


def test_extension_records_the_torch_it_was_built_against():
    from ecloss_fast._build_info import recorded_torch_version

    path = _extension_path()
    if path is None or recorded_torch_version(path) is None:
        pytest.skip("no extension built by this setup.py here (it records its torch)")
    # Built here, against this process's torch: loaded, and said so.
    assert recorded_torch_version(path) == torch.__version__
    assert cpp_cpu.build_problem() is None and cpp_cpu.extension_error is None
    assert _fields(report())["extension built against"] == \
        f"torch {torch.__version__} (the running torch)"


def test_an_extension_built_for_another_torch_is_named_not_loaded(tmp_path):
    from ecloss_fast._build_info import MARKER, recorded_torch_version

    built = tmp_path / "_C.so"
    built.write_bytes(b"\x7fELF padding " + MARKER + b"1.2.3+cu000\0 more bytes")
    assert recorded_torch_version(built) == "1.2.3+cu000"
    problem = cpp_cpu._torch_mismatch(str(built))
    assert "built against torch 1.2.3+cu000" in problem
    assert f"torch {torch.__version__} is running" in problem
    assert "not loaded" in problem and "build_ext --inplace" in problem
    unrecorded = tmp_path / "_old.so"
    unrecorded.write_bytes(b"\x7fELF nothing recorded")
    assert recorded_torch_version(unrecorded) is None and cpp_cpu._torch_mismatch(
        str(unrecorded)) is None


def test_auto_and_the_report_say_a_torch_mismatch_plainly(monkeypatch):
    """An extension built for another torch: the report says so on its own line, and auto
    warns once, with how to rebuild, before running torch instead of cpu."""
    problem = ("the C++ extension ecloss_fast._C (/x/_C.so) was built against torch 1.2.3, "
               "but torch 9.9.9 is running, so it is not loaded; rebuild it")
    monkeypatch.setattr(cpp_cpu, "_build_problem", problem)
    monkeypatch.setattr(cpp_cpu, "extension_error", problem)
    monkeypatch.setattr(cpp_cpu, "availability", lambda: problem)
    _dispatch._load.cache_clear()
    try:
        fields = _fields(report())
        assert fields["extension built against"] == f"MISMATCH: {problem}"
        assert fields["backend cpu"] == problem
        x = torch.rand(2, 3, 4, 4)
        with pytest.warns(RuntimeWarning, match=r"passes over 'cpu': the C\+\+ extension .* "
                                                r"built against torch 1\.2\.3"):
            loss = ef.ecloss(x)
        assert torch.equal(loss, ef.ecloss(x, backend="torch"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: the second call says nothing
            ef.ecloss(x)
    finally:
        _dispatch._load.cache_clear()
        _dispatch._WARNED_BUILDS.clear()
