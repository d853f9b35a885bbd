"""What the Triton launchers must get right besides the math (issue: GPU-only bugs found in
the compiled kernels): autotuning that leaves no stale partial sums, no recompilation for a
new seed or batch size, and 64-bit offsets where a product can pass 2^31."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

import triton  # noqa: E402

import drep_kernels.triton.denoise_loss as tdl  # noqa: E402

import oracle  # noqa: E402
from conftest import TOLERANCES, assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
A, S = 0.8, 0.6
SMALL = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)
BIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)


def _inputs(M, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(K, K, generator=g) / K**0.5).to(DEVICE, dtype)
    b = torch.randn(K, generator=g).to(DEVICE, dtype)
    eps = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    return x, w, b, eps


def _check(got, x, w, b, eps):
    loss, gw, gb = oracle.denoise_loss_grads(x.cpu(), w.cpu(), b.cpu(), A, S, eps.cpu())
    rtol, atol = TOLERANCES[torch.float32]
    assert_close(got[0], loss, rtol, atol, "loss")
    assert_close(got[1], gw, rtol, atol * float(gw.abs().max()), "dL/dW_d")
    assert_close(got[2], gb, rtol, atol * float(gb.abs().max()), "dL/db_d")


@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "loss-only"])
def test_the_autotuning_call_returns_the_right_loss(compute_grad):
    # Two configs timed in a forced order, the first (small blocks: the larger grid) losing:
    # the cells of the partial buffers that only its grid covers must not reach the result.
    timed = []

    def timer(kernel_call, quantiles):  # stands in for triton.testing.do_bench
        kernel_call()  # really runs the config, leaving its partial sums behind
        timed.append(len(timed))
        return [2.0 if len(timed) == 1 else 1.0] * len(quantiles)

    kernel = tdl.autotuned([SMALL, BIG], do_bench=timer)
    x, w, b, eps = _inputs(70, 40)  # 70 rows, 40 columns: 3 vs 2 column blocks, 5 vs 3 row blocks
    got = tdl._denoise_loss(x, w, b, A, S, eps, torch.tensor(0), compute_grad, kernel, [SMALL, BIG])
    assert timed == [0, 1] and kernel.best_config is BIG
    if compute_grad:
        _check(got, x, w, b, eps)
    else:
        want = oracle.denoise_loss(x.cpu(), w.cpu(), b.cpu(), A, S, eps.cpu())
        assert_close(got[0], want, *TOLERANCES[torch.float32], "loss")


def _specialization(seed: int, M: int):
    """What Triton's JIT keys its compile cache on for these arguments (the binder it runs at
    each launch), computed for an sm_90 target without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = tdl._denoise_loss_fwd_kernel.fn
    jit = JITFunction(fn, do_not_specialize=tdl._DATA_ARGS)
    binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))
    x = torch.empty(64, 64)
    args = dict(
        x_ptr=x, wd_ptr=x, bd_ptr=x, noise_ptr=x, loss_part_ptr=x, dw_part_ptr=x, db_part_ptr=x,
        M=M, K=64, seed=seed, seed_ptr=x, a_hi=0.5, a_lo=0.0, s_hi=0.5, s_lo=0.0,
        stride_xm=64, stride_xk=1, stride_wn=64, stride_wk=1, stride_b=1, stride_em=64, stride_ek=1,
        loss_part_stride=2, HAS_BIAS=True, HAS_NOISE=False, COMPUTE_GRAD=True, SEED_FROM_PTR=False, DTYPE=triton.language.float32,
        INPUT_PRECISION="ieee", BLOCK_M=32, BLOCK_N=32, BLOCK_K=32,
    )
    _, specialization, _ = binder(**args)
    return specialization


def test_a_new_seed_or_batch_size_compiles_no_new_kernel():
    pytest.importorskip("triton.runtime.jit", reason="needs triton's JIT module")
    from triton.runtime import jit

    if not hasattr(jit, "create_function_from_signature"):
        pytest.fail(f"triton {triton.__version__}: find how its JIT computes the specialization key")
    keys = {str(_specialization(seed, M)) for seed in (1, 16, 17, 2**40 + 3, -5) for M in (1, 16, 17, 1576)}
    assert len(keys) == 1, keys


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_cache_holds_one_kernel_after_new_seeds():
    x, w, b, _ = _inputs(64, 64)
    kernel = tdl._denoise_loss_fwd_kernel
    for seed in (1, 16, 17, 2**40 + 3):
        tdl._denoise_loss(x, w, b, A, S, None, torch.tensor(seed), True, kernel, [BIG], BIG.kwargs)
    caches = kernel.device_caches[torch.cuda.current_device()][0]
    assert len(caches) == 1, list(caches)


@pytest.mark.slow
def test_column_offsets_past_2_31_elements():
    # x and noise transposed in storage with a column stride of 2^26 elements: column k sits
    # at k 2^26, past 2^31 from k = 32 on. The storage is allocated, never touched but for the
    # few rows read (the OS maps only those pages); int32 offsets wrap and read elsewhere.
    M, K, stride = 4, 64, 2**26
    span = (K - 1) * stride + M
    g = torch.Generator().manual_seed(3)
    vals_x = torch.randn(M, K, generator=g, dtype=torch.bfloat16)
    vals_e = torch.randn(M, K, generator=g, dtype=torch.bfloat16)
    store_x = torch.empty(span, dtype=torch.bfloat16)
    store_e = torch.empty(span, dtype=torch.bfloat16)
    x = store_x.as_strided((M, K), (1, stride))
    eps = store_e.as_strided((M, K), (1, stride))
    x.copy_(vals_x)
    eps.copy_(vals_e)
    _, w, b, _ = _inputs(M, K)
    got = tdl._denoise_loss(x, w, b, A, S, eps, torch.tensor(0), True, tdl._denoise_loss_fwd_kernel, [BIG], BIG.kwargs)
    _check(got, vals_x.float(), w, b, vals_e.float())


def test_a_seed_read_by_the_kernel_equals_the_seed_passed_by_value():
    # The capture-safe path (the seed tensor on x's device, loaded in the kernel) draws exactly
    # the noise of the host path (the seed passed as an int), for seeds of any width.
    x, w, b, _ = _inputs(37, 40)
    for seed in (3, 2**40 + 3, 2**62 + 1):
        by_value = tdl._denoise_loss(x, w, b, A, S, None, seed, True, tdl._denoise_loss_fwd_kernel, [BIG], BIG.kwargs)
        in_kernel = tdl._denoise_loss(
            x, w, b, A, S, None, torch.tensor(seed, device=DEVICE), True, tdl._denoise_loss_fwd_kernel, [BIG], BIG.kwargs
        )
        for name, p, q in zip(("loss", "dL/dW_d", "dL/db_d"), by_value, in_kernel):
            assert torch.equal(p, q), f"{name} differs for seed {seed}"
    other = tdl._denoise_loss(x, w, b, A, S, None, 4, True, tdl._denoise_loss_fwd_kernel, [BIG], BIG.kwargs)
    assert not torch.equal(other[0], by_value[0])  # the seed is really used


@pytest.mark.slow
def test_merge_offsets_past_2_31_elements():
    # W (out x K) column-major with a column stride of 2^26: W[:, k] sits at k 2^26, past 2^31
    # from k = 32 on (only the touched pages are ever mapped).
    from drep_kernels.triton.merge_weights import merge_weights_fwd

    out, K, stride = 4, 64, 2**26
    g = torch.Generator().manual_seed(5)
    vals = torch.randn(out, K, generator=g, dtype=torch.bfloat16)
    w = torch.empty((K - 1) * stride + out, dtype=torch.bfloat16).as_strided((out, K), (1, stride))
    w.copy_(vals)
    wd = (torch.randn(K, K, generator=g) / K).to(torch.bfloat16)
    bd = torch.randn(K, generator=g).to(torch.bfloat16)
    mw, mb = merge_weights_fwd(w, None, wd, bd, 0.03, 1.01)
    ew, eb = oracle.merge(vals.double(), None, wd.double(), bd.double(), 0.03, 1.01)
    scale = float(ew.abs().max())
    assert_close(mw, ew, 2 * torch.finfo(torch.bfloat16).eps, 1e-5 * scale, "merged weight")
    assert_close(mb, eb, 2 * torch.finfo(torch.bfloat16).eps, 1e-5 * float(eb.abs().max()), "merged bias")
