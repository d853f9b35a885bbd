"""The CUDA kernels' GEMMs follow the precision policy (docs/method.md, "Precision").

The host build of csrc/cuda (tests/cuda_host) runs csrc/cuda/common.cuh's gemm unchanged against
a CPU cublasGemmEx that records every call (tests/cuda_host/cublas_host.h). So these tests read
the arguments a GPU run passes to cuBLAS: operand types A and B, result type C, compute type,
alpha, beta and the shapes, for the loss's two GEMMs per chunk and the merge's GEMMs, for every
input dtype and for float32 with TF32 off and on (each of torch's ways to turn it on).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import TOLERANCES, assert_close
from cuda_host.build import load_host_ops, loss_chunk_rows
from drep_kernels.backends import extension_error, kernels

if extension_error() is not None:
    pytest.skip("drep_kernels._C is not loaded (the host build takes drep's schemas from it)", allow_module_level=True)

A, S = 0.8, 0.6
C1, C3 = 0.37, 1.02
TORCH = kernels("torch")
SEED = torch.tensor(7, dtype=torch.int64)

# input dtype, TF32 on -> (A and B, C, compute type): the policy.
POLICY = {
    (torch.bfloat16, False): ("CUDA_R_16BF", "CUDA_R_32F", "CUBLAS_COMPUTE_32F"),
    (torch.float16, False): ("CUDA_R_16F", "CUDA_R_32F", "CUBLAS_COMPUTE_32F"),
    (torch.float32, False): ("CUDA_R_32F", "CUDA_R_32F", "CUBLAS_COMPUTE_32F"),
    (torch.float32, True): ("CUDA_R_32F", "CUDA_R_32F", "CUBLAS_COMPUTE_32F_FAST_TF32"),
    (torch.float64, False): ("CUDA_R_64F", "CUDA_R_64F", "CUBLAS_COMPUTE_64F"),
}


@contextlib.contextmanager
def tf32(way: str):
    """torch's float32 matmuls on TF32, set by `way` ("off": left as they are), then restored."""
    matmul = torch.backends.cuda.matmul
    saved = (torch.backends.fp32_precision, matmul.fp32_precision)
    legacy = {"allow_tf32": lambda: matmul.allow_tf32,
              "matmul_precision_high": torch.get_float32_matmul_precision}.get(way, lambda: None)()
    try:
        if way == "allow_tf32":
            matmul.allow_tf32 = True
        elif way == "matmul_precision_high":
            torch.set_float32_matmul_precision("high")
        elif way == "cuda_matmul_fp32_precision":
            matmul.fp32_precision = "tf32"
        elif way == "global_fp32_precision":
            torch.backends.fp32_precision = "tf32"
        else:
            assert way == "off", way
        yield
    finally:
        # An old-API setting is undone by its own API first: restoring only the new settings
        # would leave a state that mixes the two, which torch refuses to read.
        if way == "allow_tf32":
            matmul.allow_tf32 = legacy
        elif way == "matmul_precision_high":
            torch.set_float32_matmul_precision(legacy)
        torch.backends.fp32_precision, matmul.fp32_precision = saved


TF32_WAYS = ["allow_tf32", "matmul_precision_high", "cuda_matmul_fp32_precision", "global_fp32_precision"]
CASES = [(torch.bfloat16, "off"), (torch.float16, "off"), (torch.float32, "off"), (torch.float64, "off")] + [
    (torch.float32, way) for way in TF32_WAYS
]
CASE_IDS = [f"{str(d).removeprefix('torch.')}-tf32-{way}" for d, way in CASES]


@pytest.fixture(scope="module")
def host():
    return load_host_ops()


def calls(host) -> list[dict[str, str]]:
    """The recorded cublasGemmEx calls since the last read, as dicts of their arguments."""
    return [dict(field.split("=", 1) for field in line.split()) for line in host._gemm_calls()]


def check_types(recorded, dtype, tf32_on, result_in_operand_dtype=False):
    """Each call's types are the policy's; with ``result_in_operand_dtype`` its result is in the
    operands' dtype instead (the merge's W', rounded once from the compute precision)."""
    ab, c, compute = POLICY[(dtype, tf32_on)]
    if result_in_operand_dtype:
        c = ab
    for call in recorded:
        assert (call["A"], call["B"], call["C"], call["compute"]) == (ab, ab, c, compute), call


def dims(call) -> tuple[int, int, int]:
    """cuBLAS's (m, n, k): the column-major C^T = B^T A^T of the row-major C = A B is n x m."""
    return int(call["m"]), int(call["n"]), int(call["k"])


def chunk_rows(m: int, k: int, dtype: torch.dtype) -> list[int]:
    """The rows of each chunk the host build's loss runs for an m x k input."""
    rows = loss_chunk_rows(m, k, dtype)
    return [min(rows, m - r0) for r0 in range(0, m, rows)]


@pytest.mark.parametrize("dtype,way", CASES, ids=CASE_IDS)
def test_loss_gemms(host, dtype, way):
    # 500 x 7 runs two or more chunks in the host build (float32: 256 + 244 rows): per chunk
    # GEMM 1 (p = x_noisy W_d^T, beta 0) then GEMM 2 (dL/dW_d: beta 0 for the first chunk, 1
    # after: accumulated in place; alpha = 1 / (M K), times 2^14 for float16's scaled G'). G' is
    # read where the epilogue wrote it, over p: row stride K in p's own dtype, 2 K in a half one.
    m, k = 500, 7
    rows = chunk_rows(m, k, dtype)
    assert len(rows) >= 2
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(k, k, generator=g), torch.randn(k, generator=g)
    calls(host)  # start from an empty log
    with tf32(way):
        host.denoise_loss_fwd(x.to(dtype), w.to(dtype), b.to(dtype), A, S, None, SEED, True)
    recorded = calls(host)
    check_types(recorded, dtype, way != "off")
    assert [dims(c) for c in recorded] == [d for r in rows for d in ((k, r, k), (k, k, r))]
    assert [float(c["beta"]) for c in recorded] == [0, 0] + [0, 1] * (len(rows) - 1)
    scale = 2.0**14 if dtype == torch.float16 else 1.0
    half = dtype in (torch.float16, torch.bfloat16)
    for c in recorded[0::2]:
        assert float(c["alpha"]) == 1.0
    for c in recorded[1::2]:
        assert float(c["alpha"]) == pytest.approx(scale / (m * k), rel=1e-6)
        assert (c["transb"], int(c["ldb"])) == ("T", 2 * k if half else k), c  # cuBLAS's B: G'^T


def test_loss_without_gradients_runs_gemm_1_only(host):
    x, w = torch.randn(500, 7, dtype=torch.bfloat16), torch.randn(7, 7, dtype=torch.bfloat16)
    calls(host)
    host.denoise_loss_fwd(x, w, None, A, S, None, SEED, False)
    recorded = calls(host)
    check_types(recorded, torch.bfloat16, False)
    rows = chunk_rows(500, 7, torch.bfloat16)
    assert len(rows) == 2 and [dims(c) for c in recorded] == [(7, r, 7) for r in rows]


@pytest.mark.parametrize("dtype,way", CASES, ids=CASE_IDS)
def test_merge_gemms(host, dtype, way):
    # Forward: one GEMM, W' = c3 W' - c1 W W_d (K x out x K in cuBLAS's terms) on the copy of W
    # (beta = c3), its result in W's dtype; b' is formed in the copy's pass (no GEMV, no K + 1
    # column anywhere). Backward: G_W W_d^T (M3), then -c1 W^T G_W (M4) and -c1 W^T g_b (M5)
    # with alpha = -c1, float32 results.
    out, k = 11, 7
    g = torch.Generator().manual_seed(2)
    shapes = [(out, k), (out,), (k, k), (k,), (out, k), (out,)]
    w, b, wd, bd, gw, gb = (torch.randn(*s, generator=g).to(dtype) for s in shapes)
    calls(host)
    with tf32(way):
        host.merge_weights_fwd(w, b, wd, bd, C1, C3)
        forward = calls(host)
        host.merge_weights_bwd(gw, gb, w, wd, bd, C1, C3, True, True)
        backward = calls(host)
    check_types(forward, dtype, way != "off", result_in_operand_dtype=True)
    check_types(backward, dtype, way != "off")
    assert [dims(c) for c in forward] == [(k, out, k)]
    assert [float(forward[0]["alpha"]), float(forward[0]["beta"])] == pytest.approx([-C1, C3])
    # A bf16 / fp16 W' is rounded once from the float32 sum: no split-K partials in that dtype
    # (CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION during the call, and only then).
    half = dtype in (torch.bfloat16, torch.float16)
    assert forward[0]["reduced_precision_reduction"] == ("off" if half else "allowed")
    assert all(c["reduced_precision_reduction"] == "allowed" for c in backward)
    assert [dims(c) for c in backward] == [(k, out, k), (k, k, out), (1, k, out)]
    assert all(float(c["beta"]) == 0 for c in backward)
    assert [float(c["alpha"]) for c in backward] == pytest.approx([1.0, -C1, -C1])


def test_merge_backward_widens_a_parameter_paired_with_a_wider_gradient(host):
    # bfloat16 parameters with float32 gradients: the gradient is not rounded to bfloat16;
    # each GEMM pairing it with a parameter runs on float32 operands (one dtype per GEMM).
    out, k = 11, 7
    g = torch.Generator().manual_seed(3)
    w, wd, bd = (torch.randn(*s, generator=g).bfloat16() for s in [(out, k), (k, k), (k,)])
    gw, gb = torch.randn(out, k, generator=g), torch.randn(out, generator=g)
    calls(host)
    got = host.merge_weights_bwd(gw, gb, w, wd, bd, C1, C3, True, True)
    check_types(calls(host), torch.float32, False)
    d = lambda t: t.double()  # noqa: E731
    want = TORCH.merge_weights_bwd(d(gw), d(gb), d(w), d(wd), d(bd), C1, C3, True, True)
    for name, got_t, want_t in zip(("dW", "dW_d", "db_d"), got, want):
        assert_close(got_t, want_t, *TOLERANCES[torch.float32], name)


def test_tf32_reaches_the_product(host):
    # The host cuBLAS rounds the operands of CUBLAS_COMPUTE_32F_FAST_TF32 to TF32 (10 mantissa
    # bits, ~5e-4 relative each): the float32 loss changes with the setting, and stays within
    # TF32's error of the float64 reference (a few 1e-4 on GEMMs of 127 terms of unit size).
    # b_d = +-10 keeps every D far from 0, where sign(D) could differ from the reference's.
    m, k = 300, 127
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(m, k, generator=g), torch.randn(k, k, generator=g) / k**0.5
    b = 10 * torch.randn(k, generator=g).sign()
    eps = torch.randn(m, k, generator=g)
    ieee = host.denoise_loss_fwd(x, w, b, A, S, eps, SEED, True)
    with tf32("cuda_matmul_fp32_precision"):
        fast = host.denoise_loss_fwd(x, w, b, A, S, eps, SEED, True)
    want = TORCH.denoise_loss_fwd(x.double(), w.double(), b.double(), A, S, eps.double(), SEED, True)
    for name, i, f, r in zip(("loss", "dL/dW_d", "dL/db_d"), ieee, fast, want):
        assert_close(i, r, *TOLERANCES[torch.float32], name)
        assert_close(f, r, 2e-3, 2e-3, name)
    assert not torch.equal(ieee[0], fast[0]), "TF32 on, yet the loss is the full float32 one"
