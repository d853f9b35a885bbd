"""The published model: markdown tables per op, the issue's targets judged by the model, the
sensitivity of those verdicts, where the time goes, and every assumption."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import defaultdict

from . import DESIGNS, floor_seconds, loss, totals
from .hardware import DTYPES, GEMM_EFF, GPUS, assumptions, bound, seconds

GPU_KEYS = ("h100-sxm", "h200")
# The benchmark shapes (benchmarks/shapes.py, checked by tests/test_costmodel.py): the loss at
# the default sizes' batch 8 and the full sweep's batches 32 and 128 for every ViT-S/B/L width,
# plus the target batch 64; the merge at every ViT MLP layer (out, K).
TOKENS = 197
LOSS_KS = (384, 768, 1024, 1536, 3072, 4096)
LOSS_MS = tuple(b * TOKENS for b in (8, 32, 64, 128))
MERGE_SHAPES = ((1536, 384), (384, 1536), (3072, 768), (768, 3072), (4096, 1024), (1024, 4096))  # (out, K)
TABLE_DTYPES = ("bfloat16", "float32", "tf32")  # fp16 costs what bf16 does
LOSS_ROWS = ("eager", "floor", "triton", "triton-pre12", "cuda-pre12", "cuda")
MERGE_ROWS = ("eager", "floor", "triton", "cuda-pre12", "cuda")
GPU_BACKEND_DESIGNS = ("triton", "cuda-pre12", "cuda")  # the designs the targets are about

TARGET_M = 12608  # batch 64
TARGET_GPU = "h100-sxm"
TARGET_DTYPE = "bfloat16"


def _g(x: float, digits: int = 3) -> str:
    return "0" if x == 0 else f"{x:.{digits}g}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g}"


def _pair(a: float, b: float) -> str:
    return f"{a:.2f} / {b:.2f}"


def _shape(op: str, K: int, M: int = 0, out: int = 0) -> dict:
    return {"K": K, "M": M} if op == "denoise_loss" else {"K": K, "out": out}


def _row(op: str, design: str, dtype: str, shape: dict) -> list[str]:
    t = {g: totals(op, design, dtype=dtype, gpu=g, **shape) for g in GPU_KEYS}
    floor = {g: floor_seconds(op, dtype=dtype, gpu=g, **shape) for g in GPU_KEYS}
    eager = {g: totals(op, "eager", dtype=dtype, gpu=g, **shape).seconds for g in GPU_KEYS}
    first = t[GPU_KEYS[0]]
    return [
        first.label, _g(first.flops / 1e9), _g(first.hbm / 1e9), _g(first.philox / 1e6), str(first.launches),
        _ms(t["h100-sxm"].seconds), _ms(t["h200"].seconds),
        _pair(*(t[g].seconds / floor[g] for g in GPU_KEYS)), _pair(*(eager[g] / t[g].seconds for g in GPU_KEYS)),
    ]


_HEAD = ["GEMM GFLOP", "HBM GB", "Philox (M calls)", "launches", "H100 SXM ms", "H200 ms",
         "x floor (H100 / H200)", "vs eager (H100 / H200)"]


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def loss_tables() -> list[str]:
    out = []
    for dtype in TABLE_DTYPES:
        for M in LOSS_MS:
            rows = []
            for K in LOSS_KS:
                shape = _shape("denoise_loss", K, M=M)
                fl = {g: floor_seconds("denoise_loss", dtype=dtype, gpu=g, **shape) for g in GPU_KEYS}
                ea = {g: totals("denoise_loss", "eager", dtype=dtype, gpu=g, **shape).seconds for g in GPU_KEYS}
                rows.append([str(K), "two-GEMM floor (datasheet peak)", _g(loss.floor_flops(M, K) / 1e9), "-", "-", "-",
                             _ms(fl["h100-sxm"]), _ms(fl["h200"]), "1.00 / 1.00",
                             _pair(*(ea[g] / fl[g] for g in GPU_KEYS))])
                rows += [[str(K)] + _row("denoise_loss", d, dtype, shape) for d in LOSS_ROWS]
            out += [f"### Loss forward + backward, {dtype}, M = {M} (batch {M // TOKENS})", ""]
            out += _table(["K", "design"] + _HEAD, rows) + [""]
    return out


def merge_tables() -> list[str]:
    out = []
    for dtype in TABLE_DTYPES:
        rows = []
        for o, K in MERGE_SHAPES:
            rows += [[f"{o} x {K}"] + _row("merge_weights", d, dtype, _shape("merge_weights", K, out=o)) for d in MERGE_ROWS]
        out += [f"### Merge forward, {dtype}", ""] + _table(["out x K", "design"] + _HEAD, rows) + [""]
    return out


# --- the targets --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Verdict:
    target: str
    design: str
    value: float
    bound: float
    at_most: bool  # value must be <= bound (else >=)

    @property
    def met(self) -> bool:
        return self.value <= self.bound if self.at_most else self.value >= self.bound


def verdicts(gpu: str = TARGET_GPU) -> list[Verdict]:
    """Issue 12's targets for each GPU-backend design (bf16, M = 12608, on ``gpu``)."""
    out = []
    for d in GPU_BACKEND_DESIGNS:
        label = DESIGNS["denoise_loss"][d][0]

        def ratio(K, ref, d=d):
            shape = _shape("denoise_loss", K, M=TARGET_M)
            t = totals("denoise_loss", d, dtype=TARGET_DTYPE, gpu=gpu, **shape).seconds
            if ref == "floor":
                return t / floor_seconds("denoise_loss", dtype=TARGET_DTYPE, gpu=gpu, **shape)
            return totals("denoise_loss", "eager", dtype=TARGET_DTYPE, gpu=gpu, **shape).seconds / t

        out.append(Verdict("loss at most 1.3x the two-GEMM floor at K = 3072", label, ratio(3072, "floor"), 1.3, True))
        out.append(Verdict("loss at most 2x the two-GEMM floor at K = 768", label, ratio(768, "floor"), 2.0, True))
        for K in (384, 768, 1024):
            out.append(Verdict(f"loss at least 3x faster than eager at K = {K}", label, ratio(K, "eager"), 3.0, False))
    for d in GPU_BACKEND_DESIGNS:
        label = DESIGNS["merge_weights"][d][0]
        worst = max(_merge_ratio(d, o, K, gpu) for o, K in MERGE_SHAPES)
        out.append(Verdict("merge within 1.1x of torch.addmm (worst ViT layer)", label, worst, 1.1, True))
    return out


def _verdict_table(vs: list[Verdict]) -> list[str]:
    rows = [[v.target, v.design, f"{v.value:.2f}", ("<= " if v.at_most else ">= ") + f"{v.bound:g}",
             "**met**" if v.met else "not met"] for v in vs]
    return _table(["target", "design", "model", "needs", "verdict"], rows)


@contextlib.contextmanager
def _changed(gpu: str, **changes):
    """GPUS[gpu] with ``changes`` for the duration of the block (the designs look GPUs up by key)."""
    saved = GPUS[gpu]
    GPUS[gpu] = dataclasses.replace(saved, **changes)
    try:
        yield
    finally:
        GPUS[gpu] = saved


@contextlib.contextmanager
def _triton_as_cublas():
    """Triton's tensor-core dot at cuBLAS's library factor for the duration of the block."""
    saved = GEMM_EFF["triton"]
    GEMM_EFF["triton"] = GEMM_EFF["cublas"]
    try:
        yield
    finally:
        GEMM_EFF["triton"] = saved


def sensitivity() -> list[str]:
    """The verdicts under the base assumptions and with one of the least certain changed: no
    L2 bandwidth bound (Triton's small tiles fed as fast as they need); that and Triton's dot
    at cuBLAS's library factor (Triton's is a guess, cuBLAS's fitted to a measurement), its
    tiles kept; Philox at half the anchor's cost; 1 us per launch instead of 3 (the eager
    code's 36 launches gain most)."""
    base = GPUS[TARGET_GPU]
    no_l2 = {"l2": math.inf}
    cases = [("base assumptions", {}, False), ("no L2 -> SM bound", no_l2, False),
             ("Triton: no L2 bound, cuBLAS's factor", no_l2, True),
             ("Philox at half the anchor", {"philox_s": base.philox_s / 2}, False),
             ("1 us per launch", {"launch_s": 1e-6}, False)]
    found: dict[tuple, dict] = {}
    for name, change, as_cublas in cases:
        with _changed(TARGET_GPU, **change), (_triton_as_cublas() if as_cublas else contextlib.nullcontext()):
            for v in verdicts():
                found.setdefault((v.target, v.design), {})[name] = v
    rows = []
    for (target, design), by_case in found.items():
        rows.append([target, design] + [f"{by_case[n].value:.2f}" + (" (met)" if by_case[n].met else "") for n, *_ in cases])
    return _table(["target", "design"] + [n for n, *_ in cases], rows)


def breakdown(op: str, design: str, K: int, M: int = 0, out: int = 0, dtype: str = TARGET_DTYPE,
              gpu: str = TARGET_GPU) -> list[str]:
    """Where the predicted time goes: kernels of one name summed over the chunks."""
    t = totals(op, design, dtype=dtype, gpu=gpu, **_shape(op, K, M=M, out=out))
    by_name: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0, 0.0, ""])
    for k in t.kernels:
        name = k.name.split(": ", 1)[1] if k.name.startswith("chunk ") else k.name
        acc = by_name[name]
        acc[0] += k.launches
        acc[1] += seconds(k, GPUS[gpu])
        acc[2] += k.hbm
        acc[3] += k.philox
        acc[4] = acc[4] or bound(k, GPUS[gpu])  # the first chunk's (full-size) kernel
    rows = [[name, str(n), f"{s * 1e6:.1f}", f"{s / t.seconds:.0%}", _g(h / 1e6), _g(p / 1e6), b]
            for name, (n, s, h, p, b) in sorted(by_name.items(), key=lambda kv: -kv[1][1])]
    return _table(["kernel", "launches", "us", "share", "HBM MB", "Philox (M)", "bound by"], rows)


def markdown() -> str:
    vs = verdicts()
    met = [v for v in vs if v.met]
    lines = [
        "# Cost model: the GPU kernels on H100 SXM and H200",
        "",
        "**This is a MODEL, not a measurement.** No GPU ran anything for this file: every number below is",
        "counted from the code as written (FLOPs, HBM bytes, Philox calls, kernel launches) and turned into",
        "time with datasheet peaks and the assumptions listed below. Regenerate with",
        "`python -m benchmarks.costmodel --out benchmarks/results/costmodel-h100-h200.md`; a GPU run's",
        "report (`benchmarks/gpu_run.sh`) prints these predictions beside its measurements.",
        "",
        "Designs counted: " + "; ".join([
            "triton: `drep_kernels/triton/denoise_loss.py`, `merge_weights.py`",
            "triton (before #12): `git show 211e91c:drep_kernels/triton/denoise_loss.py`",
            f"{loss.CUDA_PRE12.label}: {loss.CUDA_PRE12.source} and csrc/cuda/merge_weights.cu",
            f"{loss.CUDA_TC.label}: {loss.CUDA_TC.source} and csrc/cuda/merge_weights.cu",
            "eager: `benchmarks/baselines.py` (the authors' code) with autograd",
        ]) + ".",
        "",
        _saved_note(),
        "",
        "`x floor`: loss: time / two-GEMM floor (4 M K^2 FLOPs at the dtype's datasheet peak, no efficiency);",
        "merge: time / torch.addmm (predicted). `vs eager`: the eager code's predicted time / this one (above 1:",
        "faster). `HBM GB`, `Philox`, `launches`, `GEMM GFLOP` are per call (loss: forward + backward).",
        "",
        f"## Targets (issue 12), by the model: bf16, M = {TARGET_M}, H100 SXM",
        "",
    ]
    lines += _verdict_table(vs) + [""]
    lines += [
        f"By the model {len(met)} of {len(vs)} verdicts are met: "
        + ("; ".join(f"{v.design}: {v.target}" for v in met) if met else "none") + ".",
        "",
    ] + _target_notes() + [
        "## Sensitivity: the verdicts under the least certain inputs changed",
        "",
    ] + sensitivity() + [
        "",
        f"## Where the time goes (bf16, M = {TARGET_M}, H100 SXM)",
        "",
    ]
    for K in (768, 3072):
        for d in GPU_BACKEND_DESIGNS:
            lines += [f"### {DESIGNS['denoise_loss'][d][0]}, K = {K}", ""]
            lines += breakdown("denoise_loss", d, K, M=TARGET_M) + [""]
    lines += ["## Assumptions", ""] + [f"- {a}" for a in assumptions()] + [""]
    lines += ["## Loss forward + backward", ""] + loss_tables()
    lines += ["## Merge forward", ""] + merge_tables()
    return "\n".join(lines)


def _saved_note() -> str:
    M, K, dt = TARGET_M, 768, DTYPES[TARGET_DTYPE]
    return (f"Saved for backward (M = {M}, K = {K}, {dt.name}): the eager code keeps four M x K tensors "
            f"({loss.eager_saved_bytes(M, K, dt) / 2**20:.0f} MiB: the Linear's input, eps, pred, eps - pred); every "
            f"drep design keeps its finished K x K + K float32 gradients ({loss.drep_saved_bytes(K) / 2**20:.1f} MiB).")


def _target_notes() -> list[str]:
    """Plain sentences on why the verdicts come out as they do, from the model's own numbers."""
    M, gpu, dt = TARGET_M, GPUS[TARGET_GPU], TARGET_DTYPE

    def loss_t(design, K):
        return totals("denoise_loss", design, dtype=dt, gpu=TARGET_GPU, **_shape("denoise_loss", K, M=M))

    notes = []
    for K, limit in ((3072, 1.3), (768, 2.0)):
        fl = floor_seconds("denoise_loss", dtype=dt, gpu=TARGET_GPU, **_shape("denoise_loss", K, M=M))
        gemms = loss_t("floor", K).seconds
        one_pass = M * math.ceil(K / 4) * gpu.philox_s
        passes = ", ".join(f"{loss_t(d, K).label} {loss_t(d, K).philox / (M * K / 4):.2g}" for d in GPU_BACKEND_DESIGNS)
        notes.append(
            f"- {limit:g}x the floor at K = {K} is {limit * fl * 1e6:.0f} us in all. The two GEMMs alone, at the "
            f"model's cuBLAS efficiency (the benchmark's floor contender), take {gemms * 1e6:.0f} us "
            f"({gemms / fl:.2f}x); one Philox pass over x takes {one_pass * 1e6:.0f} us ({one_pass / fl:.2f}x). "
            f"Noise passes (one Philox call per four elements of x each) per design: {passes}."
        )
    eager = loss_t("eager", 768).seconds
    for d in GPU_BACKEND_DESIGNS:
        t = loss_t(d, 768)
        noise = t.philox * gpu.philox_s
        notes.append(
            f"- 3x faster than eager at K = 768 needs at most {eager / 3 * 1e6:.0f} us (eager {eager * 1e6:.0f} us); "
            f"{t.label} is at {t.seconds * 1e6:.0f} us, of which {t.launches * gpu.launch_s * 1e6:.0f} us are its "
            f"{t.launches} launches and {noise * 1e6:.0f} us its Philox calls."
        )
    for d in GPU_BACKEND_DESIGNS:
        worst = max(MERGE_SHAPES, key=lambda s: _merge_ratio(d, *s))
        t = totals("merge_weights", d, dtype=dt, gpu=TARGET_GPU, **_shape("merge_weights", worst[1], out=worst[0]))
        add = floor_seconds("merge_weights", dtype=dt, gpu=TARGET_GPU, **_shape("merge_weights", worst[1], out=worst[0]))
        slowest = max(t.kernels, key=lambda k: seconds(k, gpu))
        notes.append(
            f"- Merge, {t.label}: worst at {worst[0]} x {worst[1]}, {t.seconds * 1e6:.0f} us against torch.addmm's "
            f"{add * 1e6:.0f} us; {t.launches} launch{'es' if t.launches > 1 else ''} (addmm: 2), slowest "
            f"kernel {slowest.name}, bound by {bound(slowest, gpu)}."
        )
    return notes + [""]


def _merge_ratio(design: str, out: int, K: int, gpu: str = TARGET_GPU) -> float:
    """The merge's time over torch.addmm's (bf16)."""
    shape = _shape("merge_weights", K, out=out)
    return (totals("merge_weights", design, dtype=TARGET_DTYPE, gpu=gpu, **shape).seconds
            / floor_seconds("merge_weights", dtype=TARGET_DTYPE, gpu=gpu, **shape))
