"""Races between the programs of one Triton launch, caught under the interpreter.

The interpreter runs a grid's programs one after another, so a kernel whose programs store to
one address (a lost update, or last-writer-wins, on a GPU) passes every oracle test there. Here
(tools in triton_interp_tools.py):

1. the check itself, on small kernels with and without races and out-of-bounds accesses;
2. every Triton kernel and path under ``record_stores()``: no byte stored by two programs of a
   launch, none read by one program and stored by another, none read or stored outside the
   launch's tensor arguments. The loss makes three launches per row chunk (x_noisy, GEMM 1
   with its epilogue, the dW_d GEMM; a fourth, the sum of the dW_d GEMM's row splits, where it
   splits), each checked, over one chunk and several (the chunk budget lowered);
3. the oracle tests of test_triton_backend.py with the grid walked in reverse (their forward
   order is that file's own run), and shapes whose K is a multiple of every block size the
   interpreter runs (32 for the GEMMs, 128 for the x_noisy kernel's columns; 64 also covers the
   16 and 64 of the other-block-shapes test), in both orders: the merge's last column block is
   then a full one, and its bias column is formed by the first.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1":
    # On a GPU the kernels are compiled: nothing goes through the interpreter to record.
    pytest.skip("the race checks need TRITON_INTERPRET=1 (they patch Triton's interpreter)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from drep_kernels.backends import kernels  # noqa: E402

import test_triton_backend as tb  # noqa: E402
from triton_interp_tools import RaceError, record_stores, reverse_grid  # noqa: E402

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


def _ids(value):
    return str(value).replace("torch.", "")


# ---------------------------------------------------------------- the check itself


@triton.jit
def _tiles_kernel(out_ptr, n, step, width, BLOCK: tl.constexpr):
    # Program p stores p + 1 into out[p * step + i] for the lanes i < width (inside n).
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    offs = pid * step + lane
    value = (pid + 1).to(tl.float32) + tl.zeros((BLOCK,), dtype=tl.float32)
    tl.store(out_ptr + offs, value, mask=(lane < width) & (offs < n))


@triton.jit
def _neighbour_kernel(buf_ptr, READ_OFFSET: tl.constexpr):
    # Program p stores buf[p + READ_OFFSET] + 1 into buf[p].
    pid = tl.program_id(0)
    tl.store(buf_ptr + pid, tl.load(buf_ptr + pid + READ_OFFSET) + 1.0)


@triton.jit
def _grid_kernel(out_ptr, LAST_WRITER: tl.constexpr):
    # Program (x, y) stores its linear index x ny + y into out[x ny + y], or all into out[0].
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    if LAST_WRITER:
        tl.store(out_ptr, pid.to(tl.float32))
    else:
        tl.store(out_ptr + pid, pid.to(tl.float32))


@triton.jit
def _shifted_copy_kernel(src_ptr, dst_ptr, n, READ_SHIFT: tl.constexpr, WRITE_SHIFT: tl.constexpr,
                         BLOCK: tl.constexpr):
    # dst[i + WRITE_SHIFT] = src[i + READ_SHIFT] for i < n: one element past the end when shifted.
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs + WRITE_SHIFT, tl.load(src_ptr + offs + READ_SHIFT, mask=mask), mask=mask)


def test_disjoint_tiles_pass_and_are_recorded():
    out = torch.zeros(70)
    with record_stores() as launches:
        _tiles_kernel[(3,)](out, 70, 32, 32, BLOCK=32)
    assert [(l.kernel, l.grid, l.stored_bytes) for l in launches] == [("_tiles_kernel", (3, 1, 1), 70 * 4)]
    assert torch.equal(out, torch.arange(70).div(32, rounding_mode="floor").add(1).float())


def test_overlapping_tiles_are_a_race():
    # Tiles of 32 every 31 elements: element 31 is program 0's last and program 1's first.
    with pytest.raises(RaceError, match=r"(?s)_tiles_kernel.*stored by more than one program.*"
                                        r"out_ptr\[31\] stored by programs \(0, 0, 0\) and \(1, 0, 0\)"):
        with record_stores():
            _tiles_kernel[(3,)](torch.zeros(70), 70, 31, 32, BLOCK=32)


def test_masked_lanes_are_not_stores():
    # The same pointers, the shared lane masked off in every program: no byte stored twice.
    with record_stores() as launches:
        _tiles_kernel[(3,)](torch.zeros(70), 70, 31, 31, BLOCK=32)
    assert launches[0].stored_bytes == 70 * 4  # every element once: 0..30, 31..61, 62..69


def test_reading_its_own_store_is_no_race():
    buf = torch.arange(5.0)
    with record_stores() as launches:
        _neighbour_kernel[(5,)](buf, READ_OFFSET=0)
    assert len(launches) == 1 and torch.equal(buf, torch.arange(5.0) + 1)


def test_reading_another_programs_store_is_a_race():
    # Program p reads buf[p + 1], which program p + 1 stores: on a GPU either value may be read.
    with pytest.raises(RaceError, match=r"(?s)read by one program and stored by another.*"
                                        r"buf_ptr\[1\] read by program \(0, 0, 0\), stored by program \(1, 0, 0\)"):
        with record_stores():
            _neighbour_kernel[(4,)](torch.zeros(5), READ_OFFSET=1)


@pytest.mark.parametrize("read_shift,write_shift,kind", [(1, 0, "read"), (0, 1, "stored")])
def test_access_past_a_tensor_is_out_of_bounds(read_shift, write_shift, kind):
    # Views of larger buffers: the byte past each view's end is memory, just not the view's.
    src, dst = torch.arange(16.0)[:7], torch.zeros(16)[:7]
    with record_stores() as launches:
        _shifted_copy_kernel[(1,)](src, dst, 7, READ_SHIFT=0, WRITE_SHIFT=0, BLOCK=8)
    assert len(launches) == 1 and torch.equal(dst, src)
    with pytest.raises(RaceError, match=rf"(?s)4 byte\(s\) {kind} outside every tensor argument.*program \(0, 0, 0\)"):
        with record_stores():
            _shifted_copy_kernel[(1,)](src, dst, 7, READ_SHIFT=read_shift, WRITE_SHIFT=write_shift, BLOCK=8)


def test_reverse_grid_walks_every_program_once_backwards():
    grid = (3, 4)
    forward = [(x, y, 0) for x in range(3) for y in range(4)]
    for order, walk in ((forward, None), (forward[::-1], reverse_grid)):
        out = torch.full((12,), -1.0)
        with record_stores() as launches, (walk() if walk else contextlib.nullcontext()):
            _grid_kernel[grid](out, LAST_WRITER=False)
        assert launches[0].order == order
        assert torch.equal(out, torch.arange(12.0))


def test_reverse_grid_changes_the_last_writer():
    # What a race-free kernel must never show: the result depends on the programs' order.
    out = torch.zeros(1)
    _grid_kernel[(3, 4)](out, LAST_WRITER=True)
    assert out.item() == 11
    with reverse_grid():
        _grid_kernel[(3, 4)](out, LAST_WRITER=True)
    assert out.item() == 0
    with pytest.raises(RaceError, match="stored by more than one program"), record_stores():
        _grid_kernel[(3, 4)](out, LAST_WRITER=True)


def test_an_untested_triton_is_refused(monkeypatch):
    # The patches rely on the interpreter's internals: another release must be checked first.
    monkeypatch.setattr(triton, "__version__", "3.5.0")
    with pytest.raises(RuntimeError, match="written for the interpreter of triton 3.6 to 3.9.*triton 3.5.0"):
        with record_stores():
            pass


def test_a_block_without_launches_is_an_error():
    with pytest.raises(AssertionError, match="nothing was checked"), record_stores():
        pass


# ---------------------------------------------------------------- every kernel and path

A, S, C1, C3 = tb.A, tb.S, tb.C1, tb.C3

# The loss's launches per row chunk, and after the chunks (drep_kernels/triton/denoise_loss.py).
NOISY, LOSS, GRAD = "_noisy_input_kernel", "_loss_gemm_kernel", "_grad_gemm_kernel"
SPLIT_SUM, FINALIZE = "_split_sum_kernel", "_finalize_kernel"


def _launched(launches, names, chunks=1, tail=()):
    """The launches were the kernels ``names`` per chunk, ``chunks`` times, then ``tail``, each
    storing something."""
    assert [l.kernel for l in launches] == list(names) * chunks + list(tail)
    assert all(l.stored_bytes > 0 for l in launches)


def _loss_launches(grad):
    return (NOISY, LOSS, GRAD) if grad else (NOISY, LOSS)


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=_ids)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("noise", ["given", "seeded"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_loss_paths_race_free(bias, noise, grad, dtype):
    # M = 40: two row blocks; K = 33: two column blocks, the second one column wide.
    x, w, b, eps = tb._denoise_inputs(40, 33, dtype, bias)
    with record_stores() as launches:
        kernels("triton").denoise_loss_fwd(x, w, b, A, S, eps if noise == "given" else None, torch.tensor(5), grad)
    _launched(launches, _loss_launches(grad), tail=[FINALIZE])


# K a multiple of every block the interpreter runs (32 for the GEMMs, the x_noisy kernel's 128;
# 256: two x_noisy column blocks).
# M = 97: four row blocks (two groups of GROUP_M = 2), the last one row deep.
@pytest.mark.parametrize("M,K", [(64, 32), (97, 64), (33, 256)])
def test_loss_block_multiples_race_free(M, K):
    x, w, b, _ = tb._denoise_inputs(M, K, F32)
    with record_stores() as launches:
        kernels("triton").denoise_loss_fwd(x, w, b, A, S, None, torch.tensor(5), True)
    _launched(launches, _loss_launches(True), tail=[FINALIZE])


@pytest.mark.parametrize("M,K,chunks", [(300, 32, 3), (160, 128, 2)])
def test_loss_chunks_race_free(monkeypatch, M, K, chunks):
    # 128-row chunks (the budget lowered), the last one partial or full: every launch of every
    # chunk checked, the dW_d GEMM of the later chunks adding to dW_d in place.
    from drep_kernels.triton import denoise_loss as tdl

    monkeypatch.setattr(tdl, "CHUNK_BYTES", 128 * K * 2 * F32.itemsize)
    x, w, b, _ = tb._denoise_inputs(M, K, F32)
    with record_stores() as launches:
        kernels("triton").denoise_loss_fwd(x, w, b, A, S, None, torch.tensor(5), True)
    _launched(launches, _loss_launches(True), chunks, tail=[FINALIZE])


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks"])
def test_loss_split_rows_race_free(monkeypatch, chunked):
    # dL/dW_d's GEMM split over rows (128-row splits): each split's programs store their own
    # slab, then _split_sum_kernel's programs store disjoint elements of dL/dW_d. One chunk of
    # 300 rows (three splits), or chunks of 256, 256 and 88 rows (two, two, one).
    from drep_kernels.triton import denoise_loss as tdl

    monkeypatch.setattr(tdl, "SPLIT_MIN_ROWS", 64)
    M, K = (600, 33) if chunked else (300, 33)
    if chunked:
        monkeypatch.setattr(tdl, "CHUNK_BYTES", 256 * K * 2 * F32.itemsize)
    x, w, b, _ = tb._denoise_inputs(M, K, F32)
    with record_stores() as launches:
        kernels("triton").denoise_loss_fwd(x, w, b, A, S, None, torch.tensor(5), True)
    split = (NOISY, LOSS, GRAD, SPLIT_SUM)
    _launched(launches, split * 2 + _loss_launches(True) if chunked else split, tail=[FINALIZE])


def test_loss_finalize_over_several_programs_race_free(monkeypatch):
    # 16-column finalize programs over K = 33: three programs store disjoint dL/db_d columns,
    # program 0 the loss too.
    from drep_kernels.triton import denoise_loss as tdl

    monkeypatch.setattr(tdl, "_FINALIZE_BLOCK", 16)
    x, w, b, _ = tb._denoise_inputs(40, 33, F32)
    with record_stores() as launches:
        kernels("triton").denoise_loss_fwd(x, w, b, A, S, None, torch.tensor(5), True)
    _launched(launches, _loss_launches(True), tail=[FINALIZE])


@pytest.mark.parametrize(
    "loss_blocks,grad_blocks", [((16, 64, 16), (64, 16, 16)), ((16, 16, 64), (16, 64, 32))], ids=["wide-N", "wide-K"]
)
def test_loss_other_block_shapes_race_free(loss_blocks, grad_blocks):
    # The GPU configs' BLOCK_N != BLOCK_K, through the plain kernels (as test_triton_backend.py).
    from drep_kernels.triton import denoise_loss as tdl

    loss_meta = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), loss_blocks), GROUP_M=2)
    grad_meta = dict(zip(("BLOCK_N", "BLOCK_K", "BLOCK_R"), grad_blocks), GROUP_N=2)
    x, w, b, _ = tb._denoise_inputs(37, 64, F32)
    with record_stores() as launches:
        tdl._denoise_loss(x, w, b, A, S, None, torch.tensor(5), True, tdl._loss_gemm_kernel, tdl._grad_gemm_kernel,
                          (loss_meta, grad_meta))
    _launched(launches, _loss_launches(True), tail=[FINALIZE])


MERGE_SHAPES = [(65, 64), (33, 33)]  # K a multiple of BLOCK_N; odd


@pytest.mark.parametrize("out,K", MERGE_SHAPES)
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=_ids)
@pytest.mark.parametrize("bias,denoise_bias", [(True, True), (False, True), (True, False), (False, False)])
def test_merge_forward_race_free(bias, denoise_bias, dtype, out, K):
    w, b, wd, bd = (t.detach() if t is not None else None for t in tb._merge_inputs(out, K, dtype, bias, denoise_bias))
    with record_stores() as launches:
        kernels("triton").merge_weights_fwd(w, b, wd, bd, C1, C3)
    _launched(launches, ["_merge_gemm_kernel"])


@pytest.mark.parametrize("out,K", MERGE_SHAPES)
def test_merge_bias_column_read_by_its_programs_only(out, K):
    # b' = b - c1 W b_d is formed by the first column block's programs, one per row block; the
    # other programs' loads of b_d are masked off (they would cost L2 traffic, not results).
    w, b, wd, bd = (t.detach() for t in tb._merge_inputs(out, K, F32, True, True))
    with record_stores() as launches:
        kernels("triton").merge_weights_fwd(w, b, wd, bd, C1, C3)
    (launch,) = launches
    from drep_kernels.triton import merge_weights as tmw

    blocks = tmw._INTERPRET.kwargs
    row_blocks, col_blocks = -(-out // blocks["BLOCK_R"]), -(-K // blocks["BLOCK_N"])
    assert launch.grid[0] == row_blocks * col_blocks > row_blocks
    assert len(launch.readers(bd)) == row_blocks
    assert len(launch.readers(w)) == row_blocks * col_blocks  # the check sees loads at all


@pytest.mark.parametrize("out,K", MERGE_SHAPES)
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=_ids)
@pytest.mark.parametrize("grad_bias,denoise_bias", [(True, True), (False, True), (True, False)])
def test_merge_backward_race_free(grad_bias, denoise_bias, dtype, out, K):
    # M3, then M4 with M5 (the bias column when both g_b and b_d exist): two launches.
    w, _, wd, bd = (t.detach() if t is not None else None for t in tb._merge_inputs(out, K, dtype, False, denoise_bias))
    g = torch.Generator().manual_seed(1)
    gw = torch.randn(out, K, generator=g).to(dtype)
    gb = torch.randn(out, generator=g).to(dtype) if grad_bias else None
    with record_stores() as launches:
        kernels("triton").merge_weights_bwd(gw, gb, w, wd, bd, C1, C3, True, True)
    _launched(launches, ["_merge_gemm_kernel"] * 2)


# ---------------------------------------------------------------- oracle tests, grid reversed

# K a multiple of every interpreter block size (32; 128 for x_noisy's columns), in both orders.
BLOCK_MULTIPLE_DENOISE = [
    (64, 32, F32, True), (97, 64, F32, False), (33, 64, BF16, True), (65, 32, F64, True), (40, 128, F32, True),
]
BLOCK_MULTIPLE_MERGE = [
    (65, 32, F32, True, True), (33, 64, F32, False, True), (64, 64, BF16, True, True), (32, 32, F64, True, True),
    (65, 64, F32, True, False),
]
ORDERS = [("in-order", False), ("reversed", True)]


def _maybe_reversed(reverse: bool):
    return reverse_grid() if reverse else contextlib.nullcontext()


def _cases(existing, new):
    """The existing cases reversed (test_triton_backend.py runs them in order), the new in both."""
    return [pytest.param(*c, True, id=f"{'-'.join(map(_ids, c))}-reversed") for c in existing] + [
        pytest.param(*c, rev, id=f"{'-'.join(map(_ids, c))}-{name}") for c in new for name, rev in ORDERS
    ]


@pytest.mark.parametrize("M,K,dtype,bias,reverse", _cases(tb.DENOISE_CASES, BLOCK_MULTIPLE_DENOISE))
def test_denoise_loss_vs_oracle_any_order(M, K, dtype, bias, reverse):
    with _maybe_reversed(reverse):
        tb.test_denoise_loss_kernel_vs_oracle(M, K, dtype, bias)


@pytest.mark.parametrize("out,K,dtype,bias,denoise_bias,reverse", _cases(tb.MERGE_CASES, BLOCK_MULTIPLE_MERGE))
def test_merge_vs_oracle_any_order(monkeypatch, request, out, K, dtype, bias, denoise_bias, reverse):
    with _maybe_reversed(reverse):
        tb.test_merge_vs_oracle(monkeypatch, request, out, K, dtype, bias, denoise_bias)


@pytest.mark.parametrize("M,K,dtype,reverse", [
    pytest.param(300, 32, F32, rev, id=f"300-32-float32-{name}") for name, rev in ORDERS
] + [pytest.param(160, 128, BF16, True, id="160-128-bfloat16-reversed")])
def test_denoise_loss_in_chunks_vs_oracle_any_order(monkeypatch, M, K, dtype, reverse):
    # 128-row chunks, K a multiple of every block: the later chunks' dW_d GEMM adds to dW_d.
    from drep_kernels.triton import denoise_loss as tdl

    monkeypatch.setattr(tdl, "CHUNK_BYTES", 128 * K * 2 * dtype.itemsize)
    with _maybe_reversed(reverse):
        tb.test_denoise_loss_kernel_vs_oracle(M, K, dtype, True)


# The remaining kernel-against-oracle tests of test_triton_backend.py that launch the loss or
# merge kernels (the noise tests launch a kernel of their own), each run with the grid reversed.
OTHER_ORACLE_TESTS = {
    "loss-without-grad": lambda mp: tb.test_denoise_loss_without_grad_does_no_gradient_work(),
    "loss-3d-noncontiguous": tb.test_denoise_loss_public_op_3d_noncontiguous,
    "loss-seeded-vs-torch": tb.test_denoise_loss_seeded_matches_torch_backend,
    "loss-wide-N": lambda mp: tb.test_denoise_loss_other_block_shapes((16, 64, 16), (64, 16, 16)),
    "loss-wide-K": lambda mp: tb.test_denoise_loss_other_block_shapes((16, 16, 64), (16, 64, 32)),
    "loss-in-chunks": lambda mp: tb.test_denoise_loss_in_chunks(mp, F32),
    "merge-bwd": lambda mp: tb.test_merge_bwd_kernel_vs_reference(),
    "merge-noncontiguous": lambda mp: tb.test_merge_noncontiguous(mp, 70),
    "merge-two-step": lambda mp: tb.test_merge_function_equals_two_step(),
}


@pytest.mark.parametrize("name", list(OTHER_ORACLE_TESTS))
def test_other_oracle_tests_reversed(monkeypatch, name):
    with reverse_grid():
        OTHER_ORACLE_TESTS[name](monkeypatch)
