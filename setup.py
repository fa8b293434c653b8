"""Builds fastalign and its native extension fastalign._C.

The C++17 + OpenMP CPU kernels are always built; the CUDA kernels too when torch has CUDA and
nvcc is found (FASTALIGN_BUILD_CUDA=0|1 overrides the guess). FASTALIGN_NO_EXTENSION=1 installs
the pure-Python package only (the ``torch`` backend). Install without build isolation so the
extension compiles against the torch already installed:

    pip install --no-build-isolation -e .
"""

import os
import shutil
import sys
from glob import glob

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"error: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def _find_compiler():
    cxx = os.environ.get("CXX", "c++")
    for candidate in (cxx, "g++", "clang++"):
        if shutil.which(candidate.split()[0]):
            return candidate
    return None


def _extensions():
    if _flag("FASTALIGN_NO_EXTENSION"):
        return [], {}
    if _find_compiler() is None:
        sys.exit(
            "error: fastalign needs a C++17 compiler to build its native extension, and none was found "
            "(looked for $CXX, c++, g++, clang++). Install one (e.g. apt-get install g++), or set "
            "FASTALIGN_NO_EXTENSION=1 to install the pure-PyTorch backend only."
        )
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "error: building fastalign's extension needs torch installed first "
            "(pip install torch==2.13.0), and pip must not isolate the build: "
            "pip install --no-build-isolation -e ."
        )
    build_cuda = _flag("FASTALIGN_BUILD_CUDA")
    if build_cuda is None:
        build_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if build_cuda and (torch.version.cuda is None or cpp_extension.CUDA_HOME is None):
        sys.exit("error: FASTALIGN_BUILD_CUDA=1 but torch has no CUDA or nvcc/CUDA_HOME was not found")

    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    cxx_flags = ["-O3", "-std=c++17", *openmp]
    # csrc/ops/<op>.cpp: an op's loops and its own registration (TORCH_LIBRARY_FRAGMENT), one file per op.
    sources = ["csrc/bindings.cpp", *sorted(glob("csrc/cpu/*.cpp")), *sorted(glob("csrc/ops/*.cpp"))]
    define_macros = []
    if build_cuda:
        sources += ["csrc/cuda_bindings.cpp", *sorted(glob("csrc/cuda/*.cu"))]
        define_macros.append(("FASTALIGN_WITH_CUDA", None))
        nvcc_flags = ["-O3", "-std=c++17", "-gencode=arch=compute_80,code=sm_80",
                      "-gencode=arch=compute_90,code=sm_90"]
        ext = cpp_extension.CUDAExtension(
            "fastalign._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=openmp,
            py_limited_api=False)
    else:
        ext = cpp_extension.CppExtension(
            "fastalign._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    package_dir={"fastalign": "fastalign", "fastalign.triton_kernels": "triton_kernels"},
    # Every fastalign.* package is found automatically; triton_kernels/ installs as a subpackage.
    packages=[*find_packages(include=["fastalign", "fastalign.*"]), "fastalign.triton_kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
