"""Triton weight merge (docs/method.md, M1, M2) and its backward (M3..M5).

All five formulas are one GEMM shape with an epilogue, so one kernel serves them:

    out[r, n]  = c_add Add[r, n] + c_mul (sum_k A[r, k] B[k, n] + u[r] v[n])    n < N
    out_col[r] = add_col[r]      + c_mul  sum_k A[r, k] b_col[k]                  (HAS_BCOL)

b_col is the bias column of [W_d | b_d]: M2's W b_d (and M5's W^T g_b) is a matrix-vector
product, formed on the CUDA cores by the programs of the first column block from the A tiles
they load for the MMA anyway. A column of B of its own would cost a whole extra column block
of MMA work and A reads (K is a multiple of the tile in every ViT layer), and splicing it into
B's tile would send every program's B through registers on each step of the main loop. A and
B are read through strides, so W^T and W_d^T cost no copy.

Precision (``drep_kernels.precision``): bf16 / fp16 operands go to the tensor cores as they
are, float32 ones as TF32 exactly when torch's float32 matmuls use it; accumulation in float32
(float64 for float64 weights); out is stored in its buffer's dtype (the weight's for the
forward, the accumulation dtype for the gradients). The bias column, a matrix-vector product,
is never TF32 (nor are torch's): its products and sum are in the accumulation dtype.

    M1, M2: A = W,     B = W_d,   b_col = b_d, Add = W,   add_col = b,  c_add = c3, c_mul = -c1
    M3:     A = G_W,   B = W_d^T, u = g_b, v = b_d,       Add = G_W,    c_add = c3, c_mul = -c1
    M4, M5: A = W^T,   B = G_W,   b_col = g_b,                          c_add = 0,  c_mul = -c1
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import precision
from . import _common
from ._common import dot, grouped_tile, join_scalar, rounded, tl_dtype


@triton.jit
def _merge_gemm_kernel(
    a_ptr, b_ptr, bcol_ptr, add_ptr, addcol_ptr, u_ptr, v_ptr, out_ptr, outcol_ptr,
    R, N, KR,
    stride_ar, stride_ak, stride_bk, stride_bn, stride_bcol, stride_addr, stride_addn, stride_addcol,
    stride_u, stride_v, stride_outr, stride_outn, stride_outcol,
    c_add_hi, c_add_lo, c_mul_hi, c_mul_lo,
    HAS_BCOL: tl.constexpr, HAS_ADD: tl.constexpr, HAS_ADDCOL: tl.constexpr, HAS_RANK1: tl.constexpr,
    GEMM_DTYPE: tl.constexpr, DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_R: tl.constexpr,
):
    # M1/M2: [W' | b'] = c3 [W | b] - c1 W [W_d | b_d];  M3: c3 G_W - c1 (G_W W_d^T + g_b b_d^T);
    # M4/M5: [dW_d | db_d] = -c1 W^T [G_W | g_b].
    pid = tl.program_id(0)
    # GROUP_R row blocks share each B column block while it is in L2. With a bias column there
    # is at least one column block (N = 0: the column alone).
    num_n = tl.cdiv(N, BLOCK_N)
    if HAS_BCOL:
        num_n = tl.maximum(num_n, 1)
    pid_r, pid_n = grouped_tile(pid, tl.cdiv(R, BLOCK_R), num_n, GROUP_R)
    if HAS_BCOL:
        # The first column block's programs also form the bias column. In grouped order they
        # run first within each group of GROUP_R row blocks, not together at the grid's end.
        col_program = pid_n == 0
        # The reduction length they read b_col over (0 in the other programs): masks are built
        # from it, not `mask & col_program`, which Triton 3.9's interpreter refuses (below).
        col_kr = tl.where(col_program, KR, 0)
        col_acc = tl.zeros((BLOCK_R,), dtype=DTYPE)

    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < R
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=DTYPE)
    # K offsets within a slice (< BLOCK_K) times the strides stay small; the slice's start moves
    # the 64-bit pointers by a 64-bit step, so k * stride never forms in 32 bits (past 2^31 for
    # a transposed operand) and no int64 block of offsets costs registers.
    offs_kl = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_r[:, None] * stride_ar + offs_kl[None, :] * stride_ak
    b_ptrs = b_ptr + offs_kl[:, None] * stride_bk + offs_n[None, :] * stride_bn
    bcol_ptrs = bcol_ptr + offs_kl * stride_bcol
    if HAS_BCOL:
        bcol_next = tl.load(bcol_ptrs, mask=offs_kl < col_kr, other=0.0)
    for k0 in range(0, KR, BLOCK_K):
        mask_k = k0 + offs_kl < KR
        a = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(GEMM_DTYPE)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(GEMM_DTYPE)
        if HAS_BCOL:
            # b_col's next slice is loaded one step ahead of its use, and only by the column
            # programs (a masked-off load moves nothing): loaded where it is used, it compiled
            # to a global load waited on at every step (triton 3.8); a step ahead, Triton
            # stages it with the operands (cp.async).
            bcol = bcol_next
            bcol_ptrs += tl.cast(stride_bcol, tl.int64) * BLOCK_K
            bcol_next = tl.load(bcol_ptrs, mask=k0 + BLOCK_K + offs_kl < col_kr, other=0.0)
            if col_program:
                # Operands rounded as the MMA's are; products and sum in the accumulation
                # dtype: a matrix-vector product, which torch never runs as TF32 either.
                col_acc += tl.sum(a.to(DTYPE) * bcol.to(GEMM_DTYPE).to(DTYPE)[None, :], axis=1)
        a_ptrs += tl.cast(stride_ak, tl.int64) * BLOCK_K
        b_ptrs += tl.cast(stride_bk, tl.int64) * BLOCK_K
        acc = dot(a, b, acc, INPUT_PRECISION, DTYPE)

    c_mul = join_scalar(c_mul_hi, c_mul_lo, DTYPE)
    if HAS_RANK1:
        u = tl.load(u_ptr + offs_r * stride_u, mask=mask_r, other=0.0).to(DTYPE)
        v = tl.load(v_ptr + offs_n * stride_v, mask=mask_n, other=0.0).to(DTYPE)
        acc += u[:, None] * v[None, :]
    val = c_mul * acc
    mask = mask_r[:, None] & mask_n[None, :]
    if HAS_ADD:
        c_add = join_scalar(c_add_hi, c_add_lo, DTYPE)
        add = tl.load(add_ptr + offs_r[:, None] * stride_addr + offs_n[None, :] * stride_addn, mask=mask, other=0.0)
        val += c_add * add.to(DTYPE)
    out_ptrs = out_ptr + offs_r[:, None] * stride_outr + offs_n[None, :] * stride_outn
    tl.store(out_ptrs, rounded(val, out_ptr.dtype.element_ty), mask=mask)
    if HAS_BCOL:
        # A branch, not a store mask `mask_r & col_program`: Triton >= 3.9's interpreter splats a
        # scalar comparison into an int64 block, and its store rejects a mask that is not boolean.
        if col_program:
            col = c_mul * col_acc
            if HAS_ADDCOL:
                col += tl.load(addcol_ptr + offs_r * stride_addcol, mask=mask_r, other=0.0).to(DTYPE)
            tl.store(outcol_ptr + offs_r * stride_outcol, rounded(col, outcol_ptr.dtype.element_ty), mask=mask_r)


# Untuned (no GPU where this was written): the configs that compile without register spills for
# sm_80 and sm_90 on every dtype path and launch (python -m benchmarks.triton_aot; table in
# benchmarks/results/triton-aot-sm80-sm90.md). The IEEE float32 dot (the float32 default) and
# the float64 one run on FMA / DMMA units, each thread holding its rows and columns of both
# operand slices in registers: BLOCK_K = 32 or 128 x 128 tiles spill on the IEEE or
# float64 paths. Without a register cap ptxas -O3 picks its own register target, trading spills
# for occupancy: that is why the former 128 x 128 x 32 default came out at 32 registers with
# 11 KB of spill stores (nothing in the PTX forced 32: .reqntid 256 allows 255), and why 64 x 64
# tiles spill a few bytes at 80 to 96 registers; with a cap (maxnreg) it fills the cap instead
# (255 registers for 64 x 64; at 128 it spills), so those are not shipped there. On the
# tensor-core paths (bf16, fp16, TF32) the accumulator lives in the MMA's registers and
# 128 x 128 x 32 tiles compile clean for every launch (120 to 252 registers, triton 3.6, 3.8
# and 3.9): they come first there, reading W and W_d from L2 half as often as 128 x 64 tiles.
# 256 x 128 and 128 x 256 tiles (half the L2 reads again) spill at 8 warps: compiled as above
# with triton 3.8, 8 to 620 bytes of spill stores (bf16 on sm_80, M3 on sm_90, TF32 on both).
_CONFIGS = [
    triton.Config({"BLOCK_R": br, "BLOCK_N": bn, "BLOCK_K": 16, "GROUP_R": 8}, num_warps=8, num_stages=3)
    for br, bn in [(128, 64), (64, 128)]
]
_CONFIGS_128 = [
    triton.Config({"BLOCK_R": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_R": 8}, num_warps=8, num_stages=3)
] + _CONFIGS
_INTERPRET = triton.Config({"BLOCK_R": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_R": 2}, num_warps=4, num_stages=1)


def _autotuned(configs: list[triton.Config]):
    """The merge kernel autotuned over ``configs``; its first is the default that
    DREP_TRITON_AUTOTUNE=0 pins (always one the AOT check compiles)."""
    return triton.autotune(
        configs=_common.config(configs, configs[0], _INTERPRET),
        key=["R", "N", "KR", "HAS_BCOL", "HAS_ADD", "HAS_RANK1"],
    )(_merge_gemm_kernel)


_kernel = _autotuned(_CONFIGS)  # IEEE float32 and float64
_kernel_128 = _autotuned(_CONFIGS_128)  # the tensor-core paths


def _kernel_for(gemm: torch.dtype):
    """The autotuned kernel for GEMM operands of dtype ``gemm``."""
    return _kernel_128 if precision.tensor_core_dot(gemm) else _kernel


def _scalars(c_add: float, c_mul: float) -> tuple[float, float, float, float]:
    return (*_common.split_scalar(c_add), *_common.split_scalar(c_mul))


def _stride(t: Optional[Tensor], dim: int = 0) -> int:
    return t.stride(dim) if t is not None else 0


def _gemm(
    a: Tensor,
    b: Tensor,
    out: Tensor,
    c_mul: float,
    dtype: torch.dtype,
    *,
    bcol: Optional[Tensor] = None,
    outcol: Optional[Tensor] = None,
    add: Optional[Tensor] = None,
    c_add: float = 0.0,
    addcol: Optional[Tensor] = None,
    u: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
) -> None:
    """out = c_add add + c_mul (a @ b + u v^T); outcol = addcol + c_mul a @ bcol (see the module
    doc), for operands of the weights' ``dtype``."""
    R, KR = a.shape
    N = b.shape[1]
    if R == 0 or (N == 0 and bcol is None):
        return
    if KR == 0 and add is None and addcol is None:
        # No product terms: zero the outputs (a grid over an empty reduction works too, but a
        # 0 x 0 operand is not worth a launch).
        out.zero_()
        if outcol is not None:
            outcol.zero_()
        return
    has_bcol = bcol is not None

    def grid(meta):
        num_n = triton.cdiv(N, meta["BLOCK_N"])
        return (triton.cdiv(R, meta["BLOCK_R"]) * (max(num_n, 1) if has_bcol else num_n),)

    placeholder = out
    gemm = precision.gemm_dtype(dtype, tensor_cores=True)
    _kernel_for(gemm)[grid](
        a, b, bcol if has_bcol else placeholder, add if add is not None else placeholder,
        addcol if addcol is not None else placeholder, u if u is not None else placeholder,
        v if v is not None else placeholder, out, outcol if outcol is not None else placeholder,
        R, N, KR,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), _stride(bcol), _stride(add, 0), _stride(add, 1),
        _stride(addcol), _stride(u), _stride(v), out.stride(0), out.stride(1), _stride(outcol),
        *_scalars(c_add, c_mul),
        HAS_BCOL=has_bcol, HAS_ADD=add is not None, HAS_ADDCOL=addcol is not None, HAS_RANK1=u is not None,
        GEMM_DTYPE=tl_dtype(gemm),
        DTYPE=tl_dtype(precision.accumulate_dtype(dtype)),
        INPUT_PRECISION=precision.dot_precision(dtype),
    )


def merge_weights_fwd(
    weight: Tensor,
    bias: Optional[Tensor],
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    c1: float,
    c3: float,
) -> tuple[Tensor, Tensor]:
    """W' = c3 W - c1 W W_d and b' = b - c1 W b_d (M1, M2) in one launch, computed in float32
    (float64 for float64 weights) and returned in the weight's dtype.

    weight: (out, K); bias: (out,) or None; denoise_weight: (K, K); denoise_bias: (K,) or None.
    b' is a 0-element tensor when neither b nor b_d exists.
    """
    _common.check_device(weight, bias, denoise_weight, denoise_bias)
    merged_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    if denoise_bias is not None:
        merged_bias = weight.new_empty(weight.shape[0])
    elif bias is not None:
        merged_bias = bias.clone()  # b' = b: a copy, never an alias of an input
    else:
        merged_bias = weight.new_empty(0)
    _gemm(
        weight, denoise_weight, merged_weight, -c1, weight.dtype,
        add=weight, c_add=c3,
        bcol=denoise_bias, outcol=merged_bias if denoise_bias is not None else None,
        addcol=bias if denoise_bias is not None else None,
    )
    return merged_weight, merged_bias


def _merge_weights_bwd(
    grad_merged_weight: Tensor,
    grad_merged_bias: Optional[Tensor],
    weight: Tensor,
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    c1: float,
    c3: float,
    need_weight: bool,
    need_denoise: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients through the merge (M3..M5) in the compute dtype; the torch backend's contract.

    grad_merged_weight: (out, K) G_W; grad_merged_bias: (out,) g_b or None; weight: (out, K);
    denoise_weight: (K, K); denoise_bias: (K,) or None. Returns (dW (out, K), dW_d (K, K),
    db_d (K,)), each empty unless asked for (db_d also when b_d or g_b is absent). M3 is one
    launch, M4 with M5 another.
    """
    # Registered as an op (below), not called directly: drep::merge_weights' autograd formula
    # calls the backend's merge_weights_bwd, and when AOTAutograd / torch.compile trace that
    # backward the launcher would otherwise receive fake tensors and launch on them.
    _common.check_device(grad_merged_weight, grad_merged_bias, weight, denoise_weight, denoise_bias)
    cdt = precision.accumulate_dtype(weight.dtype)
    # Fresh empties, never one shared tensor: a custom op's outputs must not alias each other.
    grad_weight, grad_dw, grad_db = (weight.new_empty(0, dtype=cdt) for _ in range(3))
    rank_one = grad_merged_bias is not None and denoise_bias is not None
    if need_weight:
        grad_weight = weight.new_empty(weight.shape, dtype=cdt)
        _gemm(
            grad_merged_weight, denoise_weight.t(), grad_weight, -c1, weight.dtype,
            add=grad_merged_weight, c_add=c3,
            u=grad_merged_bias if rank_one else None, v=denoise_bias if rank_one else None,
        )
    if need_denoise:
        K = weight.shape[1]
        grad_dw = weight.new_empty((K, K), dtype=cdt)
        if rank_one:
            grad_db = weight.new_empty(K, dtype=cdt)
        _gemm(
            weight.t(), grad_merged_weight, grad_dw, -c1, weight.dtype,
            bcol=grad_merged_bias if rank_one else None, outcol=grad_db if rank_one else None,
        )
    return grad_weight, grad_dw, grad_db


_merge_weights_bwd_op = torch.library.custom_op("drep::triton_merge_weights_bwd", mutates_args=())(_merge_weights_bwd)


@_merge_weights_bwd_op.register_fake
def _(grad_merged_weight, grad_merged_bias, weight, denoise_weight, denoise_bias, c1, c3, need_weight, need_denoise):
    cdt = precision.accumulate_dtype(weight.dtype)
    rank_one = grad_merged_bias is not None and denoise_bias is not None
    return (
        weight.new_empty(weight.shape if need_weight else (0,), dtype=cdt),
        weight.new_empty(denoise_weight.shape if need_denoise else (0,), dtype=cdt),
        weight.new_empty((weight.shape[1],) if need_denoise and rank_one else (0,), dtype=cdt),
    )


# The backend's entry point is the registered op itself (see _merge_weights_bwd).
merge_weights_bwd = _merge_weights_bwd_op
