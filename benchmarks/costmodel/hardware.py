"""The GPUs, the dtypes, every efficiency assumption, and the time of one counted kernel.

Datasheet peaks (dense, no sparsity) are NVIDIA's; everything else here is an assumption,
stated once, with the reason for its value. Changing one changes every prediction: the
published table lists them all (``assumptions()``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    sms: int
    peak: dict  # FLOP/s per GEMM path: "tc16" (bf16/fp16 tensor cores), "tf32", "fma" (fp32 CUDA cores)
    hbm: float  # B/s, datasheet
    l2: float  # B/s from L2 into the SMs (assumption, see L2_BW)
    philox_s: float  # seconds per Philox4x32-10 call with its four Box-Muller normals
    launch_s: float  # GPU-side seconds per kernel launch (see LAUNCH_S)


# Philox anchor (issue 12): a Triton Philox normal generator fills 4096 x 4096 float32 normals in
# 0.078 ms on an H20, about 30 us per pass over M = 12608, K = 768 scaled to an H100. The anchor
# is a whole fill kernel (normals + their stores), all of it charged as generation time: the
# model must not underrate noise. Four normals per Philox call.
PHILOX_ANCHOR_S = 30e-6
PHILOX_ANCHOR_NORMALS = 12608 * 768
PHILOX_CALL_S = PHILOX_ANCHOR_S / (PHILOX_ANCHOR_NORMALS / 4)

# L2 -> SM bandwidth: not on the datasheet. About 5.5 TB/s was measured on the 114-SM H100 PCIe
# (1.755 GHz); scaled by SMs and clock to the 132-SM, 1.98 GHz SXM part that is about 7 TB/s.
# H200 has the same die and clocks. The least certain input here: it bounds Triton's tiled GEMMs
# (whose small tiles re-read their operands from L2), nothing else.
L2_BW = 7.0e12
# GPU-side cost of every kernel launch on one stream: launch latency, ramp-up and tail. Host
# time (Python, dispatch) is not modelled: the host is assumed to run ahead of the GPU.
LAUNCH_S = 3e-6

GPUS = {
    "h100-sxm": Gpu("h100-sxm", "H100 SXM", 132, {"tc16": 989e12, "tf32": 495e12, "fma": 67e12}, 3.35e12, L2_BW,
                    PHILOX_CALL_S, LAUNCH_S),
    # Same GH100 die, SM count and clocks as the H100 SXM (so the same compute and Philox rate);
    # HBM3e at 4.8 TB/s.
    "h200": Gpu("h200", "H200", 132, {"tc16": 989e12, "tf32": 495e12, "fma": 67e12}, 4.8e12, L2_BW, PHILOX_CALL_S,
                LAUNCH_S),
}


def gpu_for_device(device_name: str) -> str | None:
    """The GPUS key for torch.cuda.get_device_name()'s string ("NVIDIA H100 80GB HBM3", "NVIDIA
    H200"), or None when the model has no figures for that card: the PCIe and NVL parts have
    other SM counts, clocks or power limits; "GH200" is a Grace Hopper module."""
    name = device_name.upper()
    if "PCIE" in name or "NVL" in name:
        return None
    if re.search(r"\bH200\b", name):
        return "h200"
    if re.search(r"\bH100\b", name):
        return "h100-sxm"
    return None


@dataclass(frozen=True)
class Dtype:
    name: str
    size: int  # bytes per element of the inputs and of the GEMM operands on the GPU backends
    path: str  # the GEMM path (a Gpu.peak key): where the GEMMs of this input dtype run


# The benchmark's dtype names (benchmarks/shapes.py). "float32" is IEEE float32 (torch's default:
# cuBLAS SGEMM, Triton's "ieee" dot, both on the CUDA cores); "tf32" is float32 storage with
# TF32 matmuls (torch.set_float32_matmul_precision("high"), which every backend follows).
DTYPES = {
    "bfloat16": Dtype("bfloat16", 2, "tc16"),
    "float16": Dtype("float16", 2, "tc16"),
    "float32": Dtype("float32", 4, "fma"),
    "tf32": Dtype("tf32", 4, "tf32"),
}
ACC = 4  # float32: accumulators, p, partial sums, dL/dW_d

# --- efficiency assumptions ------------------------------------------------------------------
# Streaming kernels (elementwise, reductions) and GEMMs' unique traffic reach this fraction of
# the HBM datasheet bandwidth. A large device-to-device copy reached 90% on the lent machines
# (CALIBRATION: checked, not fitted); kernels that also compute or reduce are put a little lower.
HBM_EFF = 0.85
# Fraction of the path's datasheet peak a GEMM main loop reaches when every SM is busy and the
# reduction is deep. cuBLAS: fitted at one shape, the 8192^3 bf16 product measured on the lent
# machines (CALIBRATION), so that this model's own rules (tiles, waves, depth) give it about
# 795 TFLOPS; the same factor serves every path and shape, where only the wave and depth rules
# (DEPTH0, CUBLAS_TILES, SPLITK_MIN_DEPTH) stand between it and a measurement. Triton's shipped
# tiles (untuned: 64- or 128-row tiles with BLOCK_K = 32, against the 128 x 256 x 64 tiles that
# approach the peak) are put lower, and its IEEE float32 dot (FMA) lower still: guesses.
GEMM_EFF = {"cublas": 0.83, "triton": 0.65, "triton-fma": 0.5}
# Measurements of the GPU machines this project is lent (torch 2.11, random data), recorded by
# the machines' own checks, not by this project's code: (GPU key, date, what, value, unit).
# tests/test_costmodel.py checks that the model reproduces each within CALIBRATION_TOLERANCE.
CALIBRATION = (
    ("h100-sxm", "2026-11-13", "bf16 8192^3 torch.matmul", 798.0, "TFLOP/s"),
    ("h200", "2026-10-28", "bf16 8192^3 torch.matmul", 788.0, "TFLOP/s"),
    ("h100-sxm", "2026-11-13", "device-to-device copy, bytes read + written", 3.0, "TB/s"),
    ("h200", "2026-10-28", "device-to-device copy, bytes read + written", 4.3, "TB/s"),
)
CALIBRATION_TOLERANCE = 0.07
# Per output tile, fill/drain of the software pipeline and the epilogue cost as much as this
# many steps of reduction depth: efficiency depth / (depth + DEPTH0).
DEPTH0 = 128
# A tiled GEMM re-reads its operands once per tile row / column; with grouped program order the
# re-reads of Triton's kernels hit L2 at this rate (the rest go to HBM). cuBLAS's re-reads are
# all counted as L2 hits (its tiles are large and swizzled) and its L2 traffic is within its
# efficiency figure.
L2_HIT = 0.95
# cuBLAS picks its tile per shape: the model takes the best of these (rows x columns), and
# splits the reduction (split-K, partials in float32 through HBM) when the output has fewer
# tiles than there are SMs, each split at least SPLITK_MIN_DEPTH deep.
CUBLAS_TILES = ((128, 256), (256, 128), (128, 128), (64, 128))
SPLITK_MIN_DEPTH = 512
# A GEMM whose leading dimension is not a multiple of 16 bytes (the CUDA merge's K + 1 columns)
# cannot use cuBLAS's TMA / 16-byte-vector kernels: this fraction of its aligned efficiency.
MISALIGNED_EFF = 0.5


def assumptions() -> list[str]:
    """Every number the predictions rest on, as markdown bullets."""
    g = GPUS["h100-sxm"]
    return [
        "Datasheet peaks (dense): bf16/fp16 tensor cores 989 TFLOPS, TF32 495 TFLOPS, float32 FMA 67 TFLOPS "
        "(H100 SXM and H200 alike: same die, SMs and clocks); HBM 3.35 TB/s (H100 SXM), 4.8 TB/s (H200); 132 SMs.",
        f"Philox: {PHILOX_CALL_S * 1e12:.1f} ps per Philox4x32-10 call with its four Box-Muller normals "
        f"({PHILOX_ANCHOR_S * 1e6:.0f} us per pass over 12608 x 768 normals, the issue's H100 figure scaled from a "
        "Triton generator filling 4096 x 4096 float32 normals in 0.078 ms on an H20). The anchor is a whole fill "
        "kernel, charged entirely as generation time; H200 the same (same SMs and clocks). Calls are counted "
        "as executed: masked lanes of a tile draw too.",
        "Elementwise kernels: max(Philox time, HBM bytes / bandwidth). A GEMM with Philox in its epilogue "
        "(fused): max(main loop, L2, HBM) + Philox time (the epilogue runs after the main loop; overlap between "
        "co-resident programs is not credited).",
        f"HBM efficiency {HBM_EFF:.0%} of the datasheet bandwidth for every kernel's traffic.",
        "Measurements of the GPU machines this project is lent (torch 2.11, random data; not of this project's "
        f"code), each reproduced by the model within {CALIBRATION_TOLERANCE:.0%}: "
        + "; ".join(f"{GPUS[g].name} ({date}): {what} {value:.1f} {unit}" for g, date, what, value, unit in CALIBRATION)
        + ". The cuBLAS factor below is fitted to the two products; the HBM efficiency above is only checked "
        "against the copies (the model is 5% below them).",
        f"{LAUNCH_S * 1e6:.0f} us per kernel launch (GPU side: latency, ramp-up, tail); host time not modelled "
        "(the host runs ahead).",
        "GEMM main loop: efficiency = library factor x wave quantization x depth / (depth + "
        f"{DEPTH0}); library factor cuBLAS {GEMM_EFF['cublas']:.2f} (fitted at 8192^3 bf16: above), Triton tensor-core dot "
        f"{GEMM_EFF['triton']:.2f} (shipped untuned tiles), Triton IEEE float32 dot (FMA) {GEMM_EFF['triton-fma']:.2f}. "
        f"Wave quantization: tiles / (ceil(tiles / {g.sms}) x {g.sms}), one tile per SM at a time.",
        f"cuBLAS: best modelled time over tiles {', '.join(f'{a}x{b}' for a, b in CUBLAS_TILES)}; split-K when "
        f"the output has fewer tiles than SMs (splits at least {SPLITK_MIN_DEPTH} deep, float32 partials "
        "written and read once); re-reads all L2 hits; a leading dimension that is not a multiple of 16 bytes: "
        f"x{MISALIGNED_EFF} efficiency.",
        f"Triton GEMMs: the shipped default config (first of the autotune list; autotuning may pick another). "
        f"Operand traffic from L2 = each operand once per tile row / column of the grid; {L2_HIT:.0%} of "
        f"re-reads hit L2, the rest and the first read of every element go to HBM; time also bounded by "
        f"L2 -> SM bandwidth {L2_BW / 1e12:.0f} TB/s (an estimate: ~5.5 TB/s measured on the 114-SM H100 PCIe, "
        "scaled by SMs and clock).",
        "FLOPs are those the MMAs execute: Triton's padded tiles included (a partial tile costs a whole one).",
        "No L2 reuse between kernels (a chunk buffer written by one kernel is read from HBM by the next), "
        "except where stated.",
        "fp16 costs exactly what bf16 costs in every count (same sizes, same tensor-core peak): its rows "
        "are left out of the tables; predict() answers for it.",
    ]


# --- the time of one counted kernel ---------------------------------------------------------

@dataclass(frozen=True)
class Kernel:
    """One kernel (or ``launches`` identical small ones) as the code launches it."""

    name: str
    launches: int = 1
    hbm: float = 0.0  # bytes between HBM and the chip
    l2: float = 0.0  # bytes from L2 into the SMs (modelled for Triton's tiled GEMMs only)
    philox: float = 0.0  # Philox calls executed
    flops: float = 0.0  # GEMM FLOPs executed
    path: str = ""  # GEMM path of those FLOPs (a Gpu.peak key)
    eff: float = 1.0  # fraction of the path's peak the main loop reaches
    fused_philox: bool = False  # the Philox calls run in a GEMM's epilogue, after its main loop


def _terms(k: Kernel, gpu: Gpu) -> dict:
    return {
        "MMA": k.flops / (gpu.peak[k.path] * k.eff) if k.flops else 0.0,
        "L2": k.l2 / gpu.l2,
        "HBM": k.hbm / (gpu.hbm * HBM_EFF),
        "Philox": k.philox * gpu.philox_s,
    }


def seconds(k: Kernel, gpu: Gpu) -> float:
    """Predicted time of ``k`` on ``gpu`` (the rules in ``assumptions()``)."""
    t = _terms(k, gpu)
    if k.fused_philox:
        body = max(t["MMA"], t["L2"], t["HBM"]) + t["Philox"]
    else:
        body = max(t.values())
    return k.launches * gpu.launch_s + body


def bound(k: Kernel, gpu: Gpu) -> str:
    """What limits ``k``: the largest of its terms (MMA, L2, HBM, Philox, launch overhead)."""
    t = _terms(k, gpu)
    t["launch"] = k.launches * gpu.launch_s
    return max(t, key=t.get)


def wave_eff(tiles: int, sms: int) -> float:
    """Fraction of the SMs' time a grid of ``tiles`` equal tiles keeps busy (one tile per SM at
    a time): the last wave runs part-full."""
    return tiles / (math.ceil(tiles / sms) * sms)


def depth_eff(depth: float) -> float:
    return depth / (depth + DEPTH0)


def pad(n: int, block: int) -> int:
    """n rounded up to a multiple of block: what a tiled kernel computes."""
    return math.ceil(n / block) * block


def stream(name: str, hbm: float, philox: float = 0.0, launches: int = 1) -> Kernel:
    """An elementwise / reduction kernel moving ``hbm`` bytes."""
    return Kernel(name, launches=launches, hbm=hbm, philox=philox)


def cublas_gemm(name: str, m: int, n: int, depth: int, dt: Dtype, gpu: Gpu, *, hbm: float,
                misaligned: bool = False) -> Kernel:
    """A cuBLAS GEMM (m x n output, reduction ``depth``) on the dtype's path; ``hbm``: its
    unique traffic (operands once, output, C when beta != 0). Tile and split-K as in
    ``assumptions()``: the best modelled time over CUBLAS_TILES."""
    flops = 2.0 * m * n * depth
    best = None
    for bm, bn in CUBLAS_TILES:
        tiles = math.ceil(m / bm) * math.ceil(n / bn)
        split = 1
        if tiles < gpu.sms:
            split = max(1, min(gpu.sms // tiles, depth // SPLITK_MIN_DEPTH))
        eff = GEMM_EFF["cublas"] * wave_eff(tiles * split, gpu.sms) * depth_eff(depth / split)
        if misaligned:
            eff *= MISALIGNED_EFF
        extra = 2.0 * split * m * n * ACC if split > 1 else 0.0  # float32 partials, written and read
        k = Kernel(name, hbm=hbm + extra, flops=flops, path=dt.path, eff=eff)
        if best is None or seconds(k, gpu) < seconds(best, gpu):
            best = k
    return best


def triton_gemm(name: str, m: int, n: int, depth: int, tile: tuple[int, int, int], dt: Dtype, gpu: Gpu, *,
                operand_l2: float, unique: float, writes: float, philox: float = 0.0,
                splits: tuple[int, ...] = ()) -> Kernel:
    """A Triton tiled GEMM: ``tile`` = (BLOCK rows, BLOCK columns, BLOCK depth) of the output
    m x n; ``operand_l2``: the bytes its programs load (each operand once per grid row / column),
    ``unique``: each operand element once, ``writes``: its stores. Philox in the epilogue.
    ``splits``: the depth of each split of the reduction (one program per tile and split), or
    () for one split of ``depth``; the deepest split sets the depth efficiency."""
    bm, bn, bk = tile
    splits = splits or (depth,)
    programs = math.ceil(m / bm) * math.ceil(n / bn) * len(splits)
    lib = "triton-fma" if dt.path == "fma" else "triton"
    eff = GEMM_EFF[lib] * wave_eff(programs, gpu.sms) * depth_eff(max(splits))
    hbm = unique + (1.0 - L2_HIT) * (operand_l2 - unique) + writes
    flops = 2.0 * pad(m, bm) * pad(n, bn) * sum(pad(d, bk) for d in splits)
    return Kernel(name, hbm=hbm, l2=operand_l2, philox=philox, flops=flops, path=dt.path, eff=eff,
                  fused_philox=philox > 0)
