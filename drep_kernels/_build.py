"""Whether setup.py builds the CUDA kernels: a pure function of the versions the build found.

setup.py cannot import drep_kernels (its ``__init__`` loads the extension being built), so it
loads this file by path: it needs nothing but the standard library. It sits in the package, not
beside setup.py, so every copy of the sources (checkout, sdist, wheel) carries it and the tests
import it as any module.

The rule. CUDA is built iff FORCE_CUDA is not 0 and
  1. torch is a CUDA build and a CUDA toolkit (nvcc) is found;
  2. nvcc's major version is torch's (torch.utils.cpp_extension refuses another major: the
     extension would link another libcudart soname). A different minor is fine, as torch says
     too: CUDA's minor-version compatibility lets code built with 13.0 run on torch's 13.2
     runtime, and the other way round for what our kernels call;
  3. every header the build includes comes from nvcc's own release. torch's CUDA headers
     include the math libraries' headers (MATH_HEADERS); a toolkit without them (nvcc and
     cudart only) needs those of pip's nvidia-* wheels, which are used only when their CUDA
     version is nvcc's major.minor: CUDA's headers refuse a compiler of another release
     ("CUDA compiler and CUDA toolkit headers are incompatible", pip's 13.2 headers on nvcc
     13.0), and a mixed include path is a combination nobody tested.
Otherwise FORCE_CUDA=1 raises, FORCE_CUDA=0 skips silently, and unset builds the CPU kernels
only with one warning that names the versions found and the fix.
"""
from __future__ import annotations

import dataclasses
import pprint
import re
from typing import Optional

Version = tuple[int, int]

# What torch's ATen/cuda/CUDAContextLight.h includes (our .cu files include CUDAContext.h)
# beyond the CUDA runtime: the headers a toolkit without the math libraries lacks.
MATH_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


class CudaBuildError(RuntimeError):
    """FORCE_CUDA=1 asked for CUDA kernels that cannot be built here."""


def parse_version(text: Optional[str]) -> Optional[Version]:
    """``"13.2"`` (torch.version.cuda) -> (13, 2); None stays None."""
    if text is None:
        return None
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    if m is None:
        raise ValueError(f"not a CUDA version: {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_nvcc_release(output: str) -> Optional[Version]:
    """(major, minor) from ``nvcc --version`` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    m = re.search(r"release (\d+)\.(\d+)", output)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_cudart_header(text: str) -> Optional[Version]:
    """(major, minor) from cuda_runtime_api.h's ``#define CUDART_VERSION 13020`` (major * 1000 +
    minor * 10): the macro CUDA's own headers compare with the compiler's version."""
    m = re.search(r"^\s*#\s*define\s+CUDART_VERSION\s+(\d+)\s*$", text, re.MULTILINE)
    if m is None:
        return None
    code = int(m.group(1))
    return code // 1000, code % 1000 // 10


def _fmt(v: Optional[Version]) -> str:
    return "none" if v is None else f"{v[0]}.{v[1]}"


@dataclasses.dataclass(frozen=True)
class Found:
    """What setup.py found. pip_cuda is the CUDA version of pip's nvidia-* headers (None when
    none of pip_include_dirs has a cuda_runtime_api.h to read it from)."""

    torch_version: str
    torch_cuda: Optional[Version]
    cuda_home: Optional[str]
    nvcc: Optional[Version]
    toolkit_has_math_headers: bool
    pip_include_dirs: tuple[str, ...] = ()
    pip_cuda: Optional[Version] = None

    def summary(self) -> str:
        pip = f"{_fmt(self.pip_cuda)} ({', '.join(self.pip_include_dirs)})" if self.pip_include_dirs else "none"
        return (
            f"torch {self.torch_version} (CUDA {_fmt(self.torch_cuda)}), "
            f"nvcc {_fmt(self.nvcc)} ({self.cuda_home or 'no toolkit'}), pip's CUDA headers {pip}"
        )


@dataclasses.dataclass(frozen=True)
class Decision:
    """build_cuda; the include dirs to add (pip's headers, only when needed and of nvcc's
    release); why CUDA is not built (None when it is); the warning to print once (None: silent)."""

    build_cuda: bool
    include_dirs: tuple[str, ...] = ()
    why_not: Optional[str] = None
    warning: Optional[str] = None


def _obstacle(found: Found) -> tuple[Optional[str], Optional[str]]:
    """(why CUDA cannot be built, the fix), or (None, None)."""
    torch_cuda, nvcc = found.torch_cuda, found.nvcc
    if torch_cuda is None:
        return f"torch {found.torch_version} is not a CUDA build", "install a CUDA build of torch"
    toolkit = f"a CUDA {_fmt(torch_cuda)} toolkit (torch's CUDA version; CUDA_HOME or nvcc on PATH)"
    if found.cuda_home is None:
        return "no CUDA toolkit found (CUDA_HOME, or nvcc on PATH)", f"install {toolkit}"
    if nvcc is None:
        return f"cannot read the version of {found.cuda_home}/bin/nvcc", f"install {toolkit}"
    if nvcc[0] != torch_cuda[0]:
        return (
            f"nvcc is CUDA {_fmt(nvcc)} but torch was built with CUDA {_fmt(torch_cuda)} "
            "(torch's extension builder refuses another major version)",
            f"install {toolkit}",
        )
    if found.toolkit_has_math_headers or (found.pip_include_dirs and found.pip_cuda == nvcc):
        return None, None
    lacks = f"the toolkit {found.cuda_home} lacks the cuBLAS/cuSPARSE/cuSOLVER headers torch's CUDA headers include"
    if not found.pip_include_dirs:
        return (
            f"{lacks}, and no nvidia-* wheel provides them",
            f"install a full CUDA {_fmt(nvcc)} toolkit, or {toolkit} that has them",
        )
    if found.pip_cuda is None:
        return (
            f"{lacks}, and pip's nvidia-* headers have no cuda_runtime_api.h to tell their CUDA version",
            f"install {toolkit} with the math libraries",
        )
    return (
        f"{lacks}, and pip's nvidia-* headers are CUDA {_fmt(found.pip_cuda)}, which nvcc "
        f"{_fmt(nvcc)} refuses (\"CUDA compiler and CUDA toolkit headers are incompatible\")",
        f"install a CUDA {_fmt(found.pip_cuda)} toolkit (the version of pip's CUDA headers"
        f"{' and of torch' if found.pip_cuda == torch_cuda else ''}; CUDA_HOME or nvcc on PATH)",
    )


def decide(force: Optional[str], found: Found) -> Decision:
    """The build's CUDA decision. force: FORCE_CUDA's value ("1", "0", or None / "" for unset).

    Raises CudaBuildError when FORCE_CUDA=1 and CUDA cannot be built, ValueError for any other
    FORCE_CUDA value.
    """
    force = (force or "").strip()
    if force not in ("", "0", "1"):
        raise ValueError(f"FORCE_CUDA must be 1 (require CUDA), 0 (skip CUDA) or unset (auto), got {force!r}")
    if force == "0":
        return Decision(build_cuda=False, why_not="FORCE_CUDA=0")
    why_not, fix = _obstacle(found)
    if why_not is None:
        pip_needed = not found.toolkit_has_math_headers
        return Decision(build_cuda=True, include_dirs=found.pip_include_dirs if pip_needed else ())
    if force == "1":
        raise CudaBuildError(
            f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_not}. Found: {found.summary()}. Fix: {fix}."
        )
    return Decision(
        build_cuda=False,
        why_not=why_not,
        warning=(
            f"drep_kernels: building the CPU kernels only, without CUDA: {why_not}. Found: {found.summary()}. "
            f"To build the CUDA kernels: {fix}. FORCE_CUDA=0 skips CUDA without this warning; FORCE_CUDA=1 "
            "makes it an error."
        ),
    )


def build_info_source(decision: Decision, found: Found, arch_list: Optional[str]) -> str:
    """The text of the generated drep_kernels/_build_info.py: a dict ``BUILD``."""
    build = {
        "cuda": decision.build_cuda,
        "cuda_skipped_because": decision.why_not,
        "cuda_arch_list": arch_list if decision.build_cuda else None,
        "torch": found.torch_version,
        "torch_cuda": None if found.torch_cuda is None else _fmt(found.torch_cuda),
        "nvcc": None if found.nvcc is None else _fmt(found.nvcc),
        "cuda_home": found.cuda_home,
        "pip_cuda_headers": None if found.pip_cuda is None else _fmt(found.pip_cuda),
        "pip_include_dirs_used": list(decision.include_dirs),
    }
    return (
        '"""Generated by setup.py when the extension was built (not in git): how CUDA was decided."""\n'
        f"BUILD = {pprint.pformat(build, sort_dicts=False)}\n"
    )
