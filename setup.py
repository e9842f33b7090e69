"""The C++/CUDA extension of ecloss-fast; the package's metadata is in pyproject.toml.

    pip install "torch>=2.11,<2.15" "setuptools>=77" ninja
    pip install --no-build-isolation -e ".[test]"
    python setup.py build_ext --inplace

The extension ``ecloss_fast._C`` holds the C++ kernels of csrc/ (backend "cpu") and, when
torch is a CUDA build and a CUDA toolkit is found, the CUDA kernels too (backend "cuda"),
built for sm_80 and sm_90 unless ``TORCH_CUDA_ARCH_LIST`` says otherwise. No GPU is needed
to build them. The CUDA kernels are one translation unit per precision (``CUDA_SOURCES``),
so that ninja builds them in parallel; the extension records the torch it was built
against (``ecloss_fast/_build_info.py``), and an in-place build for another torch is
rebuilt. ``ECLOSS_FAST_CUDA=0`` forces the C++-only build; ``MAX_JOBS`` caps ninja's
parallel compilations. It builds against the torch of the build environment, so torch must
be importable there: ``--no-build-isolation``. When nothing can be built (no torch at build
time, as in pip's isolated build, or no compiler) the package installs as pure Python, the
build prints a notice saying so and how to build the extension later, and those two backends
report why they are unavailable.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import sys
import textwrap

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The CUDA kernels, one translation unit per precision (csrc/cuda_sweep.cuh holds their code)
# plus the host side: ninja builds them in parallel, MAX_JOBS at a time.
CUDA_SOURCES = ("cuda_ops.cpp", "cuda_kernels_ieee.cu", "cuda_kernels_tf32.cu",
                "cuda_kernels_bf16.cu")
# setup.py writes ecloss_build_info.h here: the torch version the extension is built against.
GENERATED = os.path.join(ROOT, "build", "generated")


def _build_info_module():
    """ecloss_fast/_build_info.py, loaded by path (importing ecloss_fast would import torch's
    ops and this build's own extension)."""
    path = os.path.join(ROOT, "ecloss_fast", "_build_info.py")
    spec = importlib.util.spec_from_file_location("_ecloss_fast_build_info", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_build_info(torch_version: str) -> None:
    """ecloss_build_info.h, which csrc/ops.cpp compiles into the extension; rewritten only when
    its content changes, so an unchanged torch rebuilds nothing."""
    text = f"#pragma once\n#define ECLOSS_FAST_TORCH_VERSION {json.dumps(torch_version)}\n"
    path = os.path.join(GENERATED, "ecloss_build_info.h")
    if os.path.exists(path):
        with open(path) as handle:
            if handle.read() == text:
                return
    os.makedirs(GENERATED, exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def _resolve_nvcc(path: str) -> str:
    """The real nvcc behind `path`: follows symlinks and `exec /path/to/nvcc` shell shims."""
    path = os.path.realpath(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return path
    if head.startswith(b"#!"):
        match = re.search(rb"^\s*exec\s+[\"']?([^\s\"']+/nvcc)\b", head, re.MULTILINE)
        if match:
            return os.path.realpath(match.group(1).decode())
    return path


def _find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH if set, else the toolkit of the nvcc on PATH (through any shim).

    torch's own guess takes the parent of `which nvcc`, which is wrong for a shim in
    /usr/local/bin; so this runs before torch.utils.cpp_extension is imported.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = os.path.dirname(os.path.dirname(_resolve_nvcc(nvcc)))
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def _pip_cuda_includes() -> list[str]:
    """Header folders of the pip CUDA wheels (nvidia/cu13/include has cusparse.h, which
    torch's CUDA headers include but a bare toolkit may lack)."""
    try:
        import nvidia
    except ImportError:
        return []
    folders = []
    for base in getattr(nvidia, "__path__", []):
        folders += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        folders += sorted(glob.glob(os.path.join(base, "*", "include")))
    return list(dict.fromkeys(folder for folder in folders if os.path.isdir(folder)))


# setup.py runs for metadata too (egg_info, dist_info); only a build says what it builds.
_BUILDING = bool({"build", "build_ext", "bdist_wheel", "editable_wheel", "install",
                  "develop"} & set(sys.argv[1:]))
_BUILD_LATER = ("To build it later: install torch and a C++ compiler, then run "
                "`pip install --no-build-isolation .` in the source folder (or "
                "`python setup.py build_ext --inplace` in a clone).")


def _say(text: str) -> None:
    if _BUILDING:
        print(text, file=sys.stderr, flush=True)


def _notice(reason: str) -> None:
    """A boxed notice on stderr, and on the terminal as well: pip shows the output of a
    build that succeeds only under ``-v``, and an install without the extension succeeds."""
    rule = "=" * 78
    lines = textwrap.wrap(f"{reason} {_BUILD_LATER}", 78, break_on_hyphens=False)
    text = "\n".join(["", rule, *lines, rule, ""])
    _say(text)
    if _BUILDING and not sys.stderr.isatty():
        try:
            with open("/dev/tty", "w") as terminal:
                terminal.write(text + "\n")
        except OSError:  # no controlling terminal (CI, containers): stderr has it
            pass


def _extensions():
    """(ext_modules, cmdclass): the CUDA extension, the C++ one, or none."""
    cuda_home = _find_cuda_home()
    if cuda_home is not None:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        _notice(f"torch is not importable at build time ({error}), so ecloss_fast is "
                "installed without its C++/CUDA extension: the backends 'cpu' and 'cuda' "
                "are unavailable (the others work).")
        return [], {}

    want_cuda = os.environ.get("ECLOSS_FAST_CUDA", "1") != "0"
    use_cuda = (want_cuda and torch.version.cuda is not None
                and cpp_extension.CUDA_HOME is not None)
    # -fno-trapping-math lets GCC if-convert the clamps in host_exp, so its loops vectorise.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math", "-Wno-psabi"]
    sources = [os.path.join("csrc", name) for name in ("ops.cpp", "cpu_kernels.cpp")]
    headers = sorted(glob.glob(os.path.join("csrc", "*.h"))
                     + glob.glob(os.path.join("csrc", "*.cuh")))
    include_dirs = [os.path.join(ROOT, "csrc"), GENERATED]
    if _BUILDING:
        _write_build_info(torch.__version__)
    if use_cuda:
        architectures = os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", ", ")
        what = (f"the C++ CPU kernels and the CUDA kernels for compute capability "
                f"{architectures} (CUDA {torch.version.cuda}, toolkit {cpp_extension.CUDA_HOME})")
        sources += [os.path.join("csrc", name) for name in CUDA_SOURCES]
        extension = cpp_extension.CUDAExtension(
            "ecloss_fast._C", sources, include_dirs=include_dirs + _pip_cuda_includes(),
            depends=headers,
            # --threads: both architectures at once, the long pole of a 2-core build.
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "-lineinfo", "--threads", "2"]},
            extra_link_args=["-fopenmp"])
    else:
        what = "the C++ CPU kernels only (" + (
            "ECLOSS_FAST_CUDA=0" if not want_cuda else
            "torch is a CPU build" if torch.version.cuda is None else
            "no CUDA toolkit found: set CUDA_HOME or put nvcc on PATH") + ")"
        extension = cpp_extension.CppExtension(
            "ecloss_fast._C", sources, include_dirs=include_dirs, depends=headers,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's builder (ninja when present); a failed build leaves a pure-Python install
        unless ECLOSS_FAST_REQUIRE_EXTENSION=1, which CI may set to make it an error.

        An in-place extension newer than its sources and csrc/*.h, built against this torch
        (the version it records, ecloss_fast/_build_info.py), is kept (pass --force to
        rebuild), so `build_ext --inplace` after `pip install -e .` (which builds in place
        from another temp folder) takes seconds. Otherwise ninja rebuilds what changed.
        """

        def finalize_options(self):
            self.force_asked = self.force  # torch sets force whenever ninja builds
            super().finalize_options()

        def _up_to_date_in_place(self):
            recorded_torch_version = _build_info_module().recorded_torch_version
            for extension in self.extensions:
                target = self.get_ext_fullpath(extension.name)
                inputs = [*extension.sources, *extension.depends, __file__]
                if not os.path.exists(target) or os.path.getmtime(target) < max(
                        os.path.getmtime(path) for path in inputs):
                    return False
                if recorded_torch_version(target) != torch.__version__:
                    return False
            return True

        def run(self):
            if self.inplace and not self.force_asked and self._up_to_date_in_place():
                print("ecloss_fast._C is up to date in place (pass --force to rebuild)")
                return
            _say(f"ecloss_fast._C: building {what} against torch {torch.__version__}")
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 -- any compiler failure means "no extension"
                if os.environ.get("ECLOSS_FAST_REQUIRE_EXTENSION") == "1":
                    raise
                _notice(f"building ecloss_fast._C failed ({error}), so ecloss_fast is "
                        "installed without it: the backends 'cpu' and 'cuda' are unavailable "
                        "(the others work). The compiler's output is above.")

    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
