"""Builds drep_kernels._C: the C++ CPU kernels always, the CUDA kernels when CUDA can be built.

CUDA is decided from the toolchain, never from a visible GPU (a GPU-less build machine with
nvcc must still build the CUDA kernels):
  FORCE_CUDA=1   build CUDA or fail loudly;   FORCE_CUDA=0   never build CUDA;
  unset          build CUDA iff torch is a CUDA build and a toolkit is found (CUDA_HOME, nvcc).
TORCH_CUDA_ARCH_LIST picks the architectures (default here without a GPU: 8.0;9.0+PTX);
MAX_JOBS bounds ninja's parallelism (both read by torch.utils.cpp_extension).
Install with ``pip install --no-build-isolation .`` so the build sees the torch you run.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA", "").strip()
    why_not = None
    if torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        why_not = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if force == "0":
        return False
    if force == "1" and why_not:
        raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
    if why_not:
        print(f"drep_kernels: building without CUDA kernels: {why_not}")
    return why_not is None


def _pip_cuda_include_dirs() -> list[str]:
    """Headers of CUDA's math libraries shipped in the nvidia-* wheels (e.g. nvidia/cu13/include).

    torch's ATen/cuda/CUDAContext.h includes cublas_v2.h and cusparse.h; a toolkit without
    those libraries (or a toolkit-less machine whose CUDA came from pip) finds them here.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if any(os.path.exists(os.path.join(inc, h)) for h in ("cublas_v2.h", "cusparse.h", "cuda_runtime.h")):
                dirs.append(inc)
    return dirs


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline: without OpenMP in this library it silently runs on one
        # thread. torch's own libgomp (same soname) is the runtime that gets loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if not _want_cuda():
        return CppExtension(
            "drep_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=False,
        )
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    return CUDAExtension(
        "drep_kernels._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=[os.path.join(ROOT, "csrc")] + _pip_cuda_include_dirs(),
        define_macros=[("DREP_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        extra_link_args=link_flags,
    )


setup(
    packages=find_packages(include=["drep_kernels", "drep_kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
