"""Helpers shared by the Triton launchers: run mode, block configs, dtypes, scalars."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, at import: TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels,
# so a later change of the variable cannot change how they run anyway.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Autotuning benchmarks every config on the first call of each shape key, and two processes may
# pick different configs (timings are noisy), which changes rounding. DREP_TRITON_AUTOTUNE=0 pins
# the default config for bitwise reproducibility across processes. Under the interpreter one small
# fixed config is always used: benchmarking there would take minutes and measure nothing.
AUTOTUNE = not INTERPRET and os.environ.get("DREP_TRITON_AUTOTUNE", "1") != "0"


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def split_scalar(value: float) -> tuple[float, float]:
    """(hi, lo) float32 parts of a Python float: Triton passes float scalars as float32, which
    would cost a float64 kernel its accuracy; hi + lo carries about 48 bits (``join_scalar``)."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    lo = float(torch.tensor(value - hi, dtype=torch.float32))
    return hi, lo


# For kernels: whether they run in the interpreter (a global constexpr, read at compile time).
_INTERPRETED = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """acc + a @ b: tl.dot, with one exception. Triton's interpreter (3.6 to 3.9) multiplies
    bfloat16 operands as their raw 16-bit integers; there they are widened to float32 first,
    which gives the tensor cores' result (bf16 products are exact in float32), summed in
    another order. Compiled kernels are unaffected: the branch is resolved at compile time."""
    if _INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=OUT_DTYPE)


@triton.jit
def rounded(x, DTYPE: tl.constexpr):
    """x (float32 or float64) rounded to nearest even in DTYPE, as a GPU's conversion does.
    Triton's interpreter (3.6 to 3.9) truncates float32 to bfloat16 instead: there the rounding
    is done on the bits (exact for every finite value, inf and NaN)."""
    if _INTERPRETED and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the low bits are 0
    return x.to(DTYPE)


@triton.jit
def grouped_tile(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """(row block, column block) of program ``pid`` over a num_rows x num_cols grid of tiles,
    in grouped order: GROUP row blocks take each column block in turn, so that the column
    block's operand stays in L2 while they read it."""
    num_pid_in_group = GROUP * num_cols
    first = (pid // num_pid_in_group) * GROUP
    group_size = min(num_rows - first, GROUP)
    return first + (pid % num_pid_in_group) % group_size, (pid % num_pid_in_group) // group_size


@triton.jit
def join_scalar(hi, lo, DTYPE: tl.constexpr):
    return tl.cast(hi, DTYPE) + tl.cast(lo, DTYPE)  # tl.cast: triton 3.6 has no tl.to_tensor


def check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {t.device}"
            )


# The SM count grids are sized for where the tensors are not on a GPU (the interpreter, the AOT
# builds of benchmarks/triton_aot.py): an H100's, so that they take the paths an H100 takes.
HOST_SMS = 132


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return HOST_SMS


def config(configs: list[triton.Config], default: triton.Config, interpret: triton.Config):
    """The configs an autotuned launch chooses from, or the one fixed config otherwise."""
    if INTERPRET:
        return [interpret]
    return configs if AUTOTUNE else [default]
