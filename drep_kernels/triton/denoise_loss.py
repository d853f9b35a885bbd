"""Triton denoising loss (docs/method.md, L1 and L2) in one kernel launch.

One program owns a column block n of p = x_noisy W_d^T + b_d and a group of row blocks m
(blocks pid_s, pid_s + S, pid_s + 2S, ...). Per row block it

1. accumulates the p tile over K-slices, forming x_noisy = a x + s eps in registers from x and
   eps from N1 (tl.randn4x, four elements per Philox call): nothing of size M x K is written;
2. in the epilogue adds b_d, regenerates eps for the tile's own elements, forms D = p - eps and
   adds |D| and D^2 into per-program partial sums (loss, L1);
3. with gradients: G~ = sign D + 2 D (L2 without its 1/(M K), applied once to the K x K sums
   instead of to M x K elements), adds its column sums into db_d's partial, and for every
   K-slice adds G~^T x_noisy (x_noisy regenerated) into the program's own rows n of a
   per-group partial dW_d buffer.

Gradients in the same pass, not in a second kernel (a choice made by reasoning: it was written
on a machine without a GPU, and the interpreter's speed says nothing about a GPU's). The p tile,
and so G, of a (row block, column block) pair exists only inside the program that computed it,
and G may not be written out (M x K). A second kernel owning a dW_d tile (n, k) would need
G[m, n] for every m: it would recompute p, a third M x K x K GEMM above the two-GEMM floor
(docs/method.md section 4), or even once per k-block if it kept its dW_d tile in registers.
The same pass costs instead (a) accumulating dW_d's rows n in global memory, one read and write
of a BLOCK_N x K float32 strip per row block ((M / BLOCK_M) K^2 8 bytes in all, mostly L2
hits), and (b) generating eps twice per (element, column block) rather than once; a second
kernel recomputing p would pay (b) as well. The RNG is the cost to watch: Philox is 10 rounds
of 32-bit multiplies per four elements, regenerated K / BLOCK_N times, against 2 BLOCK_N
tensor-core FLOPs per regenerated element, so wide column blocks (BLOCK_N = 128, 256) would
matter, but none of those compiles without spills today (benchmarks/results/triton-aot-sm80-sm90.md):
the shipped config is 64 x 64. To be measured and tuned on an H100 / H200.

Determinism: no atomics. Each group owns its partial dW_d / db_d slice and each program its
loss partial; the slices are summed in a fixed order afterwards (torch.sum over a fixed-shape
buffer is deterministic). The result depends on the config (block sizes, S), which is fixed
per shape once autotuned (DREP_TRITON_AUTOTUNE=0 pins it across processes).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import rng
from . import _common
from ._common import join_scalar


@triton.jit
def _eps_tile(
    noise_ptr, offs_m, k_start, mask, K, seed, stride_em, stride_ek,
    BLOCK: tl.constexpr, HAS_NOISE: tl.constexpr, DTYPE: tl.constexpr,
):
    """eps at rows offs_m, columns k_start .. k_start + BLOCK - 1: the given noise, or N1.

    N1: column group q of row m is tl.randn4x(seed, m ceil(K / 4) + q); k_start is a multiple
    of BLOCK, itself a multiple of 4, so the tile holds whole groups: one Philox call per four
    elements, interleaved back into column order."""
    tl.static_assert(BLOCK % 4 == 0, "N1 tiles hold whole groups of four columns")
    if HAS_NOISE:
        # int64 columns: with a transposed layout offs_k * stride_ek reaches M K (past 2^31).
        offs_k = k_start + tl.arange(0, BLOCK).to(tl.int64)
        ptrs = noise_ptr + offs_m[:, None] * stride_em + offs_k[None, :] * stride_ek
        eps = tl.load(ptrs, mask=mask, other=0.0).to(DTYPE)
    else:
        offs_q = k_start // 4 + tl.arange(0, BLOCK // 4)
        counter = offs_m[:, None] * ((K + 3) // 4) + offs_q[None, :]
        n0, n1, n2, n3 = tl.randn4x(seed, counter)
        # join(join(n0, n2), join(n1, n3))[m, q, i, j] = n_{2 i + j}: row-major, column 4 q + 2 i + j.
        eps = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (offs_m.shape[0], BLOCK)).to(DTYPE)
    return eps


@triton.jit
def _noisy_tile(
    x_ptr, noise_ptr, offs_m, k_start, mask, K, seed, a, s,
    stride_xm, stride_xk, stride_em, stride_ek, BLOCK: tl.constexpr, HAS_NOISE: tl.constexpr, DTYPE: tl.constexpr,
):
    """x_noisy = a x + s eps (L1) at columns k_start .., 0 outside the matrix (out-of-range
    eps is not 0)."""
    offs_k = k_start + tl.arange(0, BLOCK).to(tl.int64)  # int64: offs_k * stride_xk may pass 2^31
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    eps = _eps_tile(noise_ptr, offs_m, k_start, mask, K, seed, stride_em, stride_ek, BLOCK, HAS_NOISE, DTYPE)
    return tl.where(mask, a * x.to(DTYPE) + s * eps, 0.0)


# Arguments that change from call to call (the seed every step, M with the batch): Triton must
# not specialize on their values (== 1, divisible by 16), or a new value compiles a new kernel
# (5 to 140 s) in the middle of training; the seed is typed int64 so that its width does not
# depend on its value either. K and the strides stay specialized: they are fixed per layer.
_DATA_ARGS = ("seed", "M")


@triton.jit(do_not_specialize=_DATA_ARGS)
def _denoise_loss_fwd_kernel(
    x_ptr, wd_ptr, bd_ptr, noise_ptr,
    loss_part_ptr, dw_part_ptr, db_part_ptr,
    M, K, seed: tl.int64, seed_ptr, a_hi, a_lo, s_hi, s_lo,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_em, stride_ek,
    loss_part_stride,
    HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
    DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    if SEED_FROM_PTR:
        # A seed drawn on the device: read here, never on the host, so a captured CUDA graph
        # replays the draw (a new seed every replay), not one frozen value.
        seed = tl.load(seed_ptr)
    # L1: p = (a x + s eps) W_d^T + b_d, D = p - eps, partial sums of |D| and D^2.
    # L2 (COMPUTE_GRAD): partial sums of G~ = sign D + 2 D over rows (db_d) and of G~^T x_noisy (dW_d).
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_groups = tl.num_programs(0)
    a = join_scalar(a_hi, a_lo, DTYPE)
    s = join_scalar(s_hi, s_lo, DTYPE)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < K
    if HAS_BIAS:
        bias = tl.load(bd_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(DTYPE)
    # Running sums of |D| and D^2, one per program: BLOCK_M x BLOCK_N accumulators would hold two
    # more tiles in registers across the whole loop for sums only read at the end (ptxas spills).
    abs_sum = tl.zeros((), dtype=DTYPE)
    sq_sum = tl.zeros((), dtype=DTYPE)
    db_acc = tl.zeros((BLOCK_N,), dtype=DTYPE)

    for mb in range(pid_s, tl.cdiv(M, BLOCK_M), num_groups):
        # int64 rows: N1's counters m ceil(K / 4) + q and the row offsets overflow int32 for big M K.
        offs_m = tl.cast(mb, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=DTYPE)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xn = _noisy_tile(
                x_ptr, noise_ptr, offs_m, k0, mask_m[:, None] & mask_k[None, :], K, seed, a, s,
                stride_xm, stride_xk, stride_em, stride_ek, BLOCK_K, HAS_NOISE, DTYPE,
            )
            # The W_d^T tile: element (k, n) is W_d[n, k] (offsets below K^2 + K: int32 is enough
            # for any K that fits a K x K float32 matrix in 8 GiB).
            w_ptrs = wd_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DTYPE)
            acc = tl.dot(xn, w, acc, input_precision=INPUT_PRECISION, out_dtype=DTYPE)
        if HAS_BIAS:
            acc += bias[None, :]
        mask_mn = mask_m[:, None] & mask_n[None, :]
        # The output tile's own eps: p's column n is eps's column n (both have width K).
        eps = _eps_tile(
            noise_ptr, offs_m, pid_n * BLOCK_N, mask_mn, K, seed, stride_em, stride_ek, BLOCK_N, HAS_NOISE, DTYPE,
        )
        d = tl.where(mask_mn, acc - eps, 0.0)
        abs_sum += tl.sum(tl.sum(tl.abs(d), axis=1), axis=0)
        sq_sum += tl.sum(tl.sum(d * d, axis=1), axis=0)
        if COMPUTE_GRAD:
            g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(DTYPE) + 2.0 * d  # sign(0) = 0
            db_acc += tl.sum(g, axis=0)
            g_t = tl.trans(g)
            dw_rows = dw_part_ptr + pid_s.to(tl.int64) * K * K + offs_n[:, None].to(tl.int64) * K
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                xn = _noisy_tile(
                    x_ptr, noise_ptr, offs_m, k0, mask_m[:, None] & mask_k[None, :], K, seed, a, s,
                    stride_xm, stride_xk, stride_em, stride_ek, BLOCK_K, HAS_NOISE, DTYPE,
                )
                ptrs = dw_rows + offs_k[None, :]
                mask_nk = mask_n[:, None] & mask_k[None, :]
                part = tl.load(ptrs, mask=mask_nk, other=0.0)
                part = tl.dot(g_t, xn, part, input_precision=INPUT_PRECISION, out_dtype=DTYPE)
                tl.store(ptrs, part, mask=mask_nk)
                # This program alone owns these dW_d rows, but the threads that store an element
                # need not be the ones that load it for the next row block: make the stores
                # visible block-wide before that read (a __syncthreads; no-op when interpreted).
                tl.debug_barrier()

    loss_idx = pid_s.to(tl.int64) * loss_part_stride + pid_n
    tl.store(loss_part_ptr + 2 * loss_idx, abs_sum)
    tl.store(loss_part_ptr + 2 * loss_idx + 1, sq_sum)
    if COMPUTE_GRAD:
        if HAS_BIAS:
            tl.store(db_part_ptr + pid_s.to(tl.int64) * K + offs_n, db_acc, mask=mask_n)


# Untuned (no GPU where this was written): the configs that compile without register spills for
# sm_80 and sm_90 on every dtype path (python -m benchmarks.triton_aot, tests/test_triton_aot.py;
# table in benchmarks/results/triton-aot-sm80-sm90.md). A program holds the p tile, then G~, its
# transpose and a (BLOCK_N, BLOCK_K) dW_d slice, and the IEEE float32 dot (the float32 default,
# and bf16 / fp16, computed in float32) runs on FMA units, each thread holding its rows and
# columns of both operands in registers (the second dot reduces over BLOCK_M): BLOCK_K = 32,
# 4 warps, or 128-wide tiles spill on the IEEE or float64 paths. maxnreg: without a register cap
# ptxas -O3 picks its own target, trading spills for occupancy; that is why 128 x 128 tiles came
# out at 32 registers with KBs of spills (nothing in the PTX forced 32: .reqntid 256 allows 255)
# and why these tiles spilled a few bytes at 128 registers (float64, L1 only). With .maxnreg it
# keeps them in registers (about 130 to 230: one 256-thread block per SM, as most builds had
# anyway). BLOCK_M = BLOCK_N = 64: TF32 runs on wgmma on sm_90 (64 rows per warp group).
_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=st, maxnreg=255)
    for st in (3, 2)
]
_DEFAULT = _CONFIGS[0]
_INTERPRET = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
_ACTIVE = _common.config(_CONFIGS, _DEFAULT, _INTERPRET)



def autotuned(configs: list[triton.Config], **autotune_options):
    """The loss kernel autotuned over ``configs``. Every buffer it writes partial sums into is
    zeroed before each timed config and again before the real launch (triton >= 3.6 resets
    ``reset_to_zero`` after timing): a cell that the winning config's grid does not write
    would otherwise keep what a config timed before it wrote, and the first call of every new
    shape would return a wrong loss."""
    return triton.autotune(
        configs=configs,
        key=["M", "K", "COMPUTE_GRAD", "HAS_NOISE"],
        reset_to_zero=["loss_part_ptr", "dw_part_ptr", "db_part_ptr"],
        **autotune_options,
    )(_denoise_loss_fwd_kernel)


_kernel = autotuned(_ACTIVE)

# Upper bound of the partial dW_d buffers (groups x K x K floats) beyond one group's K x K.
_PARTIAL_BYTES = 256 * 2**20


def _num_groups(M: int, K: int, device: torch.device, itemsize: int, min_block_m: int) -> int:
    """Row-block groups S for the gradient pass: enough programs (S x column blocks) to fill
    the GPU twice over, no more groups than row blocks, partial buffers bounded in memory."""
    m_blocks = triton.cdiv(M, min_block_m)
    if _common.INTERPRET:
        # Several groups with several row blocks each, so small test shapes cover both.
        return max(1, min(3, m_blocks))
    want = triton.cdiv(2 * _common.sm_count(device), triton.cdiv(K, 128))
    cap = max(1, _PARTIAL_BYTES // max(1, K * K * itemsize))
    return max(1, min(want, m_blocks, cap))


def denoise_loss_fwd(
    x: Tensor,
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    a: float,
    s: float,
    noise: Optional[Tensor],
    seed: Tensor,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss (L1) and, if asked, dL/dW_d and dL/db_d (L2); the torch backend's contract.

    x: (M, K) float16/bfloat16/float32/float64, any strides; denoise_weight: (K, K);
    denoise_bias: (K,) or None; noise: (M, K) or None (any float dtype, any strides); seed: 0-d
    int64 tensor, read by the kernel when it is on x's device (capture-safe), else on the host.
    Computed in float32 (float64 for float64 inputs).
    Returns loss (0-d), grad_weight (K, K), grad_bias (K,) in the compute dtype; the gradients
    are empty when ``compute_grad`` is False (grad_bias also without a bias).
    """
    return _denoise_loss(x, denoise_weight, denoise_bias, a, s, noise, seed, compute_grad, _kernel, _ACTIVE)


def _denoise_loss(x, denoise_weight, denoise_bias, a, s, noise, seed, compute_grad, kernel, configs, meta=None):
    """denoise_loss_fwd with ``kernel`` autotuned over ``configs``, or (tests) the plain
    kernel with one config's block sizes in ``meta``: the buffers are sized for the smallest.
    ``seed`` may also be a Python int (tests: the host-side path on any device)."""
    _common.check_device(x, denoise_weight, denoise_bias, noise)
    cdt = _common.compute_dtype(x.dtype)
    M, K = x.shape
    n = M * K
    has_bias = denoise_bias is not None

    def empty():  # a fresh tensor each: a custom op's outputs must not alias each other
        return x.new_empty(0, dtype=cdt)

    if n == 0:  # an empty batch has loss 0 and zero gradients
        loss = x.new_zeros((), dtype=cdt)
        if not compute_grad:
            return loss, empty(), empty()
        return loss, x.new_zeros((K, K), dtype=cdt), (x.new_zeros(K, dtype=cdt) if has_bias else empty())

    min_block_m = min(c.kwargs["BLOCK_M"] for c in configs)
    min_block_n = min(c.kwargs["BLOCK_N"] for c in configs)
    groups = _num_groups(M, K, x.device, torch.finfo(cdt).bits // 8, min_block_m) if compute_grad else None
    rows = groups if compute_grad else triton.cdiv(M, min_block_m)
    cols = triton.cdiv(K, min_block_n)
    # (|D| sum, D^2 sum) per program; zeros where a config's grid is smaller than the bound.
    loss_part = torch.zeros((rows, cols, 2), dtype=cdt, device=x.device)
    dw_part = torch.zeros((groups, K, K) if compute_grad else (1,), dtype=cdt, device=x.device)
    db_part = torch.zeros((groups, K) if compute_grad and has_bias else (1,), dtype=cdt, device=x.device)

    def grid(meta):
        m_programs = groups if compute_grad else triton.cdiv(M, meta["BLOCK_M"])
        return (m_programs, triton.cdiv(K, meta["BLOCK_N"]))

    a_hi, a_lo = _common.split_scalar(a)
    s_hi, s_lo = _common.split_scalar(s)
    bias = denoise_bias if has_bias else denoise_weight  # placeholder pointer, never read
    eps = noise if noise is not None else x
    seed_from_ptr = noise is None and isinstance(seed, Tensor) and seed.device == x.device
    if noise is not None or seed_from_ptr:
        seed_value = 0
    else:
        seed_value = seed if isinstance(seed, int) else rng.seed_from_tensor(seed)
    kernel[grid](
        x, denoise_weight, bias, eps,
        loss_part, dw_part, db_part,
        M, K, seed_value, seed if seed_from_ptr else x, a_hi, a_lo, s_hi, s_lo,
        x.stride(0), x.stride(1), denoise_weight.stride(0), denoise_weight.stride(1),
        denoise_bias.stride(0) if has_bias else 0, eps.stride(0), eps.stride(1),
        cols,
        HAS_BIAS=has_bias, HAS_NOISE=noise is not None, COMPUTE_GRAD=compute_grad, SEED_FROM_PTR=seed_from_ptr,
        DTYPE=tl.float64 if cdt == torch.float64 else tl.float32,
        INPUT_PRECISION=_common.input_precision(cdt),
        **(meta or {}),
    )
    # Fixed-order reductions of the partials (deterministic), the mean's 1 / (M K) applied once.
    loss = loss_part.to(torch.float64).sum().div(n).to(cdt)
    if not compute_grad:
        return loss, empty(), empty()
    grad_weight = (dw_part[0] if groups == 1 else dw_part.sum(0)).mul_(1.0 / n)
    grad_bias = (db_part[0] if groups == 1 else db_part.sum(0)).mul_(1.0 / n) if has_bias else empty()
    return loss, grad_weight, grad_bias
