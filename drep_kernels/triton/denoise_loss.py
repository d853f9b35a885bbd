"""Triton denoising loss (docs/method.md, L1 and L2): per row chunk, a noise pass and two GEMMs.

x (M x K) is processed in chunks of R rows (x_noisy and eps / G' of R rows within
``CHUNK_BYTES``, R a multiple of 128), in order. Per chunk, with GEMM dtype T (the input dtype,
``drep_kernels.precision``):

1. ``_noisy_input_kernel``: eps (N1's stream, tl.randn4x: one Philox call per four elements, or
   the given noise) rounded once to T and stored in the chunk's eps / G' buffer; x_noisy = a x
   + s eps (L1) formed from that eps in float32 (float64), rounded once to T into the x_noisy
   buffer (both R x K, row-major). x and noise are read through strides.
2. ``_loss_gemm_kernel``: p = x_noisy W_d^T on tensor cores (bf16 / fp16 operands, or TF32 /
   IEEE float32 as torch's matmuls; float32 accumulation), and in the epilogue, with p still in
   registers: + b_d, the tile's eps loaded, D = p - eps, the program's sums of |D| and D^2, and
   with gradients G' = sign D + 2 D: its column sums (db_d) and G' itself, written in T over
   the eps it was formed from (float16: times 2^-14, saturating). p never reaches memory.
3. ``_grad_gemm_kernel``: dL/dW_d += alpha G'^T x_noisy, float32 accumulation on tensor cores,
   into the K x K float32 result in place (chunk 0 writes it, later chunks add: beta = 1);
   alpha = 1 / (M K) over G's scale, so no pass over dL/dW_d follows (float32; float64 is
   scaled after the loop). Where dL/dW_d has too few tiles to fill the GPU (``grad_splits``:
   K up to 1024 on 132 SMs), the chunk's rows are split: each split writes its partial
   to a workspace slab and 4. ``_split_sum_kernel`` adds the slabs to dL/dW_d in split order.

Around the loop: one fill (the partial-sum buffers, zeroed together) before it, and after it
``_finalize_kernel``: the loss and dL/db_d from all partials, in float64, divided by M K.

Per element of x (bf16): x read once (2 B) and the noise drawn once, in step 1; eps written
(2 B) and read once; x_noisy written (2 B) and read by both GEMMs; G' written (2 B) and read
once. One Philox call per four elements: storing eps (4 B of traffic per element) costs less
than drawing it again in the epilogue (about 30 us per pass at M = 12608, K = 768 on an H100,
issue 12's anchor), and the epilogue keeps no Philox state in registers. 2 M K^2 FLOPs per
GEMM, three launches per chunk (four with a split; two without gradients) plus two. Nothing of
size M x K outlives the call; the workspace is two R x K buffers in T (together at most 64 MiB:
each at most 2^24 elements of bf16 / fp16, 2^23 of float32, 2^22 of float64), the K x K result,
the split slabs (at most one wave of 128 x 128 tiles: 8.7 MB of float32 on 132 SMs, float64
twice that) and per-program partial sums. benchmarks/costmodel counts the same per shape.

Determinism: no atomics. Every program writes its own partial-sum cells, which
``_finalize_kernel`` sums in a fixed order (loops over a fixed-shape buffer); each dW_d tile is
owned by one program per split that walks the split's rows in order, splits and chunks are
added in order. Results depend on the config (block sizes), fixed per shape once autotuned
(DREP_TRITON_AUTOTUNE=0 pins the default, the first config of the kernel ``_kernels`` picks),
and on the split count (fixed by M, K and the GPU's SM count).
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

# Chunk budget in bytes of the two chunk buffers, x_noisy and eps / G' in the GEMM dtype (rows
# are a multiple of 128, at least 128). Tests lower it to run several chunks on small shapes.
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
    x_ptr, noise_ptr, xn_ptr, eps_ptr,
    row0, R, K, seed: tl.int64, seed_ptr, a_hi, a_lo, s_hi, s_lo,
    stride_xm, stride_xk, stride_em, stride_ek,
    HAS_NOISE: tl.constexpr, SEED_FROM_PTR: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # L1's eps for rows row0 .. row0 + R - 1, rounded once to the GEMM dtype (eps's and xn's):
    # stored for the loss kernel's epilogue; and x_noisy = a x + s eps from that eps, rounded
    # once to the GEMM dtype.
    seed = _seed(seed, seed_ptr, SEED_FROM_PTR)
    offs_r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows within the chunk
    k0 = tl.program_id(1) * BLOCK_K
    # int64 columns and rows of x: x is the whole M x K input, any strides (past 2^31 elements).
    offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    offs_m = row0 + offs_r.to(tl.int64)
    mask = (offs_r < R)[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    eps = _eps_tile(noise_ptr, offs_m, k0, mask, K, seed, stride_em, stride_ek, BLOCK_K, HAS_NOISE, ACC_DTYPE)
    eps = rounded(eps, eps_ptr.dtype.element_ty)
    a = join_scalar(a_hi, a_lo, ACC_DTYPE)
    s = join_scalar(s_hi, s_lo, ACC_DTYPE)
    xn = a * x.to(ACC_DTYPE) + s * eps.to(ACC_DTYPE)
    # Chunk offsets r K + k stay below R K <= 2^31 (checked on the host): int32 is enough.
    offs = offs_r[:, None] * K + offs_k[None, :]
    tl.store(eps_ptr + offs, eps, mask=mask)
    tl.store(xn_ptr + offs, rounded(xn, xn_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=("R",))
def _loss_gemm_kernel(
    xn_ptr, wd_ptr, bd_ptr, g_ptr, loss_part_ptr, db_part_ptr,
    R, K, grad_scale, stride_wn, stride_wk, stride_b, part_cols,
    HAS_BIAS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    GEMM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SATURATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # L1: p = x_noisy W_d^T + b_d, D = p - eps, the program's sums of |D| and D^2; eps is read
    # from g_ptr, where _noisy_input_kernel stored it (in GEMM_DTYPE).
    # L2 (COMPUTE_GRAD): G' = sign D + 2 D, its column sums (db_d) and G' in GEMM_DTYPE, stored
    # over the eps tile it was formed from (this program's own: no other program reads it).
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
    g_ptrs = g_ptr + offs_r[:, None] * K + offs_n[None, :]
    eps = tl.load(g_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
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
        tl.store(g_ptrs, rounded(g, GEMM_DTYPE), mask=mask)


@triton.jit(do_not_specialize=("R", "split_rows"))
def _grad_gemm_kernel(
    g_ptr, xn_ptr, dw_ptr, R, K, split_rows, alpha,
    ACCUMULATE: tl.constexpr, GEMM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_N: tl.constexpr,
):
    # L2: dW_d[n, k] (+)= alpha sum over the chunk's rows r of G'[r, n] x_noisy[r, k], in
    # ACC_DTYPE; alpha = 1 / (M K grad_scale) turns G' into G (no scaling pass afterwards).
    # Split over rows: program p sums the rows of split p // tiles (split_rows of them, from
    # split p // tiles times split_rows) for dW_d tile p % tiles, into the split's own K x K
    # slab at dw_ptr (one split: dW_d itself; several: a workspace _split_sum_kernel adds up).
    # The operands go to the dot as stored: GEMM_DTYPE states their dtype, as the loss kernel's
    # does (benchmarks/triton_aot.py reads it to know a tensor-core path).
    tl.static_assert(
        (GEMM_DTYPE == g_ptr.dtype.element_ty) & (GEMM_DTYPE == xn_ptr.dtype.element_ty),
        "G' and x_noisy must be stored in GEMM_DTYPE",
    )
    tiles_n = tl.cdiv(K, BLOCK_N)
    tiles_k = tl.cdiv(K, BLOCK_K)
    split = tl.program_id(0) // (tiles_n * tiles_k)
    pid_n, pid_k = grouped_tile(tl.program_id(0) - split * tiles_n * tiles_k, tiles_n, tiles_k, GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < K
    mask_k = offs_k < K
    rows = tl.minimum(R - split * split_rows, split_rows)  # the split's rows, from row split * split_rows
    offs_rl = tl.arange(0, BLOCK_R)
    # Chunk offsets r K + k stay below R K <= 2^31 (checked on the host): int32 is enough.
    first = split * split_rows * K
    gt_ptrs = g_ptr + first + offs_rl[None, :] * K + offs_n[:, None]  # G'^T: (n, r) reads G'[r, n]
    xn_ptrs = xn_ptr + first + offs_rl[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    for r0 in range(0, rows, BLOCK_R):
        mask_r = r0 + offs_rl < rows
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
    dw_ptrs = dw_ptr + split.to(tl.int64) * K * K + offs_n[:, None] * K + offs_k[None, :]
    if ACCUMULATE:  # beta = 1: the chunks before this one (one split only)
        acc += tl.load(dw_ptrs, mask=mask, other=0.0)
    tl.store(dw_ptrs, acc, mask=mask)


@triton.jit(do_not_specialize=("splits",))
def _split_sum_kernel(ws_ptr, dw_ptr, splits, numel, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    # dW_d (+)= the chunk's split partials (splits slabs of numel = K^2 at ws_ptr), added in
    # split order after the chunks before (ACCUMULATE): a fixed order, so deterministic.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if ACCUMULATE:
        total = tl.load(dw_ptr + offs, mask=mask, other=0.0)
    else:
        total = tl.zeros((BLOCK,), dtype=dw_ptr.dtype.element_ty)
    ptrs = ws_ptr + offs  # steps by numel per split: no int32 product split K^2
    for _ in range(0, splits):
        total += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += numel
    tl.store(dw_ptr + offs, total, mask=mask)


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
_SPLIT_SUM_BLOCK = 1024

# dL/dW_d's split over rows. Its K x K output has few tiles for a chunk's R rows of depth (36 of
# 128 x 128 at K = 768, 9 at K = 384), which alone would leave most of an H100's 132 SMs idle:
# the rows are split so that splits x tiles fills one wave. Each split stores its float32
# partial of dW_d in a workspace slab (at most one wave of 128 x 128 tiles: 8.7 MB on 132 SMs,
# float64 twice that), and _split_sum_kernel adds them up in order. Splits hold whole multiples
# of 128 rows (of every BLOCK_R), all but the last at least SPLIT_MIN_ROWS (tests lower it),
# so a split's main loop stays deep; the split count depends on R, K and the SM count only (not
# on the autotuned config), so a config's rounding is the same whatever the autotuner times.
# Configs with smaller dW_d tiles (IEEE float32's 128 x 64) run more programs than one wave.
_SPLIT_TILE = 128
SPLIT_MIN_ROWS = 512


# Untuned (no GPU where this was written): configs that compile without spills for sm_80 and
# sm_90 on every dtype path with triton 3.6, 3.8 and 3.9 (python -m benchmarks.triton_aot;
# tables in benchmarks/results/triton-aot-sm80-sm90*.md).
# - x_noisy: 16 elements per thread on 4 warps. 32 per thread spill under triton 3.6 (its ptxas
#   holds them in 128 registers), and 32 x 128 on 8 warps under triton 3.9 (it aims at 80).
# - The loss GEMM: 64-row tiles (one wgmma warp group's rows) on 8 warps, with maxnreg=255: the
#   FMA paths (IEEE float32, float64) take up to 255 registers, spill-free. (The tile choices
#   below were made when the epilogue still drew its noise, whose Philox / Box-Muller state
#   spilled without the cap; it now loads eps, which needs fewer registers, and the AOT tables
#   show the shipped configs, not whether larger ones would now compile clean.) 128 x 64
#   spilled 4 B (IEEE float32, sm_90, triton 3.6) and 128 x 128 up to 400 B on those paths.
# - Wider tiles where they compile clean: bf16 / fp16 run the loss GEMM on 128 x 128 tiles first
#   (TF32 spilled 32 to 36 B on sm_90 there), which read each operand from L2 half as often as
#   64 x 128 ones (the cost model's bound on this GEMM, benchmarks/costmodel);
#   bf16 / fp16 / TF32 run the dL/dW_d GEMM on 128 x 128 dW_d tiles first (IEEE float32 spills
#   256 B on sm_80 there, triton 3.8): with the split over rows their fewer tiles no longer
#   leave SMs idle. The 64 x 64 dL/dW_d config has maxnreg=255 too: without it triton 3.9 held
#   IEEE float32 in 72 registers on sm_90 and spilled 12 B.
_NOISY_CONFIG = {"BLOCK_M": 16, "BLOCK_K": 128}
_NOISY_WARPS = 4
_LOSS_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": bn, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3, maxnreg=255)
    for bn in (128, 64)
]
_GRAD_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_R": 32, "GROUP_N": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 32, "GROUP_N": 8}, num_warps=4, num_stages=3, maxnreg=255),
]
_LOSS_CONFIGS_128 = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3, maxnreg=255)
] + _LOSS_CONFIGS
_GRAD_CONFIGS_128 = [
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_R": 32, "GROUP_N": 8}, num_warps=8, num_stages=3)
] + _GRAD_CONFIGS
_LOSS_INTERPRET = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1)
_GRAD_INTERPRET = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 32, "GROUP_N": 2}, num_warps=4, num_stages=1)


def loss_kernel(configs: list[triton.Config], **autotune_options):
    """``_loss_gemm_kernel`` autotuned over ``configs``. Its partial-sum buffers (one chunk's
    views) are zeroed before each timed config and before the real launch: a cell that the
    winning config's grid does not write would otherwise keep what a config timed before it
    wrote, and the first call of every new shape would return a wrong loss. The eps buffer,
    which it overwrites with G', is restored after each timed config: the next one (and the
    real launch) would otherwise read G' as eps. (Each timing then includes that copy, the same
    for every config.)"""
    return triton.autotune(
        configs=configs,
        key=["K", "HAS_BIAS", "COMPUTE_GRAD"],
        reset_to_zero=["loss_part_ptr", "db_part_ptr"],
        restore_value=["g_ptr"],
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


def grad_splits(R: int, K: int, sms: int) -> tuple[int, int]:
    """(splits, rows per split) of a chunk's R rows for the dL/dW_d GEMM on ``sms`` SMs: as many
    splits as one wave of 128 x 128 dW_d tiles leaves room for, the rows per split a multiple
    of 128 and at least SPLIT_MIN_ROWS (the last split takes what is left); (1, R) when the
    tiles alone fill the SMs or R is too short to split."""
    want = min(sms // triton.cdiv(K, _SPLIT_TILE) ** 2, R // SPLIT_MIN_ROWS)
    if want <= 1:
        return 1, R
    rows = triton.cdiv(triton.cdiv(R, want), _ROW_QUANTUM) * _ROW_QUANTUM
    return triton.cdiv(R, rows), rows


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
    g = torch.empty((rows, K), dtype=gemm, device=x.device)  # eps, then G' over it
    grad_weight = torch.empty((K, K), dtype=cdt, device=x.device) if compute_grad else None
    # (splits, rows per split) of each chunk's dL/dW_d GEMM; the slabs are for the chunk that
    # splits most (a smaller last chunk may split more: its rows per split are rounded to 128
    # from fewer rows).
    sms = _common.sm_count(x.device)
    plans = [grad_splits(min(rows, M - c * rows), K, sms) for c in range(chunks)]
    max_splits = max(splits for splits, _ in plans)
    split_ws = torch.empty((max_splits, K, K), dtype=cdt, device=x.device) if compute_grad and max_splits > 1 else None

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
            x, eps, xn, g, row0, R, K, seed_value, seed_ptr, a_hi, a_lo, s_hi, s_lo,
            x.stride(0), x.stride(1), eps.stride(0), eps.stride(1),
            HAS_NOISE=noise is not None, SEED_FROM_PTR=seed_from_ptr, ACC_DTYPE=acc_dt,
            num_warps=_NOISY_WARPS, **_NOISY_CONFIG,
        )

        def loss_grid(meta, R=R):
            return (triton.cdiv(R, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

        loss_kern[loss_grid](
            xn, denoise_weight, bias, g, loss_part[c], db_part[c], R, K, scale,
            denoise_weight.stride(0), denoise_weight.stride(1), denoise_bias.stride(0) if has_bias else 0, part_cols,
            HAS_BIAS=has_bias, COMPUTE_GRAD=compute_grad, GEMM_DTYPE=gemm_dt, ACC_DTYPE=acc_dt,
            INPUT_PRECISION=dot_precision, SATURATE=gemm == torch.float16,
            **loss_meta,
        )
        if compute_grad:
            splits, split_rows = plans[c]

            def grad_grid(meta, splits=splits):
                return (triton.cdiv(K, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]) * splits,)

            grad_kern[grad_grid](
                g, xn, grad_weight if splits == 1 else split_ws, R, K, split_rows, alpha,
                ACCUMULATE=c > 0 and splits == 1, GEMM_DTYPE=gemm_dt, ACC_DTYPE=acc_dt,
                INPUT_PRECISION=dot_precision, **grad_meta,
            )
            if splits > 1:
                _split_sum_kernel[(triton.cdiv(K * K, _SPLIT_SUM_BLOCK),)](
                    split_ws, grad_weight, splits, K * K, ACCUMULATE=c > 0, BLOCK=_SPLIT_SUM_BLOCK,
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
