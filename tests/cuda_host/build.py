"""Builds the CUDA kernels (csrc/cuda/*.cu) as host C++ and loads them for CPU tensors.

``load_host_ops()`` compiles ``denoise_loss.cpp`` and ``merge_weights.cpp`` of this folder (each
includes ``cuda_host.h``, then one .cu file as it is) with torch.utils.cpp_extension and returns
``torch.ops.drep_cuda_host``: the CUDA kernels of drep's ops, registered for CPU tensors under
that test namespace, with the schemas of the installed drep ops (csrc/ops.cpp) copied at run
time, so the two cannot drift apart. drep's own CPU kernels stay registered as they are.
``gemm_log.cpp`` adds ``_gemm_calls()``: the cuBLAS calls those kernels made (cublas_host.h).
"""
from __future__ import annotations

import functools
import hashlib
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
# The host build's loss settings, passed to csrc/cuda/denoise_loss.cu as its DREP_LOSS_CHUNK_BYTES
# and DREP_LOSS_TARGET_STRIPES (see denoise_loss.cpp for why these values).
LOSS_CHUNK_BYTES = 16384
LOSS_TARGET_STRIPES = 5
SOURCES = (HERE / "denoise_loss.cpp", HERE / "merge_weights.cpp", HERE / "gemm_log.cpp")
OPS = ("denoise_loss_fwd", "_denoise_noise", "merge_weights_fwd", "merge_weights_bwd")
NAMESPACE = "drep_cuda_host"


def build_directory() -> Path:
    """One build folder per checkout and torch version, kept between runs: ninja recompiles only
    what a changed file reaches (its depfiles list every header a .cpp includes, the .cu files,
    csrc/philox.h and csrc/cuda/common.cuh among them)."""
    key = hashlib.sha256(f"{HERE}|{torch.__version__}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"drep_cuda_host-{key}"
    path.mkdir(exist_ok=True)
    return path


@functools.cache
def load_host_ops():
    """torch.ops.drep_cuda_host, built and loaded once per process (about 1 minute on 2 cores
    the first time, seconds after that)."""
    import drep_kernels._C  # noqa: F401  (registers drep's schemas)

    library = torch.library.Library(NAMESPACE, "DEF")
    for op in OPS:
        schema = str(getattr(torch.ops.drep, op).default._schema)
        library.define(schema.removeprefix("drep::"))
    cpp_extension.load(
        name=NAMESPACE,
        sources=[str(s) for s in SOURCES],
        # -O2 costs no more build time than -O0 here (parsing ATen dominates) and runs the kernels
        # several times faster; the unknown pragmas are nvcc's #pragma unroll. C++20 for
        # std::barrier (cuda_host.h): torch 2.11 builds extensions as C++17 (this flag comes last).
        extra_cflags=["-O2", "-Wno-unknown-pragmas", "-std=c++20", f"-DDREP_LOSS_CHUNK_BYTES={LOSS_CHUNK_BYTES}",
                      f"-DDREP_LOSS_TARGET_STRIPES={LOSS_TARGET_STRIPES}"],
        build_directory=str(build_directory()),
        is_python_module=False,
    )
    _KEEP_ALIVE.append(library)  # the definitions live as long as this Library object
    return getattr(torch.ops, NAMESPACE)


_KEEP_ALIVE: list[torch.library.Library] = []


def loss_chunk_rows(m: int, k: int, dtype: torch.dtype = torch.float32) -> int:
    """Rows per chunk of the host build's loss for an m x k input (csrc/cuda/denoise_loss.cu
    chunk_rows): the budget over x_noisy's (input dtype) and p's (accumulation dtype) bytes per
    element, a multiple of 128 (at least 128), at most m."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    per_element = dtype.itemsize + acc.itemsize
    return min(max(LOSS_CHUNK_BYTES // per_element // k // 128 * 128, 128), m)
