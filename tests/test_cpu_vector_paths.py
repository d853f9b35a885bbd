"""Every vector path of the CPU kernels (csrc/cpu/isa.h): baseline C++, AVX2 + FMA, AVX-512.

The kernels choose their path once per process, the widest the CPU has, narrowed by
DREP_CPU_NO_AVX512=1 (AVX2) or DREP_CPU_NO_AVX2=1 (baseline). So each path runs in a fresh
process, which checks that it took that path and that, there, the noise hook matches N1
(drep_kernels.rng) in the blocks and tails of every path's width (8, 32, 64 and 128 elements),
the loss matches the float64 oracle and the torch backend, and the result is bitwise the same
on 1 and 2 threads. The AVX-512 path runs the AVX2 path's operations 16 lanes wide, so their
noise and seeded losses must agree bit for bit. A path the CPU lacks is skipped, saying why.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from drep_kernels.backends import implements

if not implements("cpu", "denoise_loss", "cpu"):
    pytest.skip("the C++ CPU kernel of denoise_loss is not built", allow_module_level=True)

from conftest import cpu_flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PATHS = ("avx512", "avx2", "baseline")
PATH_ENV = {"avx512": {}, "avx2": {"DREP_CPU_NO_AVX512": "1"}, "baseline": {"DREP_CPU_NO_AVX2": "1"}}
# Columns: 1, 3 (a cut first counter), 8 and 12 (short rows: the hook's 2 rows share one
# block), 37 (an 8-lane block and a tail), 64 (one 64-element block), 65, 129, 200 (blocks of
# 128 and 64 elements with tails; at 200 the second row starts inside a block) and 1100 (many
# blocks). Where 4 divides the columns, the rows are drawn as one span of counters (noise.h).
COLS = (1, 3, 8, 12, 37, 64, 65, 129, 200, 1100)

PATH_SCRIPT = r"""
import sys, torch
import drep_kernels._C as C
from drep_kernels import rng
from drep_kernels.backends import kernels
from conftest import CLAMP_SEED, CLAMPED_COUNTERS, assert_close
import test_cpu_kernels as t

want_path, out_file, cols_list = sys.argv[1], sys.argv[2], [int(c) for c in sys.argv[3].split(",")]
assert C.cpu_vector_path() == want_path, f"took the {C.cpu_vector_path()} path, not {want_path}"
# N1: the same integer stream as rng.py, the normals to the rounding of log, sin and cos
# (2e-6, as for every backend); 64-bit seeds and counters past 2^32.
for seed, row0 in ((0, 0), (2**32 + 7, 2**32 // 10 - 1), (2**62 + 3, 2**38 + 5)):
    for cols in cols_list:
        want = rng.normal(seed, 2, cols, row0=row0)
        assert_close(t.kernel_noise(seed, row0, 2, cols), want, 2e-6, 2e-6, f"noise seed {seed} row0 {row0} cols {cols}")
for counter in CLAMPED_COUNTERS:
    want = rng.normal(CLAMP_SEED, 1, 4, row0=counter)
    assert_close(t.kernel_noise(CLAMP_SEED, counter, 1, 4), want, 2e-6, 2e-6, f"clamped counter {counter}")
# The kernel on this path: explicit noise against the float64 oracle, seeded against the torch
# backend (the elementwise passes and the epilogue of this path).
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for bias in (True, False):
        x, w, b, eps = t.make_inputs(130, 13, dtype, bias=bias)
        t.check_against_oracle(t.fwd(x, w, b, t.A, t.S, eps, t.SEED, True), x, w, b, eps, dtype)
        seed = torch.tensor(5)
        got = t.fwd(x, w, b, t.A, t.S, None, seed, True)
        want = kernels("torch").denoise_loss_fwd(x, w, b, t.A, t.S, None, seed, True)
        for name, g, r in zip(("loss", "grad_weight", "grad_bias"), got, want):
            assert_close(g, r, 1e-5, 1e-7, f"{dtype} bias={bias} {name}")
t.test_bitwise_same_for_1_and_2_threads(*t.MULTI_TILE[0], True)
# For the comparison between paths: noise rows and a seeded run over 2 tiles.
noise = {cols: t.kernel_noise(2**33 + 5, 2**32 // 10 - 1, 9, cols) for cols in cols_list}
x, w, b, _ = t.make_inputs(*t.MULTI_TILE[0], torch.float32, seed=4)
seeded = t.fwd(x, w, b, t.A, t.S, None, torch.tensor(2**33 + 12345), True)
# and over 4 chunks of short rows drawn as spans (4 divides K)
x, w, b, _ = t.make_inputs(3000, 12, torch.float32, seed=6)
seeded_spans = t.fwd(x, w, b, t.A, t.S, None, torch.tensor(2**33 + 12345), True)
torch.save({"noise": noise, "seeded": seeded, "seeded_spans": seeded_spans}, out_file)
print("path ok")
"""


def missing(path: str) -> str | None:
    """Why this machine cannot run `path`, or None."""
    if path == "baseline":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the {path} path is x86-64 only (this is {platform.machine()})"
    flags = cpu_flags()
    if not {"avx2", "fma"} <= flags:
        return "the CPU has no AVX2 + FMA"
    if path == "avx512" and "avx512f" not in flags:
        return "the CPU has no AVX-512 (avx512f)"
    return None


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    """run_path(path) -> (completed process, file of its results); each path runs once."""
    out_dir = tmp_path_factory.mktemp("cpu_paths")
    runs = {}

    def run(path: str):
        reason = missing(path)
        if reason is not None:
            pytest.skip(reason)
        if path not in runs:
            env = {k: v for k, v in os.environ.items() if not k.startswith("DREP_CPU_NO_")}
            env.update(PATH_ENV[path])
            env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in sys.path if p])
            out_file = out_dir / f"{path}.pt"
            cols = ",".join(map(str, COLS))
            proc = subprocess.run(
                [sys.executable, "-c", PATH_SCRIPT, path, str(out_file), cols],
                env=env, cwd=HERE, capture_output=True, text=True, timeout=600,
            )
            runs[path] = (proc, out_file)
        return runs[path]

    return run


@pytest.mark.parametrize("path", PATHS)
def test_path_is_taken_and_right(path, run_path):
    proc, _ = run_path(path)
    assert proc.returncode == 0 and "path ok" in proc.stdout, proc.stdout + proc.stderr


def test_avx512_path_is_avx2_path_bit_for_bit(run_path):
    results = {}
    for path in ("avx512", "avx2"):
        proc, out_file = run_path(path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results[path] = torch.load(out_file)
    wide, narrow = results["avx512"], results["avx2"]
    for cols in COLS:
        assert torch.equal(wide["noise"][cols], narrow["noise"][cols]), f"noise rows of {cols} columns differ"
    for run in ("seeded", "seeded_spans"):
        for name, a, b in zip(("loss", "grad_weight", "grad_bias"), wide[run], narrow[run]):
            assert torch.equal(a, b), f"{run} {name} differs between the AVX-512 and AVX2 paths"
