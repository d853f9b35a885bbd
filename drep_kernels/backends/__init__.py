"""Backend registry and the one place where a backend is chosen for an op.

A backend is a module with the kernel functions ``denoise_loss_fwd``, ``merge_weights_fwd``
and ``merge_weights_bwd`` (signatures in ``backends/reference.py``). Backends:

- ``torch``: plain PyTorch (``reference.py``), any device; the oracle.
- ``cpu`` / ``cuda``: the C++ / CUDA kernels of ``drep_kernels._C`` (``extension.py``).
- ``triton``: Triton kernels (``drep_kernels/triton``); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (when forced with ``DREP_BACKEND=triton``: that is how CI tests them).

``DREP_BACKEND`` forces one backend for every op; otherwise the fastest built one that
implements the op for the tensors' device is taken, falling back to ``torch``.
"""
from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path
from types import ModuleType

import torch

NAMES = ("torch", "cpu", "cuda", "triton")
OPS = ("denoise_loss", "merge_weights")

# Default preference per device type. On CUDA the C++ kernels come first until a GPU run
# measures otherwise (benchmarks/results/); the Triton interpreter is never a default.
_PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


def extension_error() -> str | None:
    """Why ``drep_kernels._C`` could not be loaded, or None if it is loaded."""
    try:
        importlib.import_module("drep_kernels._C")
    except ImportError as e:  # not built (source checkout) or built against another torch
        return str(e)
    return None


# The command that rebuilds the extension against the running torch (env and the tests say it).
REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."


def extension_diagnosis() -> str | None:
    """None when ``drep_kernels._C`` is loaded; else why not, and the command that fixes it
    (shown by ``python -m drep_kernels.env`` and by the test suite, which stops on it)."""
    err = extension_error()
    if err is None:
        return None
    package_dir = Path(__file__).resolve().parents[1]
    built = any(package_dir.glob("_C.*.so")) or any(package_dir.glob("_C.*.pyd"))
    if "undefined symbol" in err or "version" in err.lower():
        why = (
            f"it was built against another torch than the one running ({torch.__version__}): an "
            f"ABI mismatch. Fix: rebuild against this torch: {REBUILD}"
        )
    elif not built and (package_dir.parent / "setup.py").exists():
        why = (
            f"{package_dir} is a source tree without a compiled extension (imported instead of an "
            "installed build?). Fix: pip install --no-build-isolation .  (or, to develop in "
            "place: pip install --no-build-isolation -e .), and run from outside the source tree "
            "or with pytest, whose conftest.py prefers the installed build"
        )
    elif not built:
        why = f"the package at {package_dir} has no compiled _C (the build left it out or failed). Fix: {REBUILD} -v"
    else:
        why = f"it did not load. Fix: {REBUILD}"
    return f"drep_kernels._C is not usable: {why}. Import error: {err}"


def _registered(op: str, dispatch_key: str) -> bool:
    # C++ kernels are registered as drep::<op>_fwd under the CPU / CUDA dispatch keys.
    if extension_error() is not None:
        return False
    name = f"drep::{op}_fwd"
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)


def triton_error() -> str | None:
    """Why the Triton backend is unusable here, or None."""
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return f"triton is not installed ({e})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device and TRITON_INTERPRET is not 1"
    return None


def implements(backend: str, op: str, device_type: str) -> bool:
    """Whether ``backend`` has a kernel for ``op`` on tensors of ``device_type``."""
    if backend == "torch":
        return True
    if backend == "cpu":
        return device_type == "cpu" and _registered(op, "CPU")
    if backend == "cuda":
        return device_type == "cuda" and _registered(op, "CUDA")
    if backend == "triton":
        if triton_error() is not None:
            return False
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False
        return hasattr(kernels("triton"), f"{op}_fwd")
    raise ValueError(f"unknown backend {backend!r}; expected one of {NAMES}")


def backends() -> list[str]:
    """The backends built and usable on this machine (for at least one op)."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [
        b for b in NAMES if any(implements(b, op, d) for op in OPS for d in device_types)
    ]


@torch.compiler.assume_constant_result  # decided once at trace time: no graph break
def select(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on tensors of ``device``: ``DREP_BACKEND`` if set (an
    error if it cannot run here), else the first of the device's preference list.

    Decided once per (op, device type, DREP_BACKEND, TRITON_INTERPRET): every layer asks on
    every step, and the answer cannot change while those stay the same (the extension and
    triton are imported once per process)."""
    return _select(op, device.type, os.environ.get("DREP_BACKEND"), os.environ.get("TRITON_INTERPRET"))


@functools.cache
def _select(op: str, device_type: str, forced: str | None, _interpret: str | None) -> str:
    if forced:
        if forced not in NAMES:
            raise ValueError(f"DREP_BACKEND={forced!r} is not one of {NAMES}")
        if not implements(forced, op, device_type):
            raise RuntimeError(
                f"DREP_BACKEND={forced!r} cannot run {op} on {device_type} tensors here "
                f"({_why_not(forced, device_type)}); available: {backends()}"
            )
        return forced
    for name in _PREFERENCE.get(device_type, ("torch",)):
        if implements(name, op, device_type):
            return name
    return "torch"


def _why_not(backend: str, device_type: str) -> str:
    if backend in ("cpu", "cuda"):
        if backend != device_type:
            return f"the {backend} backend takes {backend} tensors"
        err = extension_error()
        return f"drep_kernels._C not loaded: {err}" if err else "kernel not built for this op"
    if backend == "triton":
        return triton_error() or "no Triton kernel for this op/device"
    return "unknown"


_MODULES = {
    "torch": "drep_kernels.backends.reference",
    "cpu": "drep_kernels.backends.extension",
    "cuda": "drep_kernels.backends.extension",
    "triton": "drep_kernels.triton",
}


@functools.cache
def kernels(backend: str) -> ModuleType:
    """The module holding ``backend``'s kernel functions (imported on first use)."""
    return importlib.import_module(_MODULES[backend])
