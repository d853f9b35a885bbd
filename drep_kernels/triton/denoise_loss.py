"""Triton denoising loss (docs/method.md, L1 and L2): three tensor-core launches per row chunk.

x (M x K) is processed in chunks of R rows (x_noisy and G' of R rows within ``CHUNK_BYTES``,
R a multiple of 128), in order. Per chunk, with GEMM dtype T (the input dtype,
``drep_kernels.precision``):

1. ``_noisy_input_kernel``: x_noisy = a x + s eps (L1) formed in float32 (float64), rounded
   once to T into the chunk buffer (R x K, row-major). eps is N1's stream, tl.randn4x: one
   Philox call per four elements, or the given noise; x and noise are read through strides.
2. ``_loss_gemm_kernel``: p = x_noisy W_d^T on tensor cores (bf16 / fp16 operands, or TF32 /
   IEEE float32 as torch's matmuls; float32 accumulation), and in the epilogue, with p still in
   registers: + b_d, eps regenerated for the tile (one Philox call per four elements, the same
   code as step 1, so bit-for-bit the same eps), D = p - eps, the program's sums of |D| and D^2,
   and with gradients G' = sign D + 2 D: its column sums (db_d) and G' itself, written in T over
   the chunk's G' buffer (float16: times 2^-14, saturating). p never reaches memory.
3. ``_grad_gemm_kernel``: dL/dW_d += alpha G'^T x_noisy, float32 accumulation on tensor cores,
   into the K x K float32 result in place (chunk 0 writes it, later chunks add: beta = 1);
   alpha = 1 / (M K) over G's scale, so no pass over dL/dW_d follows (float32; float64 is
   scaled after the loop).

Around the loop: one fill (the partial-sum buffers, zeroed together) before it, and after it
``_finalize_kernel``: the loss and dL/db_d from all partials, in float64, divided by M K.

Per element of x (bf16): x read once (2 B) and the noise drawn once in step 1; x_noisy written
(2 B) and read by both GEMMs; eps drawn once more in step 2's epilogue; G' written (2 B) and
read once. Two Philox calls per four elements in all, 2 M K^2 FLOPs per GEMM, three launches
per chunk plus two. Nothing of size M x K outlives the call; the workspace is two R x K buffers
in T (together at most 64 MiB: 2^24 elements of bf16 / fp16, 2^23 of float32, 2^22 of
float64), the K x K result and per-program partial sums. benchmarks/costmodel counts the same
per shape.

Determinism: no atomics. Every program writes its own partial-sum cells, which
``_finalize_kernel`` sums in a fixed order (loops over a fixed-shape buffer); each dW_d tile is
owned by one program that walks the chunk's rows in order, and chunks are added in order.
Results depend on the config (block sizes), fixed per shape once autotuned
(DREP_TRITON_AUTOTUNE=0 pins the default, the first config of the kernel ``_kernels`` picks).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import precision, rng
from . import _common
from ._common import dot, grouped_tile, join_scalar, rounded, tl_dtype

# Chunk budget in bytes of the two chunk buffers, x_noisy and G' in the GEMM dtype (rows are a
# multiple of 128, at least 128). Tests lower it to run several chunks on small shapes.
CHUNK_BYTES = 64 << 20
_ROW_QUANTUM = 128  # chunk rows are a multiple of every BLOCK_M: row blocks never straddle chunks


@triton.jit
def _eps_tile(
    noise_ptr, offs_m, k_start, mask, K, seed, stride_em, stride_ek,
    BLOCK: tl.constexpr, HAS_NOISE: tl.constexpr, DTYPE: tl.constexpr,
):
    """eps at rows offs_m (int64), columns k_start .. k_start + BLOCK - 1: the given noise, or N1.

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
def _seed(seed, seed_ptr, SEED_FROM_PTR: tl.constexpr):
    # A seed drawn on the device is read here, never on the host, so a captured CUDA graph
    # replays the draw (a new seed every replay), not one frozen value.
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    return seed


# Arguments that change from call to call (the seed every step, rows with the batch and the
# chunk): Triton must not specialize on their values (== 1, divisible by 16), or a new value
# compiles a new kernel (5 to 140 s) in the middle of training; the seed is typed int64 so that
# its width does not depend on its value either. K and the strides stay specialized: they are
# fixed per layer.
_DATA_ARGS = ("seed", "row0", "R")


@triton.jit(do_not_specialize=_DATA_ARGS)
def _noisy_input_kernel(
    x_ptr, noise_ptr, xn_ptr,
    row0, R, K, seed: tl.int64, seed_ptr, a_hi, a_lo, s_hi, s_lo,
    stride_xm, stride_xk, stride_em, stride_ek,
    HAS_NOISE: tl.constexpr, SEED_FROM_PTR: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # L1's x_noisy = a x + s eps for rows row0 .. row0 + R - 1, rounded once to xn's dtype.
    seed = _seed(seed, seed_ptr, SEED_FROM_PTR)
    offs_r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows within the chunk
    k0 = tl.program_id(1) * BLOCK_K
    # int64 columns and rows of x: x is the whole M x K input, any strides (past 2^31 elements).
    offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    offs_m = row0 + offs_r.to(tl.int64)
    mask = (offs_r < R)[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    eps = _eps_tile(noise_ptr, offs_m, k0, mask, K, seed, stride_em, stride_ek, BLOCK_K, HAS_NOISE, ACC_DTYPE)
    a = join_scalar(a_hi, a_lo, ACC_DTYPE)
    s = join_scalar(s_hi, s_lo, ACC_DTYPE)
    xn = a * x.to(ACC_DTYPE) + s * eps
    # Chunk offsets r K + k stay below R K <= 2^31 (checked on the host): int32 is enough.
    ptrs = xn_ptr + offs_r[:, None] * K + offs_k[None, :]
    tl.store(ptrs, rounded(xn, xn_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_DATA_ARGS)
def _loss_gemm_kernel(
    xn_ptr, wd_ptr, bd_ptr, noise_ptr, g_ptr, loss_part_ptr, db_part_ptr,
    row0, R, K, seed: tl.int64, seed_ptr, grad_scale,
    stride_wn, stride_wk, stride_b, stride_em, stride_ek, part_cols,
    HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
    GEMM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SATURATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # L1: p = x_noisy W_d^T + b_d, D = p - eps, the program's sums of |D| and D^2.
    # L2 (COMPUTE_GRAD): G' = sign D + 2 D, its column sums (db_d) and G' in GEMM_DTYPE.
    seed = _seed(seed, seed_ptr, SEED_FROM_PTR)
    # GROUP_M row blocks share each W_d column block while it is in L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(R, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < R
    mask_n = offs_n < K
    offs_kl = tl.arange(0, BLOCK_K)
    # W_d^T's element (k, n) is W_d[n, k]; offsets below K^2 + K (int32: K x K fits in 8 GiB).
    xn_ptrs = xn_ptr + offs_r[:, None] * K + offs_kl[None, :]
    w_ptrs = wd_ptr + offs_n[None, :] * stride_wn + offs_kl[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_kl < K
        xn = tl.load(xn_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(GEMM_DTYPE)
        acc = dot(xn, w, acc, INPUT_PRECISION, ACC_DTYPE)
        xn_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bd_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    mask = mask_r[:, None] & mask_n[None, :]
    offs_m = row0 + offs_r.to(tl.int64)  # N1 counts rows of the whole input (int64 counters)
    eps = _eps_tile(noise_ptr, offs_m, pid_n * BLOCK_N, mask, K, seed, stride_em, stride_ek, BLOCK_N, HAS_NOISE, ACC_DTYPE)
    d = tl.where(mask, acc - eps, 0.0)
    part = (pid_m.to(tl.int64) * part_cols + pid_n) * 2
    tl.store(loss_part_ptr + part, tl.sum(tl.sum(tl.abs(d), axis=1), axis=0))
    tl.store(loss_part_ptr + part + 1, tl.sum(tl.sum(d * d, axis=1), axis=0))
    if COMPUTE_GRAD:
        g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(ACC_DTYPE) + 2.0 * d  # sign(0) = 0
        if HAS_BIAS:
            tl.store(db_part_ptr + pid_m.to(tl.int64) * K + offs_n, tl.sum(g, axis=0), mask=mask_n)
        g = g * grad_scale
        if SATURATE:  # float16: its largest finite value instead of inf; NaN stays NaN
            g = tl.where(g != g, g, tl.minimum(tl.maximum(g, -65504.0), 65504.0))
        tl.store(g_ptr + offs_r[:, None] * K + offs_n[None, :], rounded(g, GEMM_DTYPE), mask=mask)


@triton.jit(do_not_specialize=("R",))
def _grad_gemm_kernel(
    g_ptr, xn_ptr, dw_ptr, R, K, alpha,
    ACCUMULATE: tl.constexpr, GEMM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_N: tl.constexpr,
):
    # L2: dW_d[n, k] (+)= alpha sum over the chunk's rows r of G'[r, n] x_noisy[r, k], in
    # ACC_DTYPE; alpha = 1 / (M K grad_scale) turns G' into G (no scaling pass afterwards).
    # The operands go to the dot as stored: GEMM_DTYPE states their dtype, as the loss kernel's
    # does (benchmarks/triton_aot.py reads it to know a tensor-core path).
    tl.static_assert(
        (GEMM_DTYPE == g_ptr.dtype.element_ty) & (GEMM_DTYPE == xn_ptr.dtype.element_ty),
        "G' and x_noisy must be stored in GEMM_DTYPE",
    )
    pid_n, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(K, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < K
    mask_k = offs_k < K
    offs_rl = tl.arange(0, BLOCK_R)
    gt_ptrs = g_ptr + offs_rl[None, :] * K + offs_n[:, None]  # G'^T: (n, r) reads G'[r, n]
    xn_ptrs = xn_ptr + offs_rl[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        mask_r = r0 + offs_rl < R
        gt = tl.load(gt_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        xn = tl.load(xn_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc = dot(gt, xn, acc, INPUT_PRECISION, ACC_DTYPE)
        gt_ptrs += BLOCK_R * K
        xn_ptrs += BLOCK_R * K
    # float32 only: Triton passes alpha as a float32 scalar. float64 (not a speed path) is
    # scaled by the host afterwards: a float32 hi + lo pair joined here spills on sm_80, and a
    # float64-annotated scalar is rounded to float32 by the interpreter.
    if ACC_DTYPE == tl.float32:
        acc = acc * alpha
    mask = mask_n[:, None] & mask_k[None, :]
    dw_ptrs = dw_ptr + offs_n[:, None] * K + offs_k[None, :]
    if ACCUMULATE:  # beta = 1: the chunks before this one
        acc += tl.load(dw_ptrs, mask=mask, other=0.0)
    tl.store(dw_ptrs, acc, mask=mask)


@triton.jit(do_not_specialize=("n_loss", "db_rows"))  # both change with M: no recompiles
def _finalize_kernel(
    loss_part_ptr, n_loss, db_part_ptr, db_rows, K, n_hi, n_lo, loss_ptr, db_ptr,
    HAS_DB: tl.constexpr, BLOCK: tl.constexpr,
):
    # The call's results from the partial sums of every chunk, in float64 and a fixed order
    # (deterministic), the mean's 1 / (M K) applied once: program p sums the db_d partials of
    # columns p BLOCK .. (rows in order); program 0 also sums all loss partials.
    n = join_scalar(n_hi, n_lo, tl.float64)
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if HAS_DB:
        cols = pid * BLOCK + offs
        mask = cols < K
        col_sum = tl.zeros((BLOCK,), dtype=tl.float64)
        ptrs = db_part_ptr + cols  # pointers step by K per row: no int32 product r K
        for _ in range(0, db_rows):
            col_sum += tl.load(ptrs, mask=mask, other=0.0).to(tl.float64)
            ptrs += K
        tl.store(db_ptr + cols, (col_sum / n).to(db_ptr.dtype.element_ty), mask=mask)
    if pid == 0:
        total = tl.zeros((BLOCK,), dtype=tl.float64)
        for i in range(0, n_loss, BLOCK):
            total += tl.load(loss_part_ptr + i + offs, mask=i + offs < n_loss, other=0.0).to(tl.float64)
        tl.store(loss_ptr, (tl.sum(total, axis=0) / n).to(loss_ptr.dtype.element_ty))


_FINALIZE_BLOCK = 1024


# Untuned (no GPU where this was written): configs that compile without spills for sm_80 and
# sm_90 on every dtype path with triton 3.6 and 3.8 (python -m benchmarks.triton_aot; tables in
# benchmarks/results/triton-aot-sm80-sm90*.md).
# - x_noisy: 16 elements per thread on 4 warps. 32 per thread spill under triton 3.6 (its ptxas
#   holds them in 128 registers), and 32 x 128 on 8 warps under triton 3.9 (it aims at 80).
# - The loss GEMM: 64-row tiles (one wgmma warp group's rows) on 8 warps, with maxnreg=255:
#   without a cap ptxas aims at 128 registers on its own and spills the epilogue's Philox /
#   Box-Muller state (tf32 and bf16 at 128 x 64); with it the tensor-core paths take 80 to 160
#   registers and the FMA paths (IEEE float32, float64) up to 255, spill-free. 128 x 64 still
#   spills 4 B (IEEE float32, sm_90, triton 3.6) and 128 x 128 up to 400 B on those paths.
# - Wider tiles where they compile clean: bf16 / fp16 run the loss GEMM on 128 x 128 tiles first
#   (235 to 246 registers; TF32 spills 32 to 36 B on sm_90 there), which read each operand from
#   L2 half as often as 64 x 128 ones (the cost model's bound on this GEMM, benchmarks/costmodel);
#   bf16 / fp16 / TF32 may also autotune the dL/dW_d GEMM to 128 x 128 dW_d tiles (IEEE float32
#   spills 256 B on sm_80 there, triton 3.8).
_NOISY_CONFIG = {"BLOCK_M": 16, "BLOCK_K": 128}
_NOISY_WARPS = 4
_LOSS_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": bn, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3, maxnreg=255)
    for bn in (128, 64)
]
_GRAD_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_R": 32, "GROUP_N": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 32, "GROUP_N": 8}, num_warps=4, num_stages=3),
]
_LOSS_CONFIGS_128 = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3, maxnreg=255)
] + _LOSS_CONFIGS
# The dW_d GEMM's 128 x 128 tiles come last, for the autotuner only: its K x K output has few
# tiles (36 at K = 768), and without a split over rows fewer tiles leave more SMs idle.
_GRAD_CONFIGS_128 = _GRAD_CONFIGS + [
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_R": 32, "GROUP_N": 8}, num_warps=8, num_stages=3)
]
_LOSS_INTERPRET = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1)
_GRAD_INTERPRET = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 32, "GROUP_N": 2}, num_warps=4, num_stages=1)


def loss_kernel(configs: list[triton.Config], **autotune_options):
    """``_loss_gemm_kernel`` autotuned over ``configs``. Its partial-sum buffers (one chunk's
    views) are zeroed before each timed config and before the real launch: a cell that the
    winning config's grid does not write would otherwise keep what a config timed before it
    wrote, and the first call of every new shape would return a wrong loss."""
    return triton.autotune(
        configs=configs,
        key=["K", "HAS_BIAS", "HAS_NOISE", "COMPUTE_GRAD"],
        reset_to_zero=["loss_part_ptr", "db_part_ptr"],
        **autotune_options,
    )(_loss_gemm_kernel)


def grad_kernel(configs: list[triton.Config], **autotune_options):
    """``_grad_gemm_kernel`` autotuned over ``configs``; dW_d, which it adds to in place, is
    restored after each timed config."""
    return triton.autotune(
        configs=configs, key=["K", "ACCUMULATE"], restore_value=["dw_ptr"], **autotune_options
    )(_grad_gemm_kernel)


_loss_kernel = loss_kernel(_common.config(_LOSS_CONFIGS, _LOSS_CONFIGS[0], _LOSS_INTERPRET))
_grad_kernel = grad_kernel(_common.config(_GRAD_CONFIGS, _GRAD_CONFIGS[0], _GRAD_INTERPRET))
_loss_kernel_128 = loss_kernel(_common.config(_LOSS_CONFIGS_128, _LOSS_CONFIGS_128[0], _LOSS_INTERPRET))
_grad_kernel_128 = grad_kernel(_common.config(_GRAD_CONFIGS_128, _GRAD_CONFIGS_128[0], _GRAD_INTERPRET))


def _kernels(gemm: torch.dtype):
    """The (loss, dL/dW_d) autotuned kernels for GEMM operands of dtype ``gemm``: those with
    128 x 128 tile configs on the paths where these compile without spills."""
    half = gemm in precision.HALF_DTYPES
    tensor_cores = precision.tensor_core_dot(gemm)
    return (_loss_kernel_128 if half else _loss_kernel), (_grad_kernel_128 if tensor_cores else _grad_kernel)


def chunk_rows(M: int, K: int, itemsize: int) -> int:
    """Rows per chunk for a GEMM dtype of ``itemsize`` bytes: the budget over x_noisy's and G''s
    bytes per element, a multiple of 128 (at least 128), at most M."""
    elems = CHUNK_BYTES // (2 * itemsize)
    return min(M, max(elems // K // _ROW_QUANTUM * _ROW_QUANTUM, _ROW_QUANTUM))


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
    """Loss (L1) and, if asked, dL/dW_d and dL/db_d (L2); the torch backend's contract under
    the tensor-core precision policy (``drep_kernels.precision``).

    x: (M, K) float16/bfloat16/float32/float64, any strides; denoise_weight: (K, K), x's dtype;
    denoise_bias: (K,) or None; noise: (M, K) or None (any float dtype, any strides); seed: 0-d
    int64 tensor, read by the kernels when it is on x's device (capture-safe), else on the host.
    Returns loss (0-d), grad_weight (K, K), grad_bias (K,) in float32 (float64 for float64);
    the gradients are empty when ``compute_grad`` is False (grad_bias also without a bias).
    """
    loss_kern, grad_kern = _kernels(precision.gemm_dtype(x.dtype, tensor_cores=True))
    return _denoise_loss(x, denoise_weight, denoise_bias, a, s, noise, seed, compute_grad, loss_kern, grad_kern)


def _denoise_loss(x, denoise_weight, denoise_bias, a, s, noise, seed, compute_grad, loss_kern, grad_kern, meta=None):
    """denoise_loss_fwd with the given (autotuned) kernels, or (tests) plain kernels with the
    block sizes ``meta`` = (loss config kwargs, grad config kwargs). ``seed`` may also be a
    Python int (tests: the host-side path on any device)."""
    _common.check_device(x, denoise_weight, denoise_bias, noise)
    cdt = precision.accumulate_dtype(x.dtype)
    gemm = precision.gemm_dtype(x.dtype, tensor_cores=True)
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

    rows = chunk_rows(M, K, gemm.itemsize)
    if rows * K >= 2**31:
        raise ValueError(f"K = {K} is too wide for the triton loss (a {rows}-row chunk passes 2^31 elements)")
    chunks = triton.cdiv(M, rows)
    loss_meta, grad_meta = meta if meta is not None else ({}, {})
    # Partial sums per chunk, sized for the smallest blocks any config may use; zero where a
    # config's grid is smaller.
    min_m = min(c.kwargs["BLOCK_M"] for c in _configs(loss_kern, loss_meta))
    min_n = min(c.kwargs["BLOCK_N"] for c in _configs(loss_kern, loss_meta))
    part_rows, part_cols = triton.cdiv(rows, min_m), triton.cdiv(K, min_n)
    # One zeroed allocation (one fill launch) for both partial buffers; db_part starts 16
    # elements aligned, as its own allocation would: Triton specializes pointer arguments on
    # 16-byte alignment, and a batch size that moved it would compile new kernel variants.
    db_shape = (chunks, part_rows, K) if compute_grad and has_bias else (chunks, 1)
    loss_numel = -(-chunks * part_rows * part_cols * 2 // 16) * 16
    parts = torch.zeros(loss_numel + math.prod(db_shape), dtype=cdt, device=x.device)
    loss_part = parts[: chunks * part_rows * part_cols * 2].view(chunks, part_rows, part_cols, 2)
    db_part = parts[loss_numel:].view(db_shape)
    xn = torch.empty((rows, K), dtype=gemm, device=x.device)
    g = torch.empty((rows, K), dtype=gemm, device=x.device) if compute_grad else xn
    grad_weight = torch.empty((K, K), dtype=cdt, device=x.device) if compute_grad else None

    a_hi, a_lo = _common.split_scalar(a)
    s_hi, s_lo = _common.split_scalar(s)
    eps = noise if noise is not None else x  # placeholder pointer when N1 draws the noise
    seed_from_ptr = noise is None and isinstance(seed, Tensor) and seed.device == x.device
    if noise is not None or seed_from_ptr:
        seed_value = 0
    else:
        seed_value = seed if isinstance(seed, int) else rng.seed_from_tensor(seed)
    seed_ptr = seed if seed_from_ptr else x
    acc_dt, gemm_dt = tl_dtype(cdt), tl_dtype(gemm)
    dot_precision = precision.dot_precision(gemm)
    scale = precision.grad_scale(gemm)
    alpha = 1.0 / (n * scale)
    bias = denoise_bias if has_bias else denoise_weight  # placeholder pointer, never read

    for c in range(chunks):
        row0 = c * rows
        R = min(rows, M - row0)
        noisy_grid = (triton.cdiv(R, _NOISY_CONFIG["BLOCK_M"]), triton.cdiv(K, _NOISY_CONFIG["BLOCK_K"]))
        _noisy_input_kernel[noisy_grid](
            x, eps, xn, row0, R, K, seed_value, seed_ptr, a_hi, a_lo, s_hi, s_lo,
            x.stride(0), x.stride(1), eps.stride(0), eps.stride(1),
            HAS_NOISE=noise is not None, SEED_FROM_PTR=seed_from_ptr, ACC_DTYPE=acc_dt,
            num_warps=_NOISY_WARPS, **_NOISY_CONFIG,
        )

        def loss_grid(meta, R=R):
            return (triton.cdiv(R, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

        loss_kern[loss_grid](
            xn, denoise_weight, bias, eps, g, loss_part[c], db_part[c],
            row0, R, K, seed_value, seed_ptr, scale,
            denoise_weight.stride(0), denoise_weight.stride(1), denoise_bias.stride(0) if has_bias else 0,
            eps.stride(0), eps.stride(1), part_cols,
            HAS_BIAS=has_bias, HAS_NOISE=noise is not None, COMPUTE_GRAD=compute_grad, SEED_FROM_PTR=seed_from_ptr,
            GEMM_DTYPE=gemm_dt, ACC_DTYPE=acc_dt, INPUT_PRECISION=dot_precision, SATURATE=gemm == torch.float16,
            **loss_meta,
        )
        if compute_grad:
            def grad_grid(meta):
                return (triton.cdiv(K, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)

            grad_kern[grad_grid](
                g, xn, grad_weight, R, K, alpha,
                ACCUMULATE=c > 0, GEMM_DTYPE=gemm_dt, ACC_DTYPE=acc_dt, INPUT_PRECISION=dot_precision, **grad_meta,
            )
    loss = x.new_empty((), dtype=cdt)
    grad_bias = x.new_empty(K, dtype=cdt) if compute_grad and has_bias else empty()
    n_hi, n_lo = _common.split_scalar(float(n))
    has_db = grad_bias.numel() > 0
    _finalize_kernel[(triton.cdiv(K, _FINALIZE_BLOCK) if has_db else 1,)](
        loss_part, loss_part.numel(), db_part, chunks * part_rows, K, n_hi, n_lo, loss, grad_bias,
        HAS_DB=has_db, BLOCK=_FINALIZE_BLOCK,
    )
    if not compute_grad:
        return loss, empty(), empty()
    if cdt == torch.float64:  # the alpha _grad_gemm_kernel applies to float32 only
        grad_weight.mul_(alpha)
    return loss, grad_weight, grad_bias


def _configs(kernel, meta: dict) -> list[triton.Config]:
    """The configs ``kernel`` may launch with: its autotuner's, or the one ``meta`` fixes."""
    return [triton.Config(meta)] if meta else list(kernel.configs)
