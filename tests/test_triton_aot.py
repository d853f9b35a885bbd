"""CI check "Triton AOT": the Triton kernels compile for sm_80 and sm_90 without spills (no GPU).

``test_builds_compile_without_spills`` compiles, through ``benchmarks/triton_aot.py``, every
shipped build: each launch of the triton backend, config, dtype path and target (238 builds,
a few minutes on 2 cores from an empty cache; Triton caches builds by source hash, so
an unchanged kernel recompiles nothing), as ``python -m benchmarks.triton_aot`` does when it writes the
published table, and prints the table. The other tests check the check and need no compiler.
"""
from __future__ import annotations

import pytest

from benchmarks import triton_aot
from benchmarks.triton_aot import PATHS, TARGETS, Build, Row

# One line of each kind of cuobjdump --dump-resource-usage output (CUDA 12.9, a Triton cubin).
RESOURCE_USAGE = """
Fatbin elf code:
================
arch = sm_90a
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _merge_gemm_kernel:
  REG:32 STACK:6280 SHARED:1024 LOCAL:0 CONSTANT[0]:672 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function other:
  REG:40 STACK:0 SHARED:0 LOCAL:16 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def _row(target="sm_90", **fields) -> Row:
    values = dict(regs=128, stack=0, local=0, spill_stores=0, shared=1024, mma="-", tensor_core=False)
    values.update(fields)
    return Row(Build("merge M1+M2", 0, "fp32 ieee", target), **values)


def test_resource_usage_parsed_per_function():
    usage = triton_aot.parse_resource_usage(RESOURCE_USAGE)
    assert usage[("sm_90a", "_merge_gemm_kernel")]["REG"] == 32
    assert usage[("sm_90a", "_merge_gemm_kernel")]["STACK"] == 6280
    assert usage[("sm_90a", "other")]["LOCAL"] == 16
    assert usage[("sm_90a", "other")]["CONSTANT[0]"] == 600


def test_a_clean_build_passes():
    assert _row().failures() == []
    assert _row(stack=32).failures() == []  # a local array: reported, not failed (see the module doc)
    assert _row(tensor_core=True, mma="wgmma").failures() == []
    assert _row("sm_80", tensor_core=True, mma="mma.sync", shared=TARGETS["sm_80"][1]).failures() == []


@pytest.mark.parametrize(
    "fields,says",
    [
        (dict(spill_stores=8, stack=8), "8 bytes of spill stores"),
        (dict(local=4), "4 bytes of local memory"),
        (dict(shared=TARGETS["sm_90"][1] + 1), "shared memory"),
        (dict(tensor_core=True, mma="-"), "without wgmma"),
        (dict(tensor_core=True, mma="mma.sync"), "without wgmma"),  # sm_90 must use its own MMA
        (dict(error="PTXASError: boom"), "does not compile"),
    ],
)
def test_each_defect_fails_a_build(fields, says):
    failures = _row(**fields).failures()
    assert len(failures) == 1 and says in failures[0], failures


def test_spill_stores_read_from_the_ptxas_log():
    log = (
        "ptxas info    : Compiling entry function '_merge_gemm_kernel' for 'sm_90a'\n"
        "ptxas info    : Function properties for _merge_gemm_kernel\n"
        "    6280 bytes stack frame, 11520 bytes spill stores, 11788 bytes spill loads\n"
        "ptxas info    : Used 32 registers, used 1 barriers, 6280 bytes cumulative stack size\n"
    )
    assert triton_aot.spill_stores(log) == 11520
    with pytest.raises(ValueError, match="no spill count"):
        triton_aot.spill_stores("ptxas info    : Used 32 registers")


def test_mma_found_in_ptx():
    assert triton_aot.mma_found("\twgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {") == "wgmma"
    assert triton_aot.mma_found("\tmma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {") == "mma.sync"
    assert triton_aot.mma_found("\tfma.rn.f32 %f1, %f2, %f3, %f4;\n\twgmma.fence.sync.aligned;") == "-"


def test_config_labels():
    import triton
    import triton.language as tl

    config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3, maxnreg=255)
    assert triton_aot.config_label(config) == "BLOCK_M=64 BLOCK_N=128 warps=8 stages=3 maxnreg=255"
    # A plain launch: its block constexprs and options, Triton's defaults for those not passed.
    plain = dict(HAS_NOISE=True, ACC_DTYPE=tl.float32, num_warps=4, BLOCK_M=16, BLOCK_K=128)
    assert triton_aot.config_label(None, plain) == "BLOCK_M=16 BLOCK_K=128 warps=4 stages=3"


def test_summary_per_launch_config_and_target():
    rows = [
        Row(Build("merge M3", 0, p, "sm_90"), config="c0", regs=r, spill_stores=s, shared=sh, mma=m, tensor_core=tc)
        for p, r, s, sh, m, tc in [("fp32 ieee", 200, 0, 1024, "-", False), ("bf16", 90, 8, 4096, "wgmma", True)]
    ] + [Row(Build("merge M3", 0, "fp64", "sm_80"), config="c0", regs=150, spill_stores=0, shared=0, mma="-")]
    lines = triton_aot.summary(rows).splitlines()
    assert lines[2] == "| merge M3 | c0 | sm_90 | 90-200 | 8 | 4096 | bf16: wgmma | 1 of 2 |"
    assert lines[3] == "| merge M3 | c0 | sm_80 | 150-150 | 0 | 0 | no tensor-core path | 0 of 1 |"


def test_builds_enumerate_every_config_path_and_target():
    # Each path its own configs: "a" ships three on bf16, one elsewhere.
    plans = {p.name: {"a": ["c0", "c1", "c2"] if p.name == "bf16" else ["c0"], "b": ["d0"]} for p in PATHS}
    got = triton_aot.builds(plans)
    want = {(launch, c, path, t) for path, configs in plans.items() for launch, labels in configs.items()
            for c in range(len(labels)) for t in TARGETS}
    assert len(got) == len(want) == (2 * len(PATHS) + 2) * len(TARGETS)
    assert {(b.launch, b.config, b.path, b.target) for b in got} == want


def test_tensor_core_path_from_the_launch():
    # What the launcher asks for decides, never the compiled code (which is what is checked).
    import triton.language as tl

    yes = triton_aot.is_tensor_core_path
    assert yes({"INPUT_PRECISION": "tf32", "GEMM_DTYPE": tl.float32})
    assert yes({"INPUT_PRECISION": "ieee", "GEMM_DTYPE": tl.bfloat16})
    assert yes({"INPUT_PRECISION": "ieee", "GEMM_DTYPE": tl.float16})
    assert not yes({"INPUT_PRECISION": "ieee", "GEMM_DTYPE": tl.float32})
    assert not yes({"INPUT_PRECISION": "ieee", "GEMM_DTYPE": tl.float64})
    assert not yes({"ACC_DTYPE": tl.float32})  # no dot: the loss's x_noisy kernel
    with pytest.raises(ValueError, match="GEMM_DTYPE"):
        yes({"INPUT_PRECISION": "ieee", "ACC_DTYPE": tl.float32})


def test_every_dot_kernel_declares_its_operand_dtype():
    """is_tensor_core_path reads INPUT_PRECISION and GEMM_DTYPE: every kernel of the backend
    that calls a dot must have both (a dot without them would pass as an FMA path unchecked)."""
    import inspect

    from triton.runtime.jit import KernelInterface

    from drep_kernels.triton import denoise_loss, merge_weights

    checked = []
    for module in (denoise_loss, merge_weights):
        for value in vars(module).values():
            fn = getattr(value, "fn", None)
            if not isinstance(value, KernelInterface) or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue  # not a kernel, an autotuner around one, or a helper imported from _common
            params = inspect.signature(fn).parameters
            if "dot(" in inspect.getsource(fn):
                assert {"INPUT_PRECISION", "GEMM_DTYPE"} <= set(params), f"{fn.__name__} has a dot but not both constexprs"
                checked.append(fn.__name__)
    assert sorted(checked) == sorted(TENSOR_CORE_KERNELS)


# The triton releases whose compiler the shipped configs are verified against: 3.6 (the lent GPU
# machine's), 3.8 (CI's pinned environment) and 3.9 (CI's newest).
VERIFIED_TRITON = ("3.6", "3.8", "3.9")

LAUNCHES = {
    "loss x_noisy", "loss x_noisy noise given", "loss L1", "loss L1+L2", "loss dW_d", "loss dW_d accumulate",
    "loss dW_d split sum", "loss dW_d split sum accumulate", "loss finalize", "loss finalize dL/db_d",
    "merge M1+M2", "merge M3", "merge M4+M5",
}
# The kernels whose dots must be on tensor cores on the TF32, bf16 and fp16 paths.
TENSOR_CORE_KERNELS = {"_loss_gemm_kernel", "_grad_gemm_kernel", "_merge_gemm_kernel"}


@pytest.mark.slow
def test_builds_compile_without_spills(capsys):
    import triton

    if ".".join(triton.__version__.split(".")[:2]) not in VERIFIED_TRITON:
        pytest.skip(f"configs verified spill-free for triton {VERIFIED_TRITON}, not {triton.__version__} (see VERIFIED_TRITON)")
    rows = triton_aot.run(jobs=2)
    with capsys.disabled():
        print(f"\nTriton AOT, every shipped build:\n{triton_aot.table(rows)}")
    assert {r.build.launch for r in rows} == LAUNCHES
    # The tensor-core paths must really have been compiled as ones: else the MMA check checked nothing.
    for target in TARGETS:
        for path in ("fp32 tf32", "bf16", "fp16"):
            on_path = [r for r in rows if r.build.target == target and r.build.path == path]
            assert {r.kernel for r in on_path if r.tensor_core} == TENSOR_CORE_KERNELS, (target, path)
    failed = [f"{r.build} {r.config}: {'; '.join(r.failures())}" for r in rows if r.failures()]
    assert not failed, f"{len(failed)} of {len(rows)} Triton builds may not ship:\n" + "\n".join(failed)
