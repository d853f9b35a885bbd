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
    from .backends import NAMES, OPS, backends, extension_error, implements, triton_error

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
    err = extension_error()
    lines.append(f"extension    {'drep_kernels._C loaded' if err is None else 'not loaded: ' + err}")
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
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
