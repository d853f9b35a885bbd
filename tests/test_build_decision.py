"""setup.py's CUDA decision (drep_kernels/_build.py) without a GPU: versions in, build-or-skip,
include dirs and message out; and the decision the installed build recorded."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from drep_kernels import _build
from drep_kernels._build import CudaBuildError, Decision, Found, decide

PIP = ("/venv/site-packages/nvidia/cu13/include",)


def _found(torch_cuda=(13, 0), nvcc=(13, 0), math_headers=False, pip_dirs=PIP, pip_cuda=(13, 0), cuda_home="/usr/local/cuda-13.0"):
    return Found(
        torch_version=f"2.15.0+cu{torch_cuda[0]}{torch_cuda[1]}" if torch_cuda else "2.15.0+cpu",
        torch_cuda=torch_cuda,
        cuda_home=cuda_home,
        nvcc=nvcc,
        toolkit_has_math_headers=math_headers,
        pip_include_dirs=pip_dirs,
        pip_cuda=pip_cuda,
    )


# (case, found, include dirs when CUDA is built)
BUILDS = [
    # this machine's CI: nvcc 13.0 without cuBLAS headers, torch cu130 with pip's 13.0 headers
    ("pip headers of nvcc's release", _found(), PIP),
    # a complete toolkit needs no pip headers; those of another release are left out
    ("full toolkit, pip 13.2", _found(torch_cuda=(13, 2), math_headers=True, pip_cuda=(13, 2)), ()),
    ("full toolkit, pip 13.0", _found(math_headers=True), ()),
    ("full toolkit, no pip headers", _found(math_headers=True, pip_dirs=(), pip_cuda=None), ()),
    # another minor than torch's is fine either way (CUDA's minor-version compatibility)
    ("nvcc newer minor", _found(nvcc=(13, 2), math_headers=True), ()),
    ("nvcc older minor", _found(torch_cuda=(13, 2), nvcc=(13, 0), pip_cuda=(13, 0)), PIP),
]

# (case, found, words the reason must contain)
SKIPS = [
    # the user report: torch 2.15.0+cu132 (pip's 13.2 headers) with nvcc 13.0 and no cuBLAS headers
    ("pip 13.2 headers, nvcc 13.0", _found(torch_cuda=(13, 2), pip_cuda=(13, 2)), ["CUDA 13.2", "nvcc 13.0 refuses"]),
    ("pip 13.0 headers, nvcc 13.2", _found(nvcc=(13, 2)), ["CUDA 13.0", "nvcc 13.2 refuses"]),
    ("major mismatch", _found(torch_cuda=(12, 8), math_headers=True), ["nvcc is CUDA 13.0", "CUDA 12.8", "major"]),
    ("cpu torch", _found(torch_cuda=None), ["2.15.0+cpu is not a CUDA build"]),
    ("no toolkit", _found(cuda_home=None, nvcc=None), ["no CUDA toolkit found"]),
    ("nvcc unreadable", _found(nvcc=None), ["cannot read the version"]),
    ("no math headers anywhere", _found(pip_dirs=(), pip_cuda=None), ["lacks the cuBLAS", "no nvidia-* wheel"]),
    ("pip version unknown", _found(pip_cuda=None), ["lacks the cuBLAS", "no cuda_runtime_api.h"]),
]


@pytest.mark.parametrize("force", [None, "", "1", " 1 "])
@pytest.mark.parametrize("case,found,include_dirs", BUILDS, ids=[c[0] for c in BUILDS])
def test_builds_cuda(case, found, include_dirs, force):
    assert decide(force, found) == Decision(build_cuda=True, include_dirs=include_dirs)


@pytest.mark.parametrize("case,found,words", SKIPS, ids=[c[0] for c in SKIPS])
def test_unset_skips_with_one_warning_naming_versions_and_fix(case, found, words):
    d = decide(None, found)
    assert not d.build_cuda and d.include_dirs == ()
    for w in words:
        assert w in d.why_not, (w, d.why_not)
    assert d.warning.startswith("drep_kernels: building the CPU kernels only, without CUDA: " + d.why_not)
    # every version found, then the fix and the switches
    assert found.summary() in d.warning
    assert "To build the CUDA kernels: install " in d.warning
    assert "FORCE_CUDA=0 skips CUDA without this warning" in d.warning


def test_summary_names_every_version():
    s = _found(torch_cuda=(13, 2), pip_cuda=(13, 2)).summary()
    assert s == (
        "torch 2.15.0+cu132 (CUDA 13.2), nvcc 13.0 (/usr/local/cuda-13.0), "
        "pip's CUDA headers 13.2 (/venv/site-packages/nvidia/cu13/include)"
    )


def test_user_report_fix_names_the_matching_toolkit():
    d = decide("", _found(torch_cuda=(13, 2), pip_cuda=(13, 2)))
    assert "install a CUDA 13.2 toolkit (the version of pip's CUDA headers and of torch" in d.warning


@pytest.mark.parametrize("case,found,words", SKIPS, ids=[c[0] for c in SKIPS])
def test_force_cuda_1_raises(case, found, words):
    with pytest.raises(CudaBuildError, match="FORCE_CUDA=1 but the CUDA kernels cannot be built") as e:
        decide("1", found)
    assert found.summary() in str(e.value) and all(w in str(e.value) for w in words)


@pytest.mark.parametrize("found", [f for _, f, _ in SKIPS] + [f for _, f, _ in BUILDS])
def test_force_cuda_0_skips_silently(found):
    assert decide("0", found) == Decision(build_cuda=False, why_not="FORCE_CUDA=0", warning=None)


@pytest.mark.parametrize("force", ["yes", "true", "2", "on"])
def test_other_force_values_raise(force):
    with pytest.raises(ValueError, match="FORCE_CUDA must be 1"):
        decide(force, _found())


def test_parse_nvcc_release():
    out = (
        "nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2025 NVIDIA Corporation\n"
        "Built on Wed_Aug_20_01:58:59_PM_PDT_2025\nCuda compilation tools, release 13.0, V13.0.88\n"
        "Build cuda_13.0.r13.0/compiler.36424714_0\n"
    )
    assert _build.parse_nvcc_release(out) == (13, 0)
    assert _build.parse_nvcc_release("Cuda compilation tools, release 12.10, V12.10.1") == (12, 10)
    assert _build.parse_nvcc_release("sh: nvcc: not found") is None


def test_parse_cudart_header():
    text = "/* CUDART_VERSION 99999 in a comment */\n#define CUDART_VERSION  13020\n#define OTHER 1\n"
    assert _build.parse_cudart_header(text) == (13, 2)
    assert _build.parse_cudart_header("#  define CUDART_VERSION 12080") == (12, 8)
    assert _build.parse_cudart_header("#define CUDART_VERSION 13000") == (13, 0)
    assert _build.parse_cudart_header("#define CUDA_VERSION 13020") is None


def test_parse_version():
    assert _build.parse_version("13.2") == (13, 2)
    assert _build.parse_version("12.10") == (12, 10)
    assert _build.parse_version(None) is None
    with pytest.raises(ValueError, match="not a CUDA version"):
        _build.parse_version("rocm")


def test_build_info_source_is_the_dict():
    found = _found(torch_cuda=(13, 2), pip_cuda=(13, 2))
    ns: dict = {}
    exec(_build.build_info_source(decide(None, found), found, "8.0;9.0+PTX"), ns)
    assert ns["BUILD"] == {
        "cuda": False,
        "cuda_skipped_because": decide(None, found).why_not,
        "cuda_arch_list": None,
        "torch": "2.15.0+cu132",
        "torch_cuda": "13.2",
        "nvcc": "13.0",
        "cuda_home": "/usr/local/cuda-13.0",
        "pip_cuda_headers": "13.2",
        "pip_include_dirs_used": [],
    }
    found = _found()
    exec(_build.build_info_source(decide("1", found), found, "8.0;9.0"), ns)
    assert ns["BUILD"]["cuda"] is True and ns["BUILD"]["cuda_skipped_because"] is None
    assert ns["BUILD"]["cuda_arch_list"] == "8.0;9.0" and ns["BUILD"]["pip_include_dirs_used"] == list(PIP)


def test_recorded_decision_matches_the_extension():
    # What setup.py recorded must be what was built: CUDA kernels registered iff BUILD says so.
    from drep_kernels.backends import extension_error

    if extension_error() is not None:
        pytest.skip(f"drep_kernels._C is not loaded: {extension_error()}")
    if importlib.util.find_spec("drep_kernels._build_info") is None:
        pytest.skip("no drep_kernels/_build_info.py: the extension was not built by setup.py (e.g. CMake)")
    from drep_kernels._build_info import BUILD

    registered = torch._C._dispatch_has_kernel_for_dispatch_key("drep::merge_weights_fwd", "CUDA")
    assert BUILD["cuda"] == registered, BUILD
    assert BUILD["torch"] == torch.__version__
    assert (BUILD["cuda_skipped_because"] is None) == BUILD["cuda"]
