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
import shutil
import sys

from setuptools import find_packages, setup


def _set_cuda_home() -> None:
    """Point CUDA_HOME at a real toolkit before torch guesses one.

    torch derives CUDA_HOME from the directory above `nvcc` on PATH; when that `nvcc` is a
    wrapper (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc) the guess is
    /usr/local, which has no libcudart, and linking fails. Take the first candidate that has
    both bin/nvcc and a libcudart.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += sorted(glob.glob("/usr/local/cuda*"))
    for home in candidates:
        has_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
        if has_nvcc and glob.glob(os.path.join(home, "lib*", "libcudart.so*")):
            os.environ["CUDA_HOME"] = home
            return


_set_cuda_home()

import torch  # noqa: E402  (after CUDA_HOME is settled: cpp_extension reads it at import)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

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
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++20 for
    # torch >= 2.14, C++17 before).
    cxx_flags = ["-O3"]
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
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    )


setup(
    packages=find_packages(include=["drep_kernels", "drep_kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
