"""Builds drep_kernels._C: the C++ CPU kernels always, the CUDA kernels when CUDA can be built.

CUDA is decided from the toolchain, never from a visible GPU (a GPU-less build machine with
nvcc must still build the CUDA kernels), by drep_kernels/_build.py (the rule is stated there):
  FORCE_CUDA=1   build CUDA or fail loudly;   FORCE_CUDA=0   never build CUDA;
  unset          build CUDA iff this torch and toolkit can build it, else the CPU kernels only
                 with one warning that names the versions found and the fix.
The decision is recorded in drep_kernels/_build_info.py (generated) for `python -m drep_kernels.env`.
TORCH_CUDA_ARCH_LIST picks the architectures (default here without a GPU: 8.0;9.0+PTX);
MAX_JOBS bounds ninja's parallelism (both read by torch.utils.cpp_extension).
Install with ``pip install --no-build-isolation .`` so the build sees the torch you run.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
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


def _load_build_module():
    """drep_kernels/_build.py by path: importing the package would load the _C being built."""
    spec = importlib.util.spec_from_file_location("_drep_build", os.path.join(ROOT, "drep_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up while building the classes
    spec.loader.exec_module(module)
    return module


_build = _load_build_module()


def _nvcc_release():
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return _build.parse_nvcc_release(out)


def _pip_cuda_headers():
    """(include dirs, CUDA version) of the headers in pip's nvidia-* wheels (e.g. nvidia/cu13/include).

    torch's ATen/cuda/CUDAContext.h includes the math libraries' headers (cublas_v2.h,
    cusparse.h, ...); a toolkit without those libraries finds them here. Their CUDA version is
    the CUDART_VERSION of the cuda_runtime_api.h among them: the nvidia-* wheels of one torch
    come as one set, and that macro is what CUDA's headers check against the compiler.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return (), None
    dirs, version = [], None
    for base in spec.submodule_search_locations:
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if any(os.path.exists(os.path.join(inc, h)) for h in _build.MATH_HEADERS + ("cuda_runtime.h",)):
                dirs.append(inc)
            runtime_api = os.path.join(inc, "cuda_runtime_api.h")
            if version is None and os.path.exists(runtime_api):
                with open(runtime_api, encoding="utf-8", errors="replace") as f:
                    version = _build.parse_cudart_header(f.read())
    return tuple(dirs), version


def _found():
    pip_dirs, pip_cuda = _pip_cuda_headers()
    return _build.Found(
        torch_version=torch.__version__,
        torch_cuda=_build.parse_version(torch.version.cuda),
        cuda_home=CUDA_HOME,
        nvcc=_nvcc_release() if CUDA_HOME else None,
        toolkit_has_math_headers=CUDA_HOME is not None
        and all(os.path.exists(os.path.join(CUDA_HOME, "include", h)) for h in _build.MATH_HEADERS),
        pip_include_dirs=pip_dirs,
        pip_cuda=pip_cuda,
    )


FOUND = _found()
DECISION = _build.decide(os.environ.get("FORCE_CUDA"), FOUND)
if DECISION.build_cuda and "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """build_ext that warns about a CUDA fallback and records the decision for
    `python -m drep_kernels.env` in drep_kernels/_build_info.py (generated, gitignored)."""

    def run(self):
        # Here, not where the decision is made: pip runs setup.py once per build hook, and the
        # extension is compiled once.
        if DECISION.warning:
            print(f"warning: {DECISION.warning}", file=sys.stderr, flush=True)
        super().run()
        # Beside the built _C: the build tree for a wheel, the source tree for an editable
        # install. Never the source tree otherwise: that file would describe another environment's
        # build to the editable install of this checkout.
        package_dir = os.path.dirname(self.get_ext_fullpath("drep_kernels._C"))
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "torch's default: the visible GPUs")
        with open(os.path.join(package_dir, "_build_info.py"), "w", encoding="utf-8") as f:
            f.write(_build.build_info_source(DECISION, FOUND, arch))


def _cublas_library() -> str:
    """The cuBLAS library the CUDA kernels link (csrc/cuda/common.cuh calls cublasGemmEx), from
    where the build's cuBLAS headers come: beside pip's nvidia-* include dirs when the decision
    uses them, else the toolkit. Linked by path, so the extension records the soname
    (libcublas.so.<major>) that torch's own CUDA library loads: importing the extension then
    resolves every cuBLAS symbol, or fails at once naming it."""
    if DECISION.include_dirs:
        dirs = [os.path.join(os.path.dirname(inc), "lib") for inc in DECISION.include_dirs]
    else:
        dirs = [os.path.join(CUDA_HOME, sub) for sub in ("lib64", "lib")]
    for directory in dirs:
        # "libcublas.so*" is cuBLAS itself, never cuBLASLt; the shortest name is the link name
        # (libcublas.so) when there is one, else the soname.
        found = sorted(glob.glob(os.path.join(directory, "libcublas.so*")), key=len)
        if found:
            return found[0]
    raise RuntimeError(
        f"drep_kernels: the CUDA kernels call cuBLAS, but no libcublas.so* was found in {dirs} "
        "(where this build's cuBLAS headers are). Install the CUDA toolkit's cuBLAS, or FORCE_CUDA=0."
    )


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
    if not DECISION.build_cuda:
        return CppExtension(
            "drep_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=False,
        )
    return CUDAExtension(
        "drep_kernels._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=[os.path.join(ROOT, "csrc"), *DECISION.include_dirs],
        define_macros=[("DREP_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags + [_cublas_library()],
    )


setup(
    packages=find_packages(include=["drep_kernels", "drep_kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt},
)
