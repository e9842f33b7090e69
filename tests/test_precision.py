"""One precision vocabulary (ecloss_fast/_precision.py) for the API, the backends, the Triton
kernels and the C++ extension, whose own names and operand layout are checked against it."""
import pytest
import torch

from ecloss_fast._precision import (OPERAND_KINDS, OPERANDS, PRECISIONS, RESOLVED_PRECISIONS,
                                    extension_precision, operand_kind, resolve_precision,
                                    triton_operands)
from ecloss_fast.backends import cpp_cpu, cpp_cuda

# Loaded, whether or not its names match (a mismatch makes it unavailable: these tests say so).
needs_extension = pytest.mark.skipif(not hasattr(torch.ops.ecloss_fast_C, "row_stats"),
                                     reason=f"the extension is not loaded: {cpp_cpu.availability()}")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@needs_extension
def test_the_extension_names_the_precisions_of_the_python_side():
    assert tuple(torch.ops.ecloss_fast_C.precisions()) == PRECISIONS


@needs_extension
def test_the_extension_rejects_a_name_outside_the_vocabulary_naming_the_vocabulary():
    x = torch.rand(1, 1, 4)
    templates = torch.rand(3, 4)
    with pytest.raises(ValueError, match="precision must be one of ieee, tf32, bf16, got 'fp16'"):
        torch.ops.ecloss_fast_C.row_stats(x, templates, 1e-3, "fp16")


@needs_extension
def test_the_cuda_backend_lays_out_operand_templates_as_the_extension_does():
    assert tuple(torch.ops.ecloss_fast_C.operand_layout()) == (cpp_cuda.TEMPLATE_TILE,
                                                              cpp_cuda.PIXEL_MULTIPLE)
    assert cpp_cuda._layout_problem() is None


@needs_extension
def test_an_extension_with_other_names_is_unavailable_saying_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(cpp_cpu, "PRECISIONS", ("ieee", "tf32", "bf16", "fp8"))
    problem = cpp_cpu._other_sources()
    assert "('ieee', 'tf32', 'bf16')" in problem and "build_ext --inplace" in problem


@needs_extension
def test_an_extension_without_an_op_the_python_calls_is_unavailable_saying_how_to_rebuild(
        monkeypatch):
    # A build from before the kept-scores route: the Python would call an op it lacks.
    monkeypatch.setattr(cpp_cpu, "_EXTENSION_OPS", cpp_cpu._EXTENSION_OPS + ("row_stats_v0",))
    problem = cpp_cpu._other_sources()
    assert "it has no row_stats_v0 (an older build)" in problem
    assert "build_ext --inplace" in problem


@needs_extension
def test_an_extension_with_another_layout_is_unavailable_saying_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(cpp_cuda, "TEMPLATE_TILE", 64)
    problem = cpp_cuda._layout_problem()
    assert "tiles of 32 templates" in problem and "build_ext --inplace" in problem


@pytest.mark.parametrize("dtype", DTYPES)
def test_precision_none_resolves_within_the_vocabulary(dtype):
    for setting in ("highest", "high", "medium"):
        torch.set_float32_matmul_precision(setting)  # restored by conftest
        assert resolve_precision("", dtype) in RESOLVED_PRECISIONS


def test_the_extension_gets_one_of_its_names_for_every_resolved_precision():
    for precision in RESOLVED_PRECISIONS:
        for float16_products in ("ieee", "tf32"):
            assert extension_precision(precision, float16_products) in PRECISIONS


@pytest.mark.parametrize("interpreted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_triton_route_has_an_operand_kind_with_launch_configurations(dtype, interpreted):
    for precision in RESOLVED_PRECISIONS:
        operands = triton_operands(dtype, precision, interpreted)
        assert operands in OPERANDS
        assert operand_kind(operands) in OPERAND_KINDS
        assert operands.endswith("_emulated") == (interpreted and dtype != torch.float64)


def test_an_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="precision must be one of 'ieee', 'tf32', 'bf16', "
                                         "'fp16', got 'fp8'"):
        triton_operands(torch.float32, "fp8", False)


def test_the_triton_tables_use_the_vocabulary():
    configs = pytest.importorskip("ecloss_fast.triton_kernels.configs")
    assert {kind for _, kind, _ in configs.HOPPER} == set(OPERAND_KINDS)
    assert {kind for _, kind, _ in configs.FUSED} == set(OPERAND_KINDS)
