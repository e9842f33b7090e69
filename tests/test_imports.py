"""The package's imports run one way, API -> op -> dispatch -> backends -> kernels, with leaf
modules that everything may share; and every module imports alone, in a fresh interpreter.

The direction is read from the source (every ``import`` of an ``ecloss_fast`` module, also
inside functions), so a module that imports upwards fails here even where the import would
happen to work at run time.
"""
from __future__ import annotations

import ast
import importlib.util
import pathlib
import subprocess
import sys
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ecloss_fast"

# Modules every layer may import; they import only each other.
SHARED = {"ecloss_fast._build_info", "ecloss_fast._dtypes", "ecloss_fast._math",
          "ecloss_fast._precision", "ecloss_fast._templates", "ecloss_fast._validation",
          "ecloss_fast._version"}
# Top first: a module imports modules of its own layer or below, and SHARED ones.
LAYERS = ("api", "op", "dispatch", "backends", "kernels", "shared")


def _module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _module_names()


def layer(module: str) -> str:
    """The layer of an ``ecloss_fast`` module; any module not named below is API."""
    if module in SHARED:
        return "shared"
    if module == "ecloss_fast._C" or module.startswith("ecloss_fast.triton_kernels"):
        return "kernels"
    if module.startswith("ecloss_fast.backends"):
        return "backends"
    return {"ecloss_fast._ops": "op", "ecloss_fast._dispatch": "dispatch"}.get(module, "api")


def _is_module(name: str) -> bool:
    relative = pathlib.Path(*name.split(".")[1:])
    return ((PACKAGE / relative).with_suffix(".py").exists()
            or (PACKAGE / relative / "__init__.py").exists() or name == "ecloss_fast._C")


def imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every ``ecloss_fast`` module that ``source``, the code of ``module``, imports anywhere."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            # `from ecloss_fast import _ops` imports the module _ops, not a name of base.
            modules = {f"{base}.{alias.name}" for alias in node.names
                       if _is_module(f"{base}.{alias.name}")}
            found.update(modules if len(modules) == len(node.names) else modules | {base})
    return {name for name in found
            if name.split(".")[0] == "ecloss_fast" and name != module}


def imports_of(module: str) -> set[str]:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    is_package = path.is_dir()
    path = path / "__init__.py" if is_package else path.with_suffix(".py")
    return imports_in(path.read_text(), module, is_package)


@pytest.mark.parametrize("module", MODULES)
def test_imports_run_one_way(module):
    rank = LAYERS.index(layer(module))
    upward = sorted(name for name in imports_of(module) if LAYERS.index(layer(name)) < rank)
    assert not upward, (f"{module} ({layer(module)}) imports a layer above it: "
                        + ", ".join(f"{name} ({layer(name)})" for name in upward))


@pytest.mark.parametrize("module", [name for name in MODULES if layer(name) == "backends"])
def test_no_backend_imports_the_op_layer(module):
    assert "ecloss_fast._ops" not in imports_of(module)


def test_the_check_sees_imports_inside_functions_and_relative_ones():
    source = textwrap.dedent("""
        import torch
        from ecloss_fast import _C, _templates
        from ._tiles import scores

        def late():
            from ecloss_fast import _ops
    """)
    found = imports_in(source, "ecloss_fast.triton_kernels.row_stats")
    assert found == {"ecloss_fast._C", "ecloss_fast._templates", "ecloss_fast._ops",
                     "ecloss_fast.triton_kernels._tiles"}


# One interpreter imports torch once, then forks a child per module that imports that module
# and nothing else of the package before it: a fresh interpreter for each, without paying for
# torch's import each time.
_IMPORT_EACH = textwrap.dedent("""
    import importlib, os, sys, traceback
    import torch  # noqa: F401

    failed = []
    for name in sys.argv[1:]:
        child = os.fork()
        if child == 0:
            status = 0
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                status = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        if os.waitpid(child, 0)[1]:
            failed.append(name)
    print("failed:", " ".join(failed))
""")


def test_every_module_imports_alone_in_a_fresh_interpreter():
    triton = importlib.util.find_spec("triton") is not None
    modules = [name for name in MODULES
               if triton or not name.startswith("ecloss_fast.triton_kernels.")]
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], capture_output=True,
                         text=True, timeout=600, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "failed:", out.stdout + out.stderr
