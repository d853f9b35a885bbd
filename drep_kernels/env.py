"""``python -m drep_kernels.env``: what this install has (first thing to run on a problem)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if nvcc is None and cuda_home:
        candidate = os.path.join(cuda_home, "bin", "nvcc")
        nvcc = candidate if os.path.exists(candidate) else None
    if nvcc is None:
        return "not found"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{nvcc} (failed: {e})"
    release = [line for line in out.splitlines() if "release" in line]
    return f"{nvcc}: {release[-1].strip() if release else out.strip()}"


def report() -> str:
    import torch

    from . import __version__
    from .backends import NAMES, OPS, backends, extension_diagnosis, implements, triton_error

    lines = [
        f"drep_kernels {__version__}",
        f"python       {platform.python_version()} ({platform.machine()})",
        f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"nvcc         {_nvcc_version()}",
    ]
    try:
        import triton

        lines.append(f"triton       {triton.__version__}")
    except ImportError:
        lines.append("triton       not installed")
    err = extension_diagnosis()
    lines.append(f"extension    {'drep_kernels._C loaded' if err is None else err}")
    if err is None:
        lines += _build_lines(torch.__version__)
    if torch.cuda.is_available():
        lines.append(f"GPU          {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("GPU          none visible")
    if triton_error():
        lines.append(f"triton backend unusable: {triton_error()}")
    lines.append(f"backends     {', '.join(backends())}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for op in OPS:
            have = [b for b in NAMES if implements(b, op, device)]
            lines.append(f"  {op:<14} on {device:<4}: {', '.join(have)}")
    forced = os.environ.get("DREP_BACKEND")
    lines.append(f"DREP_BACKEND {forced or '(unset: fastest available)'}")
    if forced:
        lines += _forced_backend_problems(forced)
    return "\n".join(lines)


def _build_lines(running_torch: str) -> list[str]:
    """What the loaded extension says it was compiled against (its own build_info())."""
    from . import _C
    from .backends import REBUILD

    info = _C.build_info()
    lines = [f"  built with torch {info['torch']}"]
    if info["torch"] != running_torch.split("+")[0]:
        lines[0] += f"  <- MISMATCH: running torch {running_torch}; rebuild: {REBUILD}"
    if info["cuda"] is None:
        lines.append(f"  CUDA kernels not built (CPU kernels only): {_why_no_cuda()}")
    else:
        archs = ", ".join(f"sm_{int(a) // 10}" for a in info["cuda_archs"].split(","))
        lines.append(f"  CUDA kernels built for {archs} against CUDA {info['cuda']} headers")
    lines.append(
        f"  CPU kernels' vector path: {_C.cpu_vector_path()} (chosen at run time; DREP_CPU_NO_AVX512=1 or "
        "DREP_CPU_NO_AVX2=1 narrows it)"
    )
    return lines


def _why_no_cuda() -> str:
    """setup.py's reason for leaving CUDA out, from the record it wrote beside _C."""
    try:
        from ._build_info import BUILD
    except ImportError:
        return "the build left no record (drep_kernels/_build_info.py) of why"
    why = BUILD.get("cuda_skipped_because") or "FORCE_CUDA=0"
    found = f"torch CUDA {BUILD.get('torch_cuda')}, nvcc {BUILD.get('nvcc')}, pip's CUDA headers {BUILD.get('pip_cuda_headers')}"
    return f"{why} ({found})"


def _forced_backend_problems(forced: str) -> list[str]:
    """One line per op and device that DREP_BACKEND=``forced`` cannot run here (select() would
    raise there), so a wrong setting shows before a training run does."""
    import torch

    from .backends import NAMES, OPS, _why_not, implements

    if forced not in NAMES:
        return [f"  <- not a backend: choose one of {', '.join(NAMES)}"]
    lines = []
    for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        bad = [op for op in OPS if not implements(forced, op, d)]
        if bad:
            lines.append(f"  <- cannot run {', '.join(bad)} on {d} tensors here ({_why_not(forced, d)}): they would raise")
    if not torch.cuda.is_available() and forced == "cuda":
        lines.append("  <- no CUDA device is visible")
    return lines


if __name__ == "__main__":
    print(report())
