"""What the Triton launchers must get right besides the math (issue: GPU-only bugs found in
the compiled kernels): autotuning that leaves no stale partial sums and no repeated dL/dW_d
accumulation, no recompilation for a new seed, batch size or chunk, the seed read on the device
equal to the seed passed by value, and 64-bit offsets where a product can pass 2^31."""
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
# Interpreted in CI; the GPU run (benchmarks/gpu_run.sh, -m gpu) runs them on compiled kernels,
# where the bugs they guard against live.
pytestmark = pytest.mark.gpu
A, S = 0.8, 0.6
# Two configs of each autotuned kernel (small blocks: the larger grid), and the plain kernels' blocks.
LOSS_SMALL = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1)
LOSS_BIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1)
GRAD_SMALL = triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_R": 16, "GROUP_N": 2}, num_warps=4, num_stages=1)
GRAD_BIG = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 32, "GROUP_N": 2}, num_warps=4, num_stages=1)
META = (LOSS_BIG.kwargs, GRAD_BIG.kwargs)


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


def _losing_first():
    """A stand-in for triton.testing.do_bench that really runs each config (leaving behind what
    it writes) and times the first of every pair slower: each tuning of two configs picks the second."""
    timed = []

    def timer(kernel_call, quantiles):
        kernel_call()
        timed.append(len(timed))
        return [2.0 if len(timed) % 2 == 1 else 1.0] * len(quantiles)

    return timer, timed


@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "loss-only"])
def test_the_autotuning_call_returns_the_right_loss(compute_grad):
    # Two loss configs timed in a forced order, the first (small blocks: the larger grid)
    # losing: the cells of the partial buffers that only its grid covers must not reach the result.
    timer, timed = _losing_first()
    loss_kern = tdl.loss_kernel([LOSS_SMALL, LOSS_BIG], do_bench=timer)
    x, w, b, eps = _inputs(70, 40)  # 70 rows, 40 columns: 3 vs 2 column blocks, 5 vs 3 row blocks
    got = tdl._denoise_loss(x, w, b, A, S, eps, torch.tensor(0), compute_grad, loss_kern, tdl.grad_kernel([GRAD_BIG]))
    assert timed == [0, 1] and loss_kern.best_config is LOSS_BIG
    if compute_grad:
        _check(got, x, w, b, eps)
    else:
        want = oracle.denoise_loss(x.cpu(), w.cpu(), b.cpu(), A, S, eps.cpu())
        assert_close(got[0], want, *TOLERANCES[torch.float32], "loss")


def test_the_autotuning_call_returns_the_right_weight_gradient(monkeypatch):
    # Two row chunks: the second chunk's dW_d GEMM adds to dW_d in place, and its tuning (a new
    # key: ACCUMULATE) runs both configs before the real launch. dW_d must be restored after
    # each timed run, or the first call's dW_d holds that chunk's part three times.
    monkeypatch.setattr(tdl, "CHUNK_BYTES", 128 * 40 * 2 * 4)
    timer, timed = _losing_first()
    grad_kern = tdl.grad_kernel([GRAD_SMALL, GRAD_BIG], do_bench=timer)
    x, w, b, eps = _inputs(200, 40)
    assert tdl.chunk_rows(200, 40, 4) == 128
    got = tdl._denoise_loss(x, w, b, A, S, eps, torch.tensor(0), True, tdl.loss_kernel([LOSS_BIG]), grad_kern)
    assert timed == [0, 1, 2, 3] and grad_kern.best_config is GRAD_BIG  # tuned for chunk 0, then for the others
    _check(got, x, w, b, eps)


# Parameters of the loss's kernels other than pointers that no test below varies.
_FIXED_ARGS = dict(
    K=64, split_rows=128, a_hi=0.5, a_lo=0.0, s_hi=0.5, s_lo=0.0, grad_scale=1.0, alpha=0.5, n_hi=4096.0, n_lo=0.0, HAS_DB=True,
    BLOCK=1024, stride_xm=64, stride_xk=1, stride_wn=64,
    stride_wk=1, stride_b=1, stride_em=64, stride_ek=1, part_cols=2, HAS_BIAS=True, HAS_NOISE=False,
    COMPUTE_GRAD=True, SEED_FROM_PTR=False, ACCUMULATE=True, GEMM_DTYPE=triton.language.bfloat16,
    ACC_DTYPE=triton.language.float32, INPUT_PRECISION="ieee", SATURATE=False, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32,
    BLOCK_R=32, GROUP_M=2, GROUP_N=2,
)


def _specialization(kernel, **varying):
    """What Triton's JIT keys its compile cache on when ``kernel`` (as decorated in
    denoise_loss.py, its do_not_specialize included) is launched with ``varying`` and
    _FIXED_ARGS: the binder it runs at each launch, for an sm_90 target, without a GPU."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if isinstance(kernel, JITFunction):
        jit = kernel
    else:  # the interpreter's function keeps its decoration's arguments
        jit = JITFunction(kernel.fn, do_not_specialize=kernel.kwargs.get("do_not_specialize"))
    binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))
    x = torch.empty(64, 64)
    names = inspect.signature(jit.fn).parameters
    args = {n: x if n.endswith("_ptr") else {**_FIXED_ARGS, **varying}[n] for n in names}
    _, specialization, _ = binder(**args)
    return str(specialization)


# Chunk positions (row0, R) of batches of any size: the last chunk's R may be 1, 16 or 17. row0
# is a multiple of 128 in every launch today; 1 and 17 check that it is not specialized at all.
_CHUNKS = [(0, 1), (1, 16), (17, 17), (1024, 128), (12544, 1576)]
_SEEDS = (1, 16, 17, 2**40 + 3, -5)


@pytest.mark.parametrize(
    "kernel", ["_noisy_input_kernel", "_loss_gemm_kernel", "_grad_gemm_kernel", "_split_sum_kernel", "_finalize_kernel"]
)
def test_a_new_seed_or_batch_size_compiles_no_new_kernel(kernel):
    from triton.runtime import jit

    if not hasattr(jit, "create_function_from_signature"):
        pytest.fail(f"triton {triton.__version__}: find how its JIT computes the specialization key")
    fn = getattr(tdl, kernel)
    if kernel == "_grad_gemm_kernel":  # no seed, no row0: the chunk's rows and its splits' vary
        keys = {_specialization(fn, R=R, split_rows=rows) for _, R in _CHUNKS for rows in (128, 1024, 4224, R)}
    elif kernel == "_split_sum_kernel":  # the split count varies with the chunk's rows
        keys = {_specialization(fn, splits=splits, numel=64 * 64) for splits in (2, 3, 16, 17)}
    elif kernel == "_finalize_kernel":  # the partials' counts vary with the batch
        keys = {_specialization(fn, n_loss=2 * R, db_rows=R) for _, R in _CHUNKS}
    else:
        keys = {_specialization(fn, seed=seed, row0=row0, R=R) for seed in _SEEDS for row0, R in _CHUNKS}
    assert len(keys) == 1, keys


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_cache_gains_nothing_after_new_seeds_and_batch_sizes(monkeypatch):
    monkeypatch.setattr(tdl, "CHUNK_BYTES", 128 * 64 * 2 * 4)  # 128-row chunks of float32
    kernels = (tdl._noisy_input_kernel, tdl._loss_gemm_kernel, tdl._grad_gemm_kernel)

    def cached():
        device = torch.cuda.current_device()
        return [set(k.device_caches[device][0]) for k in kernels]

    def run(M, seed):
        x, w, b, _ = _inputs(M, 64)
        tdl._denoise_loss(x, w, b, A, S, None, torch.tensor(seed), True, tdl._loss_gemm_kernel, tdl._grad_gemm_kernel, META)

    run(300, 1)  # compiles what it needs: chunks 128, 128, 44 (the dW_d GEMM writes, then adds)
    first = cached()
    for M, seed in ((300, 16), (300, 17), (300, 2**40 + 3), (257, 5), (129, 6), (1000, 7), (17, 8)):
        run(M, seed)  # new seeds, and last chunks of 1, 17 or 104 rows
    assert cached() == first


@pytest.mark.slow
def test_column_offsets_past_2_31_elements():
    # x and noise transposed in storage with a column stride of 2^26 elements: column k sits
    # at k 2^26, past 2^31 from k = 32 on. The storage is allocated, never touched but for the
    # few rows read (the OS maps only those pages); int32 offsets wrap and read elsewhere. The
    # x_noisy kernel reads both (and stores eps for the loss kernel's epilogue).
    import test_triton_backend as tb

    M, K, stride = 4, 64, 2**26
    bf16 = torch.bfloat16
    span = (K - 1) * stride + M
    g = torch.Generator().manual_seed(3)
    vals_x = torch.randn(M, K, generator=g, dtype=bf16)
    vals_e = torch.randn(M, K, generator=g, dtype=bf16)
    store_x = torch.empty(span, dtype=bf16, device=DEVICE)
    store_e = torch.empty(span, dtype=bf16, device=DEVICE)
    x = store_x.as_strided((M, K), (1, stride))
    eps = store_e.as_strided((M, K), (1, stride))
    x.copy_(vals_x)
    eps.copy_(vals_e)
    _, w, b, _ = _inputs(M, K, bf16)
    a, s = tb._scales(bf16)
    got = tdl._denoise_loss(x, w, b, a, s, eps, torch.tensor(0), True, tdl._loss_gemm_kernel, tdl._grad_gemm_kernel, META)
    want = oracle.denoise_loss_grads(vals_x, w.cpu(), b.cpu(), a, s, vals_e, bf16)
    for u, v, name in zip(got, want, ("loss", "dL/dW_d", "dL/db_d")):
        tb._close(u.cpu(), v, bf16, name)


def test_a_seed_read_by_the_kernel_equals_the_seed_passed_by_value():
    # The capture-safe path (the seed tensor on x's device, loaded by the x_noisy kernel) draws
    # exactly the noise of the host path (the seed passed as an int), for seeds of any width.
    x, w, b, _ = _inputs(37, 40)

    def run(seed):
        return tdl._denoise_loss(x, w, b, A, S, None, seed, True, tdl._loss_gemm_kernel, tdl._grad_gemm_kernel, META)

    for seed in (3, 2**40 + 3, 2**62 + 1):
        by_value, in_kernel = run(seed), run(torch.tensor(seed, device=DEVICE))
        for name, p, q in zip(("loss", "dL/dW_d", "dL/db_d"), by_value, in_kernel):
            assert torch.equal(p, q), f"{name} differs for seed {seed}"
    assert not torch.equal(run(4)[0], by_value[0])  # the seed is really used


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
