"""What each design of the weight merge forward costs as its code is written (M1, M2 with both
biases present: W (out x K), b, W_d (K x K), b_d; s = bytes per element of the weights).

The merge's floor is the benchmark's (benchmarks/baselines.py floor_merge): one torch.addmm,
W' = c3 W - c1 W W_d, predicted with the same assumptions as every design.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .hardware import ACC, Dtype, Gpu, Kernel, cublas_gemm, stream, triton_gemm


def addmm(out: int, K: int, dt: Dtype, gpu: Gpu) -> list[Kernel]:
    """torch.addmm(W, W, W_d, beta=c3, alpha=-c1): ATen copies the 2-D ``self`` into the result
    (beta != 0 and no cuBLASLt bias epilogue for a matrix), then one GEMM with beta reads it."""
    s = dt.size
    return [
        stream("copy W into the result", 2 * out * K * s),
        cublas_gemm("GEMM W W_d, beta = c3", out, K, K, dt, gpu, hbm=3 * out * K * s + K * K * s),
    ]


# The authors' merge (benchmarks/baselines.py reference_merge_tensors): the aten ops of its
# dispatch trace (tests/test_costmodel.py checks the list), one kernel each.
EAGER_OPS = ("mul", "mul", "mm", "sub", "neg", "mul", "mm", "add")


def eager(out: int, K: int, dt: Dtype, gpu: Gpu) -> list[Kernel]:
    """W' = (W^T c3 - (c1 W_d^T) W^T)^T, b' = ((-c1) b_d) W^T + b, in the weights' dtype."""
    s = dt.size
    return [
        stream("W^T * c3", 2 * out * K * s),
        stream("c1 * W_d^T", 2 * K * K * s),
        cublas_gemm("(c1 W_d^T) @ W^T", K, out, K, dt, gpu, hbm=K * K * s + 2 * out * K * s),
        stream("subtract", 3 * out * K * s),
        stream("-c1", 2 * s),
        stream("(-c1) * b_d", 2 * K * s),
        cublas_gemm("b_d @ W^T (GEMV)", 1, out, K, dt, gpu, hbm=out * K * s + K * s + out * s),
        stream("+ b", 3 * out * s),
    ]


# triton (drep_kernels/triton/merge_weights.py): the first config of the kernel each GEMM path
# launches (checked by the tests): Dtype.path -> (BLOCK_R, BLOCK_N, BLOCK_K).
TRITON_TILE = {"tc16": (128, 128, 32), "tf32": (128, 128, 32), "fma": (128, 64, 16)}


def triton(out: int, K: int, dt: Dtype, gpu: Gpu) -> list[Kernel]:
    """One _merge_gemm_kernel launch over W' (out x K). b' = b - c1 W b_d is formed on the CUDA
    cores by the programs of the first column block, from the W tiles they load for the MMA:
    their reads of b_d (all of it, per program) are counted; their 2 out K FLOPs and the
    longer run of those programs are not modelled. Every column program loads its rows of W
    (A); every row program loads all of W_d (B); the epilogue loads W (Add, just streamed as
    A: L2) and b."""
    s = dt.size
    bm, bn, bk = TRITON_TILE[dt.path]
    row_blocks = math.ceil(out / bm)
    return [triton_gemm(
        "_merge_gemm_kernel (M1 + M2)", out, K, K, (bm, bn, bk), dt, gpu,
        operand_l2=out * K * s * math.ceil(K / bn) + row_blocks * (K * K * s) + row_blocks * K * s + out * K * s,
        unique=out * K * s + K * K * s + K * s,
        writes=out * K * s + out * s + out * s,  # W', b' stored; b read
    )]


@dataclass(frozen=True)
class CudaMerge:
    """A revision of the CUDA merge forward (csrc/cuda/merge_weights.cu)."""

    label: str
    source: str
    # True: [W_d | b_d] built by a copy (at::cat) and multiplied in one GEMM (ld K + 1), float32
    # result, then two scale_add passes. False: torch.addmm's two launches, merge_prep_kernel
    # (W copied into W', b' = b - c1 W b_d in the same pass) and one GEMM with beta = c3 on the
    # copy, result in W's dtype.
    bias_column: bool


CUDA_PRE12 = CudaMerge("cuda (before #12)", "csrc/cuda/merge_weights.cu at 211e91c", bias_column=True)
CUDA_TC = CudaMerge("cuda", "csrc/cuda/merge_weights.cu", bias_column=False)


def cuda(design: CudaMerge, out: int, K: int, dt: Dtype, gpu: Gpu) -> list[Kernel]:
    s = dt.size
    if not design.bias_column:
        return [
            # W read, W' written; b_d read by every row block (L2), b read, b' written.
            stream("merge_prep_kernel: W' = W, b' = b - c1 W b_d", 2 * out * K * s + K * s + 2 * out * s),
            cublas_gemm("GEMM W' = c3 W' - c1 W W_d (beta = c3)", out, K, K, dt, gpu, hbm=3 * out * K * s + K * K * s),
        ]
    # GEMM with a float32 product, then scale_add: W' = c3 W - c1 prod (cast to W's dtype), and
    # b' = b - c1 (W b_d) from the product's bias column (a strided read: a 32-byte sector per
    # element).
    return [
        stream("[W_d | b_d] (at::cat)", K * K * s + K * s + K * (K + 1) * s),
        cublas_gemm("W [W_d | b_d] (ld K + 1, float32 result)", out, K + 1, K, dt, gpu,
                    hbm=out * K * s + K * (K + 1) * s + out * (K + 1) * ACC, misaligned=(K + 1) * s % 16 != 0),
        stream("scale_add: W' = c3 W - c1 prod", out * K * (2 * s + ACC)),
        stream("scale_add: b' = b - c1 W b_d", out * (32 + 2 * s)),
    ]
