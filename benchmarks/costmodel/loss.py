"""What each design of the denoising loss, forward + backward, costs as its code is written.

One function per design returns the kernels one call launches (``ops.denoise_loss(x, W_d, b_d,
a, s)`` with a seed drawn on the device, then ``loss.backward()``; x (M, K), bias present),
each with its HBM bytes, L2 operand bytes, Philox calls and GEMM FLOPs. n = M K; s = bytes per
element of the input dtype (the GEMM dtype too, drep_kernels.precision); R = rows of a chunk.
The sources counted are named per design; a change to one of them means editing its function
(the CUDA designs: one ``CudaLoss`` description each).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .hardware import ACC, GEMM_EFF, L2_HIT, Dtype, Gpu, Kernel, cublas_gemm, depth_eff, pad, stream, triton_gemm

# --- shared by the drep backends: the op's wrapper and its autograd (drep_kernels/ops/denoise_loss.py)


def _seed_draw() -> list[Kernel]:
    # rng.draw_seed: torch.randint on the device (capture-safe seed), one 0-d int64.
    return [stream("seed draw (torch.randint)", 8)]


def _autograd_tail(K: int, dt: Dtype, fused_cast: bool = True) -> list[Kernel]:
    """loss.backward(): the root gradient (ones_like); _backward scales the saved gradients by
    grad_loss and stores them in the weight dtype: one mul each, written in that dtype
    (``fused_cast``), or (the designs before #12) a mul, then a cast for half-precision weights.
    (The op does not materialize gradients for its non-differentiable outputs: no K x K zeros.)"""
    half = dt.size != ACC
    out = dt.size if half and fused_cast else ACC  # what the two muls write
    ks = [
        stream("ones_like (root gradient)", 4),
        stream("grad_loss * dL/dW_d", K * K * (ACC + out)),
        stream("grad_loss * dL/db_d", K * (ACC + out)),
    ]
    if half and not fused_cast:
        ks += [stream("dL/dW_d to the weight dtype", K * K * (ACC + dt.size)),
               stream("dL/db_d to the weight dtype", K * (ACC + dt.size))]
    return ks


# --- floors ------------------------------------------------------------------------------------

def floor_flops(M: int, K: int) -> float:
    """The two unavoidable M x K x K GEMMs: p = x_noisy W_d^T and dL/dW_d = G^T x_noisy."""
    return 2 * 2.0 * M * K * K


def floor_seconds(M: int, K: int, dt: Dtype, gpu: Gpu) -> float:
    """The two-GEMM floor: floor_flops at the dtype's datasheet peak (no efficiency applied)."""
    return floor_flops(M, K) / gpu.peak[dt.path]


def floor_gemms(M: int, K: int, dt: Dtype, gpu: Gpu) -> list[Kernel]:
    """The benchmark's "floor" contender (benchmarks/baselines.py floor_loss): x @ W_d^T and
    G^T @ x, two cuBLAS GEMMs with outputs in the input dtype."""
    s, n = dt.size, M * K
    return [
        cublas_gemm("x @ W_d^T", M, K, K, dt, gpu, hbm=n * s + K * K * s + n * s),
        cublas_gemm("G^T @ x", K, K, M, dt, gpu, hbm=2 * n * s + K * K * s),
    ]


# --- the authors' eager code (benchmarks/baselines.py ReferenceDenoiser.loss + autograd) --------
# The aten ops below are those a dispatch trace of that code shows (tests/test_costmodel.py
# checks the list): one kernel each on CUDA, but mse_loss (an elementwise kernel, then mean).

EAGER_FORWARD_OPS = (
    "full", "randn_like", "gather", "mul", "gather", "mul", "add",  # noise, a x + s eps
    "arange", "mul", "exp", "_to_copy", "mul", "sin", "cos", "cat", "_to_copy",  # sinusoid(t)
    "addmm", "gelu", "addmm",  # time MLP
    "add", "addmm",  # + e_t, the denoiser Linear (bias in the cuBLASLt epilogue)
    "sub", "abs", "mean", "mse_loss", "add",  # l1_loss + mse_loss
)
EAGER_BACKWARD_OPS = ("ones_like", "mse_loss_backward", "div", "sgn", "mul", "neg", "add", "mm", "sum")


def eager_saved_bytes(M: int, K: int, dt: Dtype) -> float:
    """What autograd keeps: the Linear's input, eps and pred (mse_loss), eps - pred (abs)."""
    return 4.0 * M * K * dt.size


def eager(M: int, K: int, dt: Dtype, gpu: Gpu) -> list[Kernel]:
    s, n = dt.size, M * K
    B = max(1, M // 197)  # batch rows of the time embedding (the benchmark's x is (M / 197, 197, K))
    tiny = 4 * B * 2048 * 2  # a (B, 2048) float32 tensor read and written
    return [
        stream("full(t)", 8 * B),
        stream("randn_like: eps", n * s, philox=n / 4),  # curand Philox, four normals per call
        stream("gather a, s", 2 * B * (8 + s), launches=2),
        stream("a * x", 2 * n * s),
        stream("s * eps", 2 * n * s),
        stream("a x + s eps", 3 * n * s),
        stream("sinusoid(t): arange .. cat, cast", tiny, launches=9),
        cublas_gemm("time MLP Linear(2048, K)", B, K, 2048, dt, gpu, hbm=2048 * K * s),
        stream("gelu", 2 * B * K * s),
        cublas_gemm("time MLP Linear(K, K)", B, K, K, dt, gpu, hbm=K * K * s),
        stream("x_noisy + e_t", 2 * n * s),
        cublas_gemm("denoiser Linear (addmm, bias epilogue)", M, K, K, dt, gpu, hbm=2 * n * s + K * K * s),
        stream("eps - pred", 3 * n * s),
        stream("abs", 2 * n * s),
        stream("mean", n * s),
        stream("mse_loss: (eps - pred)^2, mean", 3 * n * s + n * s, launches=2),
        stream("l1 + mse", 3 * s),
        # backward
        stream("ones_like", s),
        stream("mse_loss_backward", 3 * n * s),
        stream("mean backward: expand / n", n * s),
        stream("sgn", 2 * n * s),
        stream("grad * sgn", 3 * n * s),
        stream("neg (sub backward)", 2 * n * s),
        stream("add the two grads of pred", 3 * n * s),
        cublas_gemm("dL/dW_d = G^T x_noisy (mm)", K, K, M, dt, gpu, hbm=2 * n * s + K * K * s),
        stream("dL/db_d = sum(G, 0)", n * s + K * s),
    ]


# --- triton (drep_kernels/triton/denoise_loss.py, issue 12 design) ------------------------------
# Constants as shipped (tests/test_costmodel.py checks them against the module).
TRITON_CHUNK_BYTES = 64 << 20  # x_noisy and eps / G' per element, in the GEMM dtype
TRITON_ROW_QUANTUM = 128
TRITON_NOISY_TILE = (16, 128)  # _NOISY_CONFIG: BLOCK_M, BLOCK_K
# The first (default) configs per GEMM path (denoise_loss._kernels): Dtype.path -> tile.
TRITON_LOSS_TILE = {"tc16": (128, 128, 32), "tf32": (64, 128, 32), "fma": (64, 128, 32)}  # BLOCK_M, BLOCK_N, BLOCK_K
TRITON_GRAD_TILE = {"tc16": (128, 128, 32), "tf32": (128, 128, 32), "fma": (128, 64, 32)}  # BLOCK_N, BLOCK_K, BLOCK_R
TRITON_PART_BLOCK = 64  # the smallest BLOCK_M / BLOCK_N of the configs: sizes the partial buffers
# The dW_d GEMM's split over rows (denoise_loss.grad_splits): one wave of 128 x 128 tiles.
TRITON_SPLIT_TILE = 128
TRITON_SPLIT_MIN_ROWS = 512


def triton_chunk_rows(M: int, K: int, size: int, chunk_bytes: int = TRITON_CHUNK_BYTES) -> int:
    """Rows per chunk for a GEMM dtype of ``size`` bytes."""
    elems = chunk_bytes // (2 * size)
    return min(M, max(elems // K // TRITON_ROW_QUANTUM * TRITON_ROW_QUANTUM, TRITON_ROW_QUANTUM))


def triton_grad_splits(R: int, K: int, sms: int, min_rows: int = TRITON_SPLIT_MIN_ROWS) -> list[int]:
    """Rows of each split of a chunk's R rows in the dW_d GEMM on ``sms`` SMs."""
    want = min(sms // math.ceil(K / TRITON_SPLIT_TILE) ** 2, R // min_rows)
    if want <= 1:
        return [R]
    return chunks(R, math.ceil(math.ceil(R / want) / TRITON_ROW_QUANTUM) * TRITON_ROW_QUANTUM)


def chunks(M: int, rows: int) -> list[int]:
    """Rows of each chunk, in order."""
    return [min(rows, M - r0) for r0 in range(0, M, rows)]


def triton(M: int, K: int, dt: Dtype, gpu: Gpu, chunk_bytes: int = TRITON_CHUNK_BYTES,
           split_min_rows: int = TRITON_SPLIT_MIN_ROWS) -> list[Kernel]:
    s = dt.size
    rows = triton_chunk_rows(M, K, s, chunk_bytes)
    parts = chunks(M, rows)
    part_rows, part_cols = math.ceil(rows / TRITON_PART_BLOCK), math.ceil(K / TRITON_PART_BLOCK)
    loss_part = len(parts) * part_rows * part_cols * 2 * ACC
    db_part = len(parts) * part_rows * K * ACC
    nm, nk = TRITON_NOISY_TILE
    bm, bn, bk = TRITON_LOSS_TILE[dt.path]
    gn, gk, gr = TRITON_GRAD_TILE[dt.path]
    ks = _seed_draw() + [stream("zeros: loss and dL/db_d partials (one buffer)", loss_part + db_part)]
    for c, R in enumerate(parts):
        # _noisy_input_kernel: x read (s), eps and x_noisy written (s each); one Philox call per
        # four elements of every (BLOCK_M x BLOCK_K) tile, masked lanes included.
        ks.append(stream(f"chunk {c}: _noisy_input_kernel", 3 * R * K * s, philox=pad(R, nm) * pad(K, nk) / 4))
        # _loss_gemm_kernel: each of the ceil(K / BLOCK_N) column programs of a row block loads
        # its rows of x_noisy (R x K in all per column block); each row block loads all of W_d
        # (and b_d). Epilogue: its eps tile read once (s; R x K in all), no Philox. Stores: G'
        # (s, over eps), |D| and D^2 sums per program, db_d column sums per row block.
        programs = math.ceil(R / bm) * math.ceil(K / bn)
        ks.append(triton_gemm(
            f"chunk {c}: _loss_gemm_kernel (GEMM 1 + epilogue)", R, K, K, (bm, bn, bk), dt, gpu,
            operand_l2=R * K * s * (math.ceil(K / bn) + 1) + math.ceil(R / bm) * (K * K * s + K * s),
            unique=2 * R * K * s + K * K * s + K * s,
            writes=R * K * s + programs * 2 * ACC + math.ceil(R / bm) * K * ACC,
        ))
        # _grad_gemm_kernel: dW_d tile (BLOCK_N x BLOCK_K) per program and row split: G' is
        # loaded by the ceil(K / BLOCK_K) programs of its column block, x_noisy by the
        # ceil(K / BLOCK_N) of its. One split: alpha dW_d written (float32), and read first from
        # the second chunk on (beta = 1). Several: a K x K float32 slab per split, then
        # _split_sum_kernel reads the slabs (and dW_d from the second chunk on), writes dW_d.
        splits = triton_grad_splits(R, K, gpu.sms, split_min_rows)
        accumulate = 2 if c > 0 else 1
        ks.append(triton_gemm(
            f"chunk {c}: _grad_gemm_kernel (GEMM 2, {len(splits)} row split{'s' if len(splits) > 1 else ''})",
            K, K, R, (gn, gk, gr), dt, gpu,
            operand_l2=R * K * s * (math.ceil(K / gk) + math.ceil(K / gn)),
            unique=2 * R * K * s,
            writes=K * K * ACC * (len(splits) if len(splits) > 1 else accumulate),
            splits=tuple(splits),
        ))
        if len(splits) > 1:
            ks.append(stream(f"chunk {c}: _split_sum_kernel", K * K * ACC * (len(splits) + accumulate)))
    # _finalize_kernel: every partial read once, the loss and dL/db_d written.
    ks.append(stream("_finalize_kernel: loss, dL/db_d", loss_part + db_part + ACC + K * ACC))
    return ks + _autograd_tail(K, dt)


# --- triton before issue 12 (git show 211e91c:drep_kernels/triton/denoise_loss.py) ---------------
PRE12_TILE = (64, 64, 16)  # _CONFIGS[0]: BLOCK_M, BLOCK_N, BLOCK_K
PRE12_PARTIAL_BYTES = 256 * 2**20


def pre12_groups(M: int, K: int, gpu: Gpu) -> int:
    """_num_groups: enough programs to fill the GPU twice, partial dW_d buffers bounded."""
    want = math.ceil(2 * gpu.sms / math.ceil(K / 128))
    cap = max(1, PRE12_PARTIAL_BYTES // (K * K * ACC))
    return max(1, min(want, math.ceil(M / PRE12_TILE[0]), cap))


def triton_pre12(M: int, K: int, dt: Dtype, gpu: Gpu) -> list[Kernel]:
    """One kernel: program (group g, column block n) walks row blocks g, g + S, ...; per row
    block it forms x_noisy tiles in registers over all of K (noise drawn again by every column
    block), the p tile by FMA (IEEE float32 dot; TF32 only for "tf32"), its own eps once more in
    the epilogue, then G~^T x_noisy over all of K (x_noisy and its noise a third time) into its
    BLOCK_N x K float32 strip of a per-group dW_d buffer, loaded and stored once per row block."""
    s = dt.size
    bm, bn, bk = PRE12_TILE
    groups = pre12_groups(M, K, gpu)
    nb, m_blocks = math.ceil(K / bn), math.ceil(M / bm)
    programs, units = groups * nb, m_blocks * nb
    per_program = math.ceil(m_blocks / groups)  # row blocks of the busiest program
    util = units / (math.ceil(programs / gpu.sms) * gpu.sms * per_program)
    path = "tf32" if dt.path == "tf32" else "fma"  # bf16 / fp16 were widened to float32 first
    lib = "triton" if path == "tf32" else "triton-fma"
    operands = units * (2 * bm * K * s + K * bn * s)  # x tile twice, the W_d^T tile once, per unit
    unique = M * K * s + K * K * s
    strips = units * 2 * bn * K * ACC  # dW_d strip loaded and stored per (row block, column block)
    partials = programs * 2 * ACC + groups * K * ACC
    kernel = Kernel(
        "_denoise_loss_fwd_kernel (both GEMMs, noise 2 ceil(K/BLOCK_N) + 1 times)",
        hbm=unique + (1 - L2_HIT) * (operands - unique) + strips + partials,
        l2=operands + strips,
        philox=pad(M, bm) * nb * (2 * pad(K, bk) + bn) / 4,
        flops=4.0 * pad(M, bm) * pad(K, bn) * pad(K, bk),
        path=path,
        eff=GEMM_EFF[lib] * util * depth_eff(K),
        fused_philox=True,
    )
    ks = _seed_draw() + [
        stream("zeros: loss partials", programs * 2 * ACC),
        stream("zeros: per-group dW_d partials", groups * K * K * ACC),
        stream("zeros: per-group db_d partials", groups * K * ACC),
        kernel,
        stream("loss partials: to float64, sum, / n, cast", programs * 2 * ACC * 3, launches=4),
    ]
    if groups > 1:
        ks += [stream("dW_d partials: sum over groups", groups * K * K * ACC + K * K * ACC),
               stream("db_d partials: sum over groups", groups * K * ACC + K * ACC)]
    ks += [stream("dL/dW_d *= 1 / n", 2 * K * K * ACC), stream("dL/db_d *= 1 / n", 2 * K * ACC)]
    return ks + _autograd_tail(K, dt, fused_cast=False)


# --- cuda (csrc/cuda/denoise_loss.cu): one description per revision ---------------------------

@dataclass(frozen=True)
class CudaLoss:
    """A revision of the CUDA loss: per chunk noisy_input_kernel (Philox once per four
    elements), GEMM 1 (cuBLAS, p in float32), loss_epilogue_kernel, finalize_chunk_kernel,
    GEMM 2 (cuBLAS); what differs between revisions is described here."""

    label: str
    source: str  # where the counted code is
    epilogue_philox_per_element: float  # 1: noise_at per element; 1/4: one call per group of four
    # (rows, columns) per epilogue block, one loss partial and one row of column sums each; or
    # None: one block per stripe of whole rows (stripe_rows), all columns
    epilogue_tile: tuple[int, int] | None
    dw_accumulate: str  # "buffer+add": chunks after the first into a K x K buffer, then add_; "beta1": in place
    dw_scale_pass: bool  # dL/dW_d divided by n in its own pass (else by GEMM 2's alpha)
    bias_cast: bool  # b_d cast to float32 by a kernel before the loop (half-precision inputs)
    sum_fills: int  # fills of the float64 sums before the loop (0: the first finalize starts them)
    tail_launches: int  # after the loop: loss / n and its cast, dL/db_d / n and its cast (0: the last finalize)
    fused_cast: bool  # autograd: grad_loss * gradient written in the weight dtype (_autograd_tail)
    # Chunk budget: chunk_elems elements, or (chunk_bytes) that many bytes of x_noisy and p per
    # element (G' written over p).
    chunk_elems: int = 0
    chunk_bytes: int = 0
    min_chunk_rows: int = 128


CUDA_PRE12 = CudaLoss(
    "cuda (before #12)", "csrc/cuda/denoise_loss.cu at 211e91c",
    epilogue_philox_per_element=1.0, epilogue_tile=(64, 32), dw_accumulate="buffer+add", dw_scale_pass=True,
    bias_cast=True, sum_fills=2, tail_launches=4, fused_cast=False, chunk_elems=1 << 23,
)
CUDA_TC = CudaLoss(
    "cuda", "csrc/cuda/denoise_loss.cu",
    epilogue_philox_per_element=0.25, epilogue_tile=None, dw_accumulate="beta1", dw_scale_pass=False,
    bias_cast=False, sum_fills=0, tail_launches=0, fused_cast=True, chunk_bytes=64 << 20,
)
# The stripe epilogue (denoise_loss.cu stripe_lanes; tests/test_costmodel.py reads them there):
# rows per lane ceil(R / (8 x 512)) rounded up to a power of two, at most 8.
STRIPE_TARGET, ROW_LANES, MAX_ROWS_PER_LANE = 512, 8, 8


def stripe_rows(R: int) -> int:
    """Rows per epilogue stripe for a chunk of R rows."""
    want, lanes = math.ceil(R / (ROW_LANES * STRIPE_TARGET)), 1
    while lanes < min(want, MAX_ROWS_PER_LANE):
        lanes *= 2
    return ROW_LANES * lanes


def cuda_chunk_rows(design: CudaLoss, M: int, K: int, dt: Dtype) -> int:
    """Rows per chunk for inputs of ``dt`` (a byte budget depends on its size)."""
    budget = design.chunk_bytes // (dt.size + ACC) if design.chunk_bytes else design.chunk_elems  # x_noisy + p
    r = max(budget // K // design.min_chunk_rows * design.min_chunk_rows, design.min_chunk_rows)
    if design.epilogue_tile is not None:
        r = min(r, 65535 * design.epilogue_tile[0])  # the epilogue's grid.y limit
    return min(r, M)


def cuda(design: CudaLoss, M: int, K: int, dt: Dtype, gpu: Gpu) -> list[Kernel]:
    s = dt.size
    half = dt.size != ACC
    ks = _seed_draw()
    if design.sum_fills:
        ks.append(stream("zeros: float64 loss and dL/db_d sums", 8 + K * 8, launches=design.sum_fills))
    if design.bias_cast and half:
        ks.append(stream("b_d to float32", K * (s + ACC)))
    for c, R in enumerate(chunks(M, cuda_chunk_rows(design, M, K, dt))):
        if design.epilogue_tile is None:  # stripes of whole rows: b_d read once per stripe
            parts = col_rows = math.ceil(R / stripe_rows(R))
            bias = parts * K * s
        else:
            tr, tc = design.epilogue_tile
            tiles_x, col_rows = math.ceil(K / tc), math.ceil(R / tr)
            parts = tiles_x * col_rows
            bias = parts * tc * (ACC if design.bias_cast else s)
        # noisy_input_kernel: x read, x_noisy written in the GEMM dtype; one Philox call per
        # group of four columns (R ceil(K / 4) calls, grid-stride: no padding).
        ks.append(stream(f"chunk {c}: noisy_input_kernel", 2 * R * K * s, philox=R * math.ceil(K / 4)))
        # GEMM 1: p = x_noisy W_d^T, float32 result.
        ks.append(cublas_gemm(f"chunk {c}: GEMM 1 (cuBLAS, p float32)", R, K, K, dt, gpu,
                              hbm=R * K * s + K * K * s + R * K * ACC))
        # loss_epilogue_kernel: p read (float32), eps regenerated, G' written in the GEMM dtype
        # (over p's buffer), one loss partial per block, column sums per block row (tile) or
        # stripe, b_d read per block (float32 after the cast, else the input dtype).
        philox = R * K if design.epilogue_philox_per_element == 1.0 else R * math.ceil(K / 4)
        ks.append(stream(f"chunk {c}: loss_epilogue_kernel",
                         R * K * (ACC + s) + parts * ACC + col_rows * K * ACC + bias, philox=philox))
        # finalize_chunk_kernel: the partials in float64 into the running sums (read, add, write).
        ks.append(stream(f"chunk {c}: finalize_chunk_kernel", col_rows * K * ACC + parts * ACC + 2 * K * 8))
        # GEMM 2: dL/dW_d (+)= G'^T x_noisy, float32 result.
        in_place = design.dw_accumulate == "beta1" and c > 0
        ks.append(cublas_gemm(f"chunk {c}: GEMM 2 (cuBLAS{', beta = 1' if in_place else ''})", K, K, R, dt, gpu,
                              hbm=2 * R * K * s + K * K * ACC * (2 if in_place else 1)))
        if design.dw_accumulate == "buffer+add" and c > 0:
            ks.append(stream(f"chunk {c}: dL/dW_d += chunk buffer (add_)", 3 * K * K * ACC))
    if design.tail_launches:
        ks.append(stream("loss, dL/db_d: / n, cast", 3 * 8 + 2 * K * 8 + K * ACC, launches=design.tail_launches))
    if design.dw_scale_pass:
        ks.append(stream("dL/dW_d /= n scale (div_)", 2 * K * K * ACC))
    return ks + _autograd_tail(K, dt, design.fused_cast)



def drep_saved_bytes(K: int) -> float:
    return (K * K + K) * ACC
