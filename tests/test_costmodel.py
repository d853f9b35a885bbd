"""The cost model (benchmarks/costmodel) counts what the code does, and the GPU report shows
its predictions: hand-counted numbers on tiny shapes, its constants and op lists against the
code and a dispatch trace, the published table up to date, predicted beside measured."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed with the package (see test_benchmarks_smoke.py)
    sys.path.append(str(ROOT))

from benchmarks import baselines, costmodel, report, shapes  # noqa: E402
from benchmarks.costmodel import hardware, loss, merge, tables  # noqa: E402
from benchmarks.triton_aot import _float32_precision  # noqa: E402

H100 = "h100-sxm"


def _sum(ks, field):
    return sum(getattr(k, field) for k in ks)


# --- hand-counted numbers -----------------------------------------------------------------------

def test_triton_loss_counts_by_hand():
    """M, K multiples of every block: one chunk, no padding, no row split (256 rows). Noise drawn
    once (eps stored with x_noisy, read by the epilogue), four normals per Philox call: M K / 4
    calls; both GEMMs 2 M K^2 FLOPs. Launches: seed, one fill of the partials, 3 kernels, the
    finalize kernel (dW_d is scaled by GEMM 2's alpha), then autograd: ones_like and 2 scalings
    written in the weight dtype (no separate casts); no materialized zeros. HBM per element of
    x (bf16): x read, eps and x_noisy written by the first kernel (6 B); eps read, G' written
    by GEMM 1's epilogue, x_noisy read (6 B); G' and x_noisy read by GEMM 2 (4 B)."""
    M, K = 256, 256
    ks = costmodel.kernels("denoise_loss", "triton", M=M, K=K, dtype="bfloat16", gpu=H100)
    assert _sum(ks, "philox") == M * math.ceil(K / 4) == 16384
    assert _sum(ks, "flops") == 4 * M * K * K
    assert _sum(ks, "launches") == 1 + 1 + 3 + 1 + 3 == 9
    assert _sum(costmodel.kernels("denoise_loss", "triton", M=M, K=K, dtype="float32", gpu=H100), "launches") == 9
    noisy, gemm1 = (k for k in ks if "_noisy_input_kernel" in k.name or "_loss_gemm_kernel" in k.name)
    assert noisy.hbm == 6 * M * K and gemm1.philox == 0
    # GEMM 1 on 128 x 128 tiles: 2 x 2 programs. Into the SMs: x_noisy once per column block
    # (2 x 131072 B), the eps tiles once (131072 B), W_d and b_d once per row block (2 x 131584
    # B). Unique: x_noisy, eps, W_d, b_d (393728 B); stores: G' (131072 B), 4 programs' two
    # loss partials (32 B), 2 row blocks' db_d sums (2048 B); 5% of the re-reads miss L2.
    assert gemm1.l2 == 2 * 131072 + 131072 + 2 * 131584 == 656384
    assert gemm1.hbm == pytest.approx(393728 + (1 - hardware.L2_HIT) * (656384 - 393728) + 131072 + 32 + 2048)


def test_triton_loss_counts_padded_tiles():
    """M = 100, K = 60: the kernels compute whole tiles. _noisy_input_kernel 16 x 128 tiles:
    112 x 128 / 4 calls (the epilogue draws none); GEMM 1 (128, 128, 32) on bf16: 2 x 128 x 128
    x 64; GEMM 2 (dW_d tile 128 x 128, depth in steps of 32): 2 x 128 x 128 x 128."""
    ks = costmodel.kernels("denoise_loss", "triton", M=100, K=60, dtype="bfloat16", gpu=H100)
    assert _sum(ks, "philox") == 112 * 128 / 4 == 3584
    assert _sum(ks, "flops") == 2 * 128 * 128 * 64 + 2 * 128 * 128 * 128


def test_triton_grad_gemm_split_over_rows():
    """M = 12608, K = 768 (one chunk): 36 dW_d tiles, three row splits of 4224, 4224 and 4160
    rows (108 programs), each padded to BLOCK_R = 32 (4160 is a multiple); then one sum of the
    three float32 slabs into dW_d. K = 3072: 576 tiles fill the SMs, no split, no sum."""
    M, K = 12608, 768
    ks = costmodel.kernels("denoise_loss", "triton", M=M, K=K, dtype="bfloat16", gpu=H100)
    grad = [k for k in ks if "_grad_gemm_kernel" in k.name]
    sums = [k for k in ks if "_split_sum_kernel" in k.name]
    assert len(grad) == len(sums) == 1 and "3 row splits" in grad[0].name
    assert grad[0].flops == 2 * 768 * 768 * (4224 + 4224 + 4160)
    assert grad[0].eff == pytest.approx(hardware.GEMM_EFF["triton"] * 108 / 132 * hardware.depth_eff(4224))
    assert sums[0].hbm == 4 * K * K * (3 + 1)  # the slabs read, dW_d written (chunk 0: not read)
    wide = costmodel.kernels("denoise_loss", "triton", M=M, K=3072, dtype="bfloat16", gpu=H100)
    assert not any("_split_sum_kernel" in k.name for k in wide)
    assert all("1 row split" in k.name for k in wide if "_grad_gemm_kernel" in k.name)


def test_cuda_loss_counts_by_hand():
    """One chunk. Main: Philox once per four elements in noisy_input_kernel, once per element
    in the epilogue; the revision once per four in both. Launches of main: seed, 2 fills, 5 per
    chunk, 4 at the end, 5 of autograd (scalings, then casts), the b_d cast and the dW_d
    division; of the revision: seed, 5 per chunk (the finalize kernel starts and ends the sums),
    3 of autograd (scalings written in the weight dtype). No materialized zeros."""
    M, K = 256, 256
    main = costmodel.kernels("denoise_loss", "cuda-pre12", M=M, K=K, dtype="bfloat16", gpu=H100)
    rev = costmodel.kernels("denoise_loss", "cuda", M=M, K=K, dtype="bfloat16", gpu=H100)
    assert _sum(main, "philox") == M * K / 4 + M * K
    assert _sum(rev, "philox") == 2 * M * K / 4
    assert _sum(rev, "launches") == 1 + 5 + 3 == 9
    assert _sum(main, "launches") == 1 + 2 + 5 + 4 + 5 + 2 == 19
    assert _sum(main, "flops") == _sum(rev, "flops") == 4 * M * K * K


def test_cuda_revision_accumulates_in_place():
    """Three chunks: main adds each later chunk's K x K buffer with add_ (2 launches more, 3 K^2
    float32 each); the revision's GEMM 2 reads its K x K result instead (beta = 1)."""
    K = 1024
    M = 3 * loss.cuda_chunk_rows(loss.CUDA_PRE12, 10**6, K, costmodel.DTYPES["bfloat16"])
    main = costmodel.kernels("denoise_loss", "cuda-pre12", M=M, K=K, dtype="bfloat16", gpu=H100)
    rev = costmodel.kernels("denoise_loss", "cuda", M=M, K=K, dtype="bfloat16", gpu=H100)
    adds = [k for k in main if "add_" in k.name]
    assert len(adds) == 2 and all(k.hbm == 3 * K * K * 4 for k in adds)
    assert sum("beta = 1" in k.name for k in rev) == 2
    assert not any("add_" in k.name for k in rev)


def test_triton_before_12_regenerates_noise():
    """The old kernel drew each element's noise 2 ceil(K / BLOCK_N) + 1 times (BLOCK_N = 64)."""
    M, K = 256, 256
    ks = costmodel.kernels("denoise_loss", "triton-pre12", M=M, K=K, dtype="bfloat16", gpu=H100)
    assert _sum(ks, "philox") == (2 * math.ceil(K / 64) + 1) * M * K / 4


def test_floor_is_four_m_k_squared_at_peak():
    M, K = 1576, 768
    assert loss.floor_flops(M, K) == 4 * M * K * K
    assert costmodel.floor_seconds("denoise_loss", K, "bfloat16", H100, M=M) == 4 * M * K * K / 989e12
    assert costmodel.floor_seconds("denoise_loss", K, "tf32", H100, M=M) == 4 * M * K * K / 495e12
    assert costmodel.floor_seconds("denoise_loss", K, "float32", "h200", M=M) == 4 * M * K * K / 67e12
    # The benchmark's floor contender runs exactly those FLOPs in two cuBLAS calls.
    floor = costmodel.kernels("denoise_loss", "floor", M=M, K=K, dtype="bfloat16", gpu=H100)
    assert len(floor) == 2 and _sum(floor, "flops") == 4 * M * K * K


@pytest.mark.parametrize("gpu, date, what, measured, unit", hardware.CALIBRATION)
def test_model_reproduces_the_lent_gpus_measurements(gpu, date, what, measured, unit):
    """The efficiency assumptions against what was measured on the lent H100 / H200: the model's
    time for the same work (an 8192^3 bf16 product; a 4 GiB device-to-device copy, its bytes read
    and written) gives the measured rate within the stated tolerance."""
    g = hardware.GPUS[gpu]
    if unit == "TFLOP/s":
        n = 8192
        k = hardware.cublas_gemm("matmul", n, n, n, hardware.DTYPES["bfloat16"], g, hbm=3 * n * n * 2)
        rate = k.flops / hardware.seconds(k, g) / 1e12
    else:
        moved = 2 * 4 * 2**30
        rate = moved / hardware.seconds(hardware.stream("copy", moved), g) / 1e12
    assert rate == pytest.approx(measured, rel=hardware.CALIBRATION_TOLERANCE), (what, rate)


def test_merge_counts_by_hand():
    """addmm: a copy of W, then one GEMM (2 out K^2). Triton: one launch over K columns (the
    bias column on the CUDA cores, no MMA tile of its own). CUDA main: cat, GEMM over K + 1, two scale_adds;
    the revision: addmm's two launches (the copy, with b' formed in its pass, and one GEMM)."""
    out, K = 3072, 768
    add = costmodel.kernels("merge_weights", "floor", out=out, K=K, dtype="bfloat16", gpu=H100)
    tri = costmodel.kernels("merge_weights", "triton", out=out, K=K, dtype="bfloat16", gpu=H100)
    main = costmodel.kernels("merge_weights", "cuda-pre12", out=out, K=K, dtype="bfloat16", gpu=H100)
    rev = costmodel.kernels("merge_weights", "cuda", out=out, K=K, dtype="bfloat16", gpu=H100)
    assert (_sum(add, "launches"), _sum(add, "flops")) == (2, 2 * out * K * K)
    assert (_sum(tri, "launches"), _sum(tri, "flops")) == (1, 2 * out * K * K)
    assert (_sum(main, "launches"), _sum(main, "flops")) == (4, 2 * out * (K + 1) * K)
    assert (_sum(rev, "launches"), _sum(rev, "flops")) == (2, 2 * out * K * K)
    assert _sum(rev, "hbm") == _sum(add, "hbm") + K * 2 + 2 * out * 2  # plus b_d, b and b' (bf16)


DESIGNS = [(op, d) for op in costmodel.OPS for d in costmodel.DESIGNS[op]]


@pytest.mark.parametrize("op, design", DESIGNS)
def test_monotonic_in_rows(op, design):
    """More rows (the loss's M, the merge's out) never cost less; FLOPs, bytes and noise grow."""
    rows = [197 * b for b in (1, 2, 5, 8, 13, 32, 55, 64, 100, 128)]

    def at(r, gpu=H100):
        size = {"M": r} if op == "denoise_loss" else {"out": r}
        return costmodel.totals(op, design, K=768, dtype="bfloat16", gpu=gpu, **size)

    for gpu in costmodel.GPUS:
        ts = [at(r, gpu) for r in rows]
        for a, b in zip(ts, ts[1:]):
            # (equal times, wave-quantized, may differ in the last bit)
            assert b.seconds >= a.seconds * (1 - 1e-12) and b.flops > a.flops and b.hbm > a.hbm and b.philox >= a.philox


@pytest.mark.parametrize("op, design", DESIGNS)
def test_float16_costs_what_bfloat16_costs(op, design):
    size = {"M": 6304} if op == "denoise_loss" else {"out": 3072}
    assert (costmodel.predict(op, design, size.get("M", 0), 768, "float16", H100, out=size.get("out", 0))
            == costmodel.predict(op, design, size.get("M", 0), 768, "bfloat16", H100, out=size.get("out", 0)))


def test_predict_rejects_what_it_does_not_model():
    with pytest.raises(ValueError, match="op must be one of"):
        costmodel.predict("linear", "triton", 10, 8, "bfloat16", H100)
    with pytest.raises(ValueError, match="no design 'torch' for denoise_loss"):
        costmodel.predict("denoise_loss", "torch", 10, 8, "bfloat16", H100)
    with pytest.raises(ValueError, match="dtype must be one of"):
        costmodel.predict("denoise_loss", "triton", 10, 8, "float64", H100)
    with pytest.raises(ValueError, match="gpu must be one of"):
        costmodel.predict("denoise_loss", "triton", 10, 8, "bfloat16", "a100")
    with pytest.raises(ValueError, match="out must be a positive int for merge_weights"):
        costmodel.predict("merge_weights", "triton", 10, 8, "bfloat16", H100)
    # The built backends map to their designs.
    assert costmodel.predict("denoise_loss", "cuda", 1576, 768, "bfloat16", H100) == costmodel.predict(
        "denoise_loss", costmodel.BACKENDS["cuda"], 1576, 768, "bfloat16", H100)


# --- the model's constants and op lists are the code's ------------------------------------------

def test_triton_constants_are_the_code():
    from drep_kernels.triton import denoise_loss as tdl
    from drep_kernels.triton import merge_weights as tmw

    assert loss.TRITON_CHUNK_BYTES == tdl.CHUNK_BYTES and loss.TRITON_ROW_QUANTUM == tdl._ROW_QUANTUM
    assert loss.TRITON_NOISY_TILE == (tdl._NOISY_CONFIG["BLOCK_M"], tdl._NOISY_CONFIG["BLOCK_K"])
    # The shipped lists (the kernels' own configs are the interpreter's one under TRITON_INTERPRET).
    shipped = {id(tdl._loss_kernel): tdl._LOSS_CONFIGS, id(tdl._loss_kernel_128): tdl._LOSS_CONFIGS_128,
               id(tdl._grad_kernel): tdl._GRAD_CONFIGS, id(tdl._grad_kernel_128): tdl._GRAD_CONFIGS_128}
    for name, dt in costmodel.DTYPES.items():
        gemm = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)
        with _float32_precision(torch, dt.path == "tf32"):
            loss_kern, grad_kern = tdl._kernels(gemm)
        lc, gc = shipped[id(loss_kern)][0].kwargs, shipped[id(grad_kern)][0].kwargs
        assert loss.TRITON_LOSS_TILE[dt.path] == (lc["BLOCK_M"], lc["BLOCK_N"], lc["BLOCK_K"]), name
        assert loss.TRITON_GRAD_TILE[dt.path] == (gc["BLOCK_N"], gc["BLOCK_K"], gc["BLOCK_R"]), name
    assert loss.TRITON_PART_BLOCK == min(
        c.kwargs[b] for cs in (tdl._LOSS_CONFIGS, tdl._LOSS_CONFIGS_128) for c in cs for b in ("BLOCK_M", "BLOCK_N")
    )
    merge_shipped = {id(tmw._kernel): tmw._CONFIGS, id(tmw._kernel_128): tmw._CONFIGS_128}
    for name, dt in costmodel.DTYPES.items():
        gemm = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)
        with _float32_precision(torch, dt.path == "tf32"):
            kernel = tmw._kernel_for(gemm)
        mc = merge_shipped[id(kernel)][0].kwargs
        assert merge.TRITON_TILE[dt.path] == (mc["BLOCK_R"], mc["BLOCK_N"], mc["BLOCK_K"]), name
    for M, K in [(100, 60), (12608, 768), (25216, 3072), (197, 40000)]:
        for size in (2, 4):
            assert loss.triton_chunk_rows(M, K, size) == tdl.chunk_rows(M, K, size)
    assert loss.TRITON_SPLIT_TILE == tdl._SPLIT_TILE and loss.TRITON_SPLIT_MIN_ROWS == tdl.SPLIT_MIN_ROWS
    for R, K, sms in [(12608, 768, 132), (12608, 384, 132), (1576, 384, 108), (4099, 515, 132), (511, 64, 132)]:
        splits, rows = tdl.grad_splits(R, K, sms)
        assert loss.triton_grad_splits(R, K, sms) == loss.chunks(R, rows) and len(loss.chunks(R, rows)) == splits


def test_cuda_constants_are_the_code():
    """The CUDA loss's chunk budget and stripe layout, as csrc/cuda/denoise_loss.cu defines them."""
    src = (Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "denoise_loss.cu").read_text()

    def value(pattern):
        m = re.search(pattern, src)
        assert m, pattern
        return m.group(1)

    assert loss.CUDA_TC.chunk_bytes == 64 << int(value(r"#define DREP_LOSS_CHUNK_BYTES \(int64_t\(64\) << (\d+)\)"))
    assert loss.CUDA_TC.min_chunk_rows == int(value(r"kMinChunkRows = (\d+);"))
    assert loss.STRIPE_TARGET == int(value(r"#define DREP_LOSS_TARGET_STRIPES (\d+)"))
    assert loss.ROW_LANES == int(value(r"constexpr int kRowLanes = (\d+);"))
    assert loss.MAX_ROWS_PER_LANE == int(value(r"constexpr int kMaxRowsPerLane = (\d+);"))
    # stripe_rows against the kernel's rule, written out: 1, 2, 4 or 8 rows per lane.
    for R, lanes in [(1, 1), (4096, 1), (4097, 2), (8192, 2), (8193, 4), (16385, 8), (10**6, 8)]:
        assert loss.stripe_rows(R) == 8 * lanes, R


def test_shapes_are_the_benchmarks():
    assert tables.LOSS_KS == tuple(sorted({k for k, _ in shapes.VIT_LAYERS.values()}))
    swept = {s.M for sizes in ("default", "full") for s in shapes.shapes("denoise_loss", sizes)}
    assert swept | {tables.TARGET_M} == set(tables.LOSS_MS)
    assert set(tables.MERGE_SHAPES) == {(s.out, s.K) for s in shapes.shapes("merge_weights", "full")}


def test_triton_launches_are_the_code(monkeypatch):
    """Run the Triton loss (interpreter) on a shape that takes three chunks and count its
    kernel launches: the model's chunking and launches per chunk."""
    from drep_kernels.triton import denoise_loss as tdl

    launched = []

    class Counting:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

        def __getattr__(self, attr):  # the launcher reads the autotuner's configs
            return getattr(self.kernel, attr)

    for attr in ("_noisy_input_kernel", "_loss_kernel", "_grad_kernel", "_loss_kernel_128", "_grad_kernel_128",
                 "_split_sum_kernel"):
        monkeypatch.setattr(tdl, attr, Counting(getattr(tdl, attr), attr.removesuffix("_128")))
    chunk_bytes = 256 * 64 * 2 * 4  # 256-row chunks of float32: 256, 256, 88 rows
    monkeypatch.setattr(tdl, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(tdl, "SPLIT_MIN_ROWS", 64)  # two row splits of the 256-row chunks
    M, K = 600, 64
    x = torch.randn(M, K)
    w = torch.randn(K, K) / 8
    tdl.denoise_loss_fwd(x, w, torch.randn(K), 0.9, 0.1, None, torch.tensor(5), True)
    model = loss.triton(M, K, costmodel.DTYPES["float32"], costmodel.GPUS[H100], chunk_bytes=chunk_bytes,
                        split_min_rows=64)
    names = {"_noisy_input_kernel": "_noisy_input_kernel", "_loss_kernel": "_loss_gemm_kernel",
             "_grad_kernel": "_grad_gemm_kernel", "_split_sum_kernel": "_split_sum_kernel"}
    counted = [names[n] for n in launched]
    modelled = [k.name.split(": ")[1].split(" ")[0] for k in model if k.name.startswith("chunk ")]
    assert counted == modelled and len(counted) == 4 + 4 + 3


class _AtenOps(TorchDispatchMode):
    """The aten ops a region dispatches, without those that launch no kernel (views, detach)."""

    # (_unsafe_view: a view that torch 2.15 dispatches after a 3-D linear, where 2.14 does not)
    NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "expand", "detach", "select", "squeeze_"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.NO_KERNEL:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_eager_loss_ops_are_its_dispatch_trace():
    torch.manual_seed(0)
    den = baselines.ReferenceDenoiser(32, 12, dtype=torch.bfloat16)
    x = torch.randn(2, 197, 32, dtype=torch.bfloat16)
    with _AtenOps() as fwd:
        out = den.loss(x)
    with _AtenOps() as bwd:
        out.backward()
    assert tuple(fwd.ops) == loss.EAGER_FORWARD_OPS
    assert tuple(bwd.ops) == loss.EAGER_BACKWARD_OPS
    ks = costmodel.kernels("denoise_loss", "eager", M=394, K=32, dtype="bfloat16", gpu=H100)
    # One kernel per op, mse_loss two (elementwise, then mean).
    assert _sum(ks, "launches") == len(fwd.ops) + len(bwd.ops) + 1


def test_eager_merge_ops_are_its_dispatch_trace():
    tab = baselines.schedule_tables(dtype=torch.bfloat16)
    W, b = torch.randn(48, 32, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16)
    w_d, b_d = torch.randn(32, 32, dtype=torch.bfloat16), torch.randn(32, dtype=torch.bfloat16)
    with _AtenOps() as ops:
        baselines.reference_merge_tensors(W, b, w_d, b_d, tab["c1"][12], tab["c3"][12])
    assert tuple(ops.ops) == merge.EAGER_OPS
    ks = costmodel.kernels("merge_weights", "eager", out=48, K=32, dtype="bfloat16", gpu=H100)
    assert _sum(ks, "launches") == len(ops.ops)


# --- the published table and the targets ------------------------------------------------------

def test_published_table_is_the_model():
    published = ROOT / "benchmarks" / "results" / "costmodel-h100-h200.md"
    assert published.read_text() == tables.markdown() + "\n", (
        "benchmarks/results/costmodel-h100-h200.md is stale: "
        "python -m benchmarks.costmodel --out benchmarks/results/costmodel-h100-h200.md")


def test_verdicts_read_the_model():
    """A verdict is its design's modelled ratio against the target's bound."""
    by = {(v.target, v.design): v for v in tables.verdicts()}
    v = by[("loss at most 2x the two-GEMM floor at K = 768", "triton")]
    expect = (costmodel.predict("denoise_loss", "triton", 12608, 768, "bfloat16", H100)
              / costmodel.floor_seconds("denoise_loss", 768, "bfloat16", H100, M=12608))
    assert v.value == expect and v.met == (expect <= 2.0)
    v = by[("loss at least 3x faster than eager at K = 384", "cuda")]
    expect = (costmodel.predict("denoise_loss", "eager", 12608, 384, "bfloat16", H100)
              / costmodel.predict("denoise_loss", "cuda", 12608, 384, "bfloat16", H100))
    assert v.value == expect and v.met == (expect >= 3.0)


def test_sensitivity_columns_and_restored_assumptions():
    """The base column is the verdicts; the model's own assumptions are the same after the
    table is made; the column that gives Triton's GEMMs cuBLAS's factor and no L2 bound moves
    triton rows (those its GEMMs bound) and no other."""
    gpus, eff = dict(hardware.GPUS), dict(hardware.GEMM_EFF)
    table = tables.sensitivity()
    assert hardware.GPUS == gpus and hardware.GEMM_EFF == eff
    head, rows = table[0].strip("| ").split(" | "), [line.strip("| ").split(" | ") for line in table[2:]]
    base, as_cublas = head.index("base assumptions"), head.index("Triton: no L2 bound, cuBLAS's factor")
    by = {(v.target, v.design): v for v in tables.verdicts()}
    for row in rows:
        assert float(row[base].split()[0]) == round(by[(row[0], row[1])].value, 2)
        moved = row[as_cublas] != row[base]
        assert not moved or row[1] == "triton", row
    assert any(row[as_cublas] != row[base] for row in rows if row[1] == "triton")


# --- the GPU report prints predicted beside measured --------------------------------------------

def _bench(group, contender, role, median, device, device_name, **info):
    op, mode = group.split("/")[0].rstrip("]").split("[")
    dtype = group.split("/")[-1]
    extra = {"median_s": median, "contender": contender, "role": role, "rounds": 5, "op": op, "mode": mode,
             "dtype": dtype, "device": device, "device_name": device_name, "timer": "cuda_event", **info}
    return {"group": group, "name": f"test_x[{contender}]", "param": contender, "extra_info": extra,
            "stats": {"median": median, "rounds": 5}}


def _saved(device_name, device="cuda"):
    loss_group = "denoise_loss[full]/M1576xK768/bfloat16"
    merge_group = "merge_weights[forward]/out3072xK768/tf32"
    shape = {"M": 1576, "K": 768}
    return {
        "machine_info": {"drep": {"device": device, "device_name": device_name}},
        "benchmarks": [
            _bench(loss_group, "floor", "floor", 4e-5, device, device_name, **shape),
            _bench(loss_group, "eager", "eager", 2e-4, device, device_name, **shape),
            _bench(loss_group, "drep[triton]", "drep", 1e-4, device, device_name, **shape),
            _bench(loss_group, "drep[cuda]", "drep", 8e-5, device, device_name, **shape),
            _bench(loss_group, "drep[torch]", "drep", 9e-4, device, device_name, **shape),
            _bench(merge_group, "floor", "floor", 2e-5, device, device_name, K=768, out=3072),
            _bench(merge_group, "drep[triton]", "drep", 3e-5, device, device_name, K=768, out=3072),
        ],
    }


def _report(tmp_path, saved) -> str:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(saved))
    assert report.main([str(path), "--out", str(tmp_path), "--print", "none"]) == 0
    return (tmp_path / "report.md").read_text()


def _cells(text, contender, group):
    block = text.split(f"### `{group}`")[1]
    row = next(line for line in block.splitlines() if line.startswith(f"| {contender} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_gpu_report_prints_predicted_beside_measured(tmp_path):
    text = _report(tmp_path, _saved("NVIDIA H100 80GB HBM3"))
    loss_group = "denoise_loss[full]/M1576xK768/bfloat16"
    for contender, backend, median in [("floor", "floor", 4e-5), ("eager", "eager", 2e-4),
                                       ("drep[triton]", "triton", 1e-4), ("drep[cuda]", "cuda", 8e-5)]:
        p = costmodel.predict("denoise_loss", backend, 1576, 768, "bfloat16", H100)
        assert _cells(text, contender, loss_group)[1:4] == [report.fmt_time(median), report.fmt_time(p),
                                                           f"{median / p:.2f}"], contender
    assert _cells(text, "drep[torch]", loss_group)[2:4] == ["-", "-"]  # the torch backend is not modelled
    p = costmodel.predict("merge_weights", "triton", 0, 768, "tf32", H100, out=3072)
    assert _cells(text, "drep[triton]", "merge_weights[forward]/out3072xK768/tf32")[2] == report.fmt_time(p)
    summary = text.split("## Summary")[1]
    assert "| drep median | predicted | x floor |" in summary
    best = costmodel.predict("denoise_loss", "cuda", 1576, 768, "bfloat16", H100)
    assert f"| drep[cuda] | 80 us | {report.fmt_time(best)} |" in summary


def test_gpu_report_on_another_card_predicts_nothing(tmp_path):
    text = _report(tmp_path, _saved("NVIDIA A100-SXM4-80GB"))
    assert _cells(text, "drep[triton]", "denoise_loss[full]/M1576xK768/bfloat16")[2:4] == ["-", "-"]


def test_cpu_report_has_no_prediction(tmp_path):
    text = _report(tmp_path, _saved("AMD EPYC (2 logical cores)", device="cpu"))
    assert "predicted" not in text and "meas / pred" not in text
