"""The package builds as users build it: a wheel with the extension, an sdist with csrc/.

Each build runs on a copy of the files an sdist holds, in a temporary folder, so that the
working tree (its in-place extension, its build/ folder) is neither used nor touched. The
wheel's extension is the C++-only one (``ECLOSS_FAST_CUDA=0``, about a minute on two
cores; the CUDA kernels add three): the CUDA build is what ``make test`` itself runs.
"""
from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# The torch versions the suite runs with: 2.11 on the GPU machine, 2.14 in CI.
TESTED_TORCH = Requirement("torch>=2.11,<2.15")


def _version_source() -> str:
    return re.search(r'__version__ = "([^"]+)"', (ROOT / "ecloss_fast" / "_version.py")
                     .read_text()).group(1)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The project's packaging inputs, without any build output."""
    folder = tmp_path_factory.mktemp("source") / "ecloss-fast"
    folder.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, folder / name)
    outputs = shutil.ignore_patterns("*.so", "*.o", "__pycache__", "*.egg-info")
    for name in ("ecloss_fast", "csrc"):
        shutil.copytree(ROOT / name, folder / name, ignore=outputs)
    return folder


def _run(command, cwd, **environment):
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, **environment})
    assert done.returncode == 0, f"{command} exited with {done.returncode}:\n{done.stderr[-6000:]}"
    return done


def _metadata(wheel: zipfile.ZipFile):
    name = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
    return email.parser.Parser().parsestr(wheel.read(name).decode())


def _torch_requirement(requirements) -> Requirement:
    (torch_requirement,) = [requirement for requirement in map(Requirement, requirements)
                            if requirement.name == "torch"]
    return torch_requirement


def test_wheel_built_with_torch_carries_the_extension(source, tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
          "--wheel-dir", str(tmp_path), str(source)], tmp_path,
         ECLOSS_FAST_CUDA="0", ECLOSS_FAST_REQUIRE_EXTENSION="1")
    (path,) = tmp_path.glob("ecloss_fast-*.whl")
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        metadata = _metadata(wheel)
    assert [name for name in names if re.fullmatch(r"ecloss_fast/_C[^/]*\.so", name)], names
    assert "ecloss_fast/__main__.py" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
    assert metadata["Name"] == "ecloss-fast"
    assert metadata["Version"] == _version_source()
    assert metadata["License-Expression"] == "MIT"
    assert _torch_requirement(metadata.get_all("Requires-Dist")) == TESTED_TORCH


@pytest.fixture(scope="module")
def torch_hidden(tmp_path_factory) -> dict:
    """Environment variables under which ``import torch`` fails, in every subprocess too:
    what pip's isolated build and ``python -m build`` (isolated by default) see."""
    shadow = tmp_path_factory.mktemp("torch_hidden")
    (shadow / "torch").mkdir()
    (shadow / "torch" / "__init__.py").write_text(
        'raise ImportError("torch is hidden from this build")\n')
    return dict(PYTHONPATH=str(shadow))


def test_sdist_without_torch_carries_the_extension_sources(source, torch_hidden, tmp_path):
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
          str(tmp_path), str(source)], tmp_path, **torch_hidden)
    (path,) = tmp_path.glob("ecloss_fast-*.tar.gz")
    with tarfile.open(path) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    expected = {f"csrc/{path.name}" for path in (ROOT / "csrc").iterdir()
                if path.suffix in (".cu", ".cuh", ".cpp", ".h")}
    assert any(name.endswith(".cu") for name in expected)
    assert expected <= names, sorted(expected - names)
    assert {"setup.py", "pyproject.toml", "LICENSE", "README.md",
            "ecloss_fast/__init__.py"} <= names
    assert not [name for name in names if name.endswith(".so")]


def test_wheel_without_torch_says_so_and_how_to_build_later(source, torch_hidden, tmp_path):
    """A pure-Python wheel, and a notice on stderr that needs no -v."""
    done = _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                 str(tmp_path), str(source)], tmp_path, **torch_hidden)
    notice = " ".join(done.stderr.split())
    assert "torch is not importable at build time" in notice, done.stderr
    assert "pip install --no-build-isolation ." in notice, done.stderr
    assert "python setup.py build_ext --inplace" in notice, done.stderr
    (path,) = tmp_path.glob("ecloss_fast-*-py3-none-any.whl")
    with zipfile.ZipFile(path) as wheel:
        assert not [name for name in wheel.namelist() if name.endswith(".so")]


def test_the_tested_torch_range_is_the_declared_one():
    """pyproject.toml, the Makefile and the README name one range, and this torch is in it."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _torch_requirement(project["dependencies"]) == TESTED_TORCH
    bounds = {specifier.operator: specifier.version for specifier in TESTED_TORCH.specifier}
    makefile = (ROOT / "Makefile").read_text()
    assert f"\nTORCH_MIN := {bounds['>=']}\n" in makefile
    assert f"\nTORCH_BELOW := {bounds['<']}\n" in makefile
    assert f'"torch>={bounds[">="]},<{bounds["<"]}"' in (ROOT / "README.md").read_text()
    assert Version(torch.__version__).base_version in TESTED_TORCH.specifier
