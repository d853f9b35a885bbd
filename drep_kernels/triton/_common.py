"""Helpers shared by the Triton launchers: run mode, block configs, precision, scalars."""
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (as the torch backend)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def input_precision(dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision for the compute dtype ``dtype``.

    float64 is always computed in IEEE float64. float32 follows torch's own float32 matmul
    setting, so the Triton backend rounds as torch's matmuls do: IEEE by default (exact, but
    tl.dot then runs on the CUDA cores, not the tensor cores), TF32 after
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or
    ``torch.set_float32_matmul_precision("high")`` (fast; operands rounded to 10-bit mantissas,
    about 1e-3 relative, beyond the float32 test tolerance: the tests run with the default).
    float16 / bfloat16 inputs are computed in float32 too (the torch backend's semantics), not
    fed to the dot in their own dtype: rounding x_noisy = a x + s eps to 8 bits of mantissa
    would erase much of s eps at the early steps (s = 0.01 at t = 1), the very signal the
    denoiser learns from.
    """
    if dtype == torch.float64:
        return "ieee"
    try:
        p = torch.backends.cuda.matmul.fp32_precision
        if p == "none":  # inherits the global setting
            p = torch.backends.fp32_precision
        return "tf32" if p == "tf32" else "ieee"
    except (AttributeError, RuntimeError):  # torch without the fp32_precision API
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def split_scalar(value: float) -> tuple[float, float]:
    """(hi, lo) float32 parts of a Python float: Triton passes float scalars as float32, which
    would cost a float64 kernel its accuracy; hi + lo carries about 48 bits (``join_scalar``)."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    lo = float(torch.tensor(value - hi, dtype=torch.float32))
    return hi, lo


@triton.jit
def join_scalar(hi, lo, DTYPE: tl.constexpr):
    return tl.cast(hi, DTYPE) + tl.cast(lo, DTYPE)  # tl.cast: triton 3.6 has no tl.to_tensor


def check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {t.device}"
            )


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def config(configs: list[triton.Config], default: triton.Config, interpret: triton.Config):
    """The configs an autotuned launch chooses from, or the one fixed config otherwise."""
    if INTERPRET:
        return [interpret]
    return configs if AUTOTUNE else [default]
