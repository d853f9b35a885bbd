"""One benchmark case from start to finish: skip rules, backend choice, precision, speed and
memory runs, and the extra_info every saved result carries (read by benchmarks/report.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import sys

import pytest
import torch

from drep_kernels.backends import select

from .cases import make_case
from .shapes import Spec, floor_contender, too_slow
from .timing import POLICIES, measure_memory, measure_speed


@contextlib.contextmanager
def matmul_precision(dtype: str):
    """'tf32' lets fp32 matmuls use TF32; 'float32' forbids it (the default of torch)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def cpu_vector_extensions() -> list[str]:
    """The CPU's vector extensions (AVX, AVX2, FMA, AVX-512 parts, AMX) from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return sorted({f for f in flags if f.startswith(("avx", "amx")) or f == "fma"})


def blas_path() -> str:
    """Which GEMM kernels torch's BLAS runs: they set the floor."""
    if "mkl" not in torch.__config__.show().lower():
        return "torch's BLAS (not MKL)"
    if "mkl_intel_path" in os.environ.get("LD_PRELOAD", ""):
        return "MKL, forced onto its AVX-512 (Intel) kernels by benchmarks/mkl_intel_path.sh"
    if os.environ.get("MKL_ENABLE_INSTRUCTIONS"):
        return f"MKL, MKL_ENABLE_INSTRUCTIONS={os.environ['MKL_ENABLE_INSTRUCTIONS']}"
    return "MKL, its own choice of kernels (AVX2 ones on AMD CPUs, AVX-512 ones on Intel CPUs that have it)"


def environment(device: str) -> dict:
    """What the saved JSON records about this run (pytest-benchmark's machine_info["drep"])."""
    from drep_kernels.backends import NAMES, OPS, implements

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "backends": {op: [b for b in NAMES if implements(b, op, device)] for op in OPS},
        "command": "pytest " + " ".join(sys.argv[1:]),
    }
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        env["capability"] = f"sm_{major}{minor}"
    else:
        from drep_kernels import _C

        env["cpu_vector_extensions"] = cpu_vector_extensions()
        env["cpu_vector_path"] = _C.cpu_vector_path()
        env["blas"] = blas_path()
    return env


def run(benchmark, spec: Spec, monkeypatch, paired: bool = True) -> None:
    """Benchmark one case. ``paired`` (CPU only): time the group's floor right before each
    round too, for ratios that survive a shared machine's changing load."""
    # drep[<b>] forces backend b for every op through DREP_BACKEND; the other contenders
    # (and drep[default], drep[eval]) run with the automatic choice.
    backend = spec.backend
    if backend in (None, "default", "eval"):
        monkeypatch.delenv("DREP_BACKEND", raising=False)
    else:
        monkeypatch.setenv("DREP_BACKEND", backend)
    dev = torch.device(spec.device)
    reason = too_slow(spec, select("denoise_loss", dev) if spec.runs_loss and spec.role == "drep" else None)
    if reason:
        pytest.skip(reason)
    benchmark.group = spec.group
    with matmul_precision(spec.dtype):
        case = make_case(spec)
        floor = None
        if paired and spec.device == "cpu" and spec.role != "floor":
            floor = make_case(dataclasses.replace(spec, contender=floor_contender(spec.op)))
        info = measure_speed(benchmark, case, spec.device, POLICIES[spec.sizes], spec.role == "compile", floor)
        info.update(measure_memory(case, spec.device, saved=False))
    median = info.get("median_s")
    info.update(
        op=spec.op,
        mode=spec.mode,
        dtype=spec.dtype,
        contender=spec.contender,
        role=spec.role,
        M=spec.shape.M,
        K=spec.shape.K,
        out=spec.shape.out,
        layer=spec.shape.layer,
        device=spec.device,
        device_name=device_name(spec.device),
        sizes=spec.sizes,
        torch=torch.__version__,
        **case.info,
    )
    if case.flop is not None:
        info["flop"] = case.flop
        if median:
            info["gflops"] = case.flop / median / 1e9
    benchmark.extra_info.update(info)
