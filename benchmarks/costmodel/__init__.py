"""Cost model of the GPU kernels: a MODEL, not a measurement.

For each op (the loss forward + backward: the op's one call computing the loss, dL/dW_d and
dL/db_d, plus autograd's backward; the merge forward), design and shape it counts the GEMM
FLOPs, HBM bytes, Philox calls and kernel launches the code as written performs, and predicts
the time on an H100 SXM and an H200 from datasheet peaks and the efficiency assumptions of
``hardware.py``. Pure arithmetic: nothing here imports torch.

    python -m benchmarks.costmodel [--out FILE]       # the tables, the targets, the assumptions
    predict("denoise_loss", "triton", M, K, "bfloat16", "h100-sxm") -> seconds

benchmarks/report.py prints these predictions beside a GPU run's measurements.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from . import loss, merge
from .hardware import DTYPES, GPUS, Kernel, gpu_for_device, seconds

OPS = ("denoise_loss", "merge_weights")

# key -> (label, function(size args..., dtype, gpu) -> kernels). Loss: (M, K, ...); merge: (out, K, ...).
LOSS_DESIGNS = {
    "eager": ("eager (authors')", loss.eager),
    "floor": ("floor contender: 2 cuBLAS GEMMs", loss.floor_gemms),
    "triton": ("triton", loss.triton),
    "triton-pre12": ("triton (before #12)", loss.triton_pre12),
    "cuda-pre12": (loss.CUDA_PRE12.label, partial(loss.cuda, loss.CUDA_PRE12)),
    "cuda": (loss.CUDA_TC.label, partial(loss.cuda, loss.CUDA_TC)),
}
MERGE_DESIGNS = {
    "eager": ("eager (authors')", merge.eager),
    "floor": ("torch.addmm (floor)", merge.addmm),
    "triton": ("triton", merge.triton),
    "cuda-pre12": (merge.CUDA_PRE12.label, partial(merge.cuda, merge.CUDA_PRE12)),
    "cuda": (merge.CUDA_TC.label, partial(merge.cuda, merge.CUDA_TC)),
}
DESIGNS = {"denoise_loss": LOSS_DESIGNS, "merge_weights": MERGE_DESIGNS}

# The design each built backend runs (GPU reports compare its prediction with the measurement).
BACKENDS = {"cuda": "cuda"}


@dataclass(frozen=True)
class Totals:
    """One call of a design at one shape: sums over its kernels, and the predicted time."""

    label: str
    kernels: tuple
    flops: float
    hbm: float
    philox: float
    launches: int
    seconds: float


def _check(op: str, design: str, dtype: str, gpu: str, sizes: dict) -> None:
    if op not in DESIGNS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if design not in DESIGNS[op]:
        raise ValueError(f"no design {design!r} for {op}; known: {sorted(DESIGNS[op])} (and backends {sorted(BACKENDS)})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int for {op}, got {value!r}")


def kernels(op: str, design: str, *, K: int, dtype: str, gpu: str, M: int = 0, out: int = 0) -> list[Kernel]:
    """The kernels one call of ``design`` launches (loss: M x K input; merge: out x K weight)."""
    design = BACKENDS.get(design, design)
    sizes = {"M": M, "K": K} if op == "denoise_loss" else {"out": out, "K": K}
    _check(op, design, dtype, gpu, sizes)
    fn = DESIGNS[op][design][1]
    rows = M if op == "denoise_loss" else out
    return fn(rows, K, DTYPES[dtype], GPUS[gpu])


def totals(op: str, design: str, *, K: int, dtype: str, gpu: str, M: int = 0, out: int = 0) -> Totals:
    ks = kernels(op, design, K=K, dtype=dtype, gpu=gpu, M=M, out=out)
    g = GPUS[gpu]
    return Totals(
        label=DESIGNS[op][BACKENDS.get(design, design)][0],
        kernels=tuple(ks),
        flops=sum(k.flops for k in ks),
        hbm=sum(k.hbm for k in ks),
        philox=sum(k.philox for k in ks),
        launches=sum(k.launches for k in ks),
        seconds=sum(seconds(k, g) for k in ks),
    )


def predict(op: str, backend: str, M: int, K: int, dtype: str, gpu: str, out: int = 0) -> float:
    """Predicted seconds of one call: ``backend`` a built backend ("triton", "cuda"), a design
    key of ``DESIGNS[op]`` ("eager", "floor", "triton-pre12", "cuda-pre12", "cuda"), for
    the loss (M x K; ``out`` unused) or the merge (out x K; ``M`` unused); dtype "bfloat16",
    "float16", "float32" (IEEE) or "tf32"; gpu "h100-sxm" or "h200"."""
    return totals(op, backend, K=K, dtype=dtype, gpu=gpu, M=M, out=out).seconds


def floor_seconds(op: str, K: int, dtype: str, gpu: str, M: int = 0, out: int = 0) -> float:
    """What ``x floor`` divides by: the loss's two M x K x K GEMMs at the dtype's datasheet peak
    (4 M K^2 FLOPs, no efficiency); the merge's torch.addmm as predicted."""
    if op == "denoise_loss":
        _check(op, "floor", dtype, gpu, {"M": M, "K": K})
        return loss.floor_seconds(M, K, DTYPES[dtype], GPUS[gpu])
    return predict(op, "floor", M, K, dtype, gpu, out=out)


def backends(op: str) -> tuple[str, ...]:
    """Every name ``predict`` accepts for ``op``."""
    return tuple(DESIGNS[op]) + tuple(BACKENDS)


__all__ = ["BACKENDS", "DESIGNS", "DTYPES", "GPUS", "OPS", "Totals", "backends", "floor_seconds", "gpu_for_device",
           "kernels", "predict", "totals"]
